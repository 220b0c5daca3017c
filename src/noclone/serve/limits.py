"""Upload limits and checks: the multipart body is read into memory under size caps, photos are decoded from memory.

Nothing here touches the disk: Starlette's own form parser spools files over 1 MB to temporary files, so the body
is parsed here with python-multipart's streaming parser, every part kept in a bytes buffer, and the caps enforced
while the bytes arrive (an oversized upload is cut at the cap, never read whole). Every refusal is an `ApiError`
whose message is one line and whose status is a 4xx.
"""

from __future__ import annotations

import asyncio
import io
import re
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from noclone.data.images import MAX_SIDE, _to_rgb

MB = 1024 * 1024
# what the service accepts: the photo formats people post (Pillow's format name -> media type)
ACCEPTED_FORMATS: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_NAME_OK = re.compile(r"[^A-Za-z0-9._ -]+")


class ApiError(Exception):
    """A refusal the client caused: an HTTP status (4xx), one clear line, optional extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    """Every cap the service enforces (sizes in bytes, times in seconds)."""

    max_file_bytes: int = 20 * MB
    max_request_bytes: int = 64 * MB
    max_files: int = 16
    max_pixels: int = 25_000_000       # per photo, checked from the header before any pixel is decoded
    max_field_bytes: int = 1024        # a form field such as `method` or `budget`
    read_timeout_s: float = 30.0       # the whole body must arrive within this (slow uploads hold memory)
    request_timeout_s: float = 60.0    # a synchronous cloak must answer within this
    job_queue: int = 8                 # optimization jobs waiting or running
    job_ttl_s: float = 600.0           # a finished job's results are dropped this long after it ends
    job_timeout_s: float = 1800.0      # a running job is stopped after this long

    def describe(self) -> dict:
        """The caps as the API reports them."""
        return {"max_file_mb": round(self.max_file_bytes / MB, 2),
                "max_request_mb": round(self.max_request_bytes / MB, 2),
                "max_files": self.max_files, "max_pixels": self.max_pixels,
                "formats": sorted(ACCEPTED_FORMATS.values()), "request_timeout_s": self.request_timeout_s,
                "job_ttl_s": self.job_ttl_s}


@dataclass
class Upload:
    """One uploaded file, in memory."""

    filename: str
    data: bytearray = field(default_factory=bytearray)


@dataclass
class Form:
    """A parsed multipart body: the files in order and the text fields."""

    files: list[Upload]
    fields: dict[str, str]


def safe_name(filename: str, index: int) -> str:
    """A client's file name reduced to a plain base name (no folders, no odd characters), never empty."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    base = _NAME_OK.sub("_", base).strip(" .")[:120]
    return base or f"photo-{index + 1}"


async def read_form(headers: dict[str, str], receive: Callable[[], Awaitable[bytes | None]], limits: Limits) -> Form:
    """Parse a multipart/form-data body from `receive` (returns chunks, None at the end) under the caps."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(415, "send the photos as multipart/form-data (field 'files', one or more)")
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
        raise ApiError(413, f"request of {int(length) / MB:.1f} MB is over the {limits.max_request_bytes / MB:.0f} MB "
                            "limit per request")
    files: list[Upload] = []
    fields: dict[str, str] = {}
    state: dict = {"name": b"", "value": b"", "disposition": b"", "part": None, "field": None}

    def on_part_begin() -> None:
        state.update(disposition=b"", part=None, field=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["name"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state["name"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state["disposition"])
        name = options.get(b"name")
        if name is None:
            raise ApiError(422, "a form part has no name (Content-Disposition needs name=...)")
        if b"filename" in options:
            if len(files) >= limits.max_files:
                raise ApiError(413, f"more than {limits.max_files} photos in one request")
            upload = Upload(safe_name(options[b"filename"].decode("utf-8", "replace"), len(files)))
            files.append(upload)
            state["part"] = upload
        else:
            state["field"] = [name.decode("utf-8", "replace"), bytearray()]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["part"] is not None:
            part = state["part"]
            part.data += data[start:end]
            if len(part.data) > limits.max_file_bytes:
                raise ApiError(413, f"{part.filename}: over the {limits.max_file_bytes / MB:.0f} MB limit per photo")
        elif state["field"] is not None:
            state["field"][1] += data[start:end]
            if len(state["field"][1]) > limits.max_field_bytes:
                raise ApiError(413, f"form field {state['field'][0]!r} is over {limits.max_field_bytes} bytes")

    def on_part_end() -> None:
        if state["field"] is not None:
            name, value = state["field"]
            fields[name] = value.decode("utf-8", "replace").strip()
        state.update(part=None, field=None)

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished})
    total = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.read_timeout_s
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(receive(), remaining)
            if chunk is None:
                break
            total += len(chunk)
            if total > limits.max_request_bytes:
                raise ApiError(413, f"request is over the {limits.max_request_bytes / MB:.0f} MB limit per request")
            parser.write(chunk)
        parser.finalize()
    except asyncio.TimeoutError:
        raise ApiError(408, f"the upload did not arrive within {limits.read_timeout_s:g} s") from None
    except ApiError:
        raise
    except Exception as exc:  # python-multipart's parse errors
        from python_multipart.exceptions import FormParserError

        if isinstance(exc, FormParserError):
            raise ApiError(422, "malformed multipart body") from None
        raise
    if not files:
        raise ApiError(422, "no photo in the request: send one or more files in the 'files' field")
    return Form(files, fields)


def peek_size(upload: Upload, limits: Limits) -> tuple[str, tuple[int, int]]:
    """The format and size from the header only (nothing decoded): 415 for other formats, 413 over the pixel cap."""
    if not upload.data:
        raise ApiError(422, f"{upload.filename}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(upload.data)), formats=tuple(ACCEPTED_FORMATS)) as image:
                fmt, size = image.format, image.size
    except Image.UnidentifiedImageError:
        raise ApiError(415, f"{upload.filename}: not a PNG, JPEG or WebP photo") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"{upload.filename}: too many pixels (over the {limits.max_pixels:,} pixel limit)") from None
    except Exception:
        raise ApiError(415, f"{upload.filename}: unreadable image header") from None
    _check_pixels(upload.filename, size, limits)
    return fmt, size


def _check_pixels(name: str, size: tuple[int, int], limits: Limits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ApiError(422, f"{name}: empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ApiError(413, f"{name}: {width}x{height} is over the {limits.max_pixels:,} pixel limit per photo")
    if max(width, height) > MAX_SIDE:
        raise ApiError(413, f"{name}: {width}x{height} has a side over the {MAX_SIDE} px limit")


def decode_photo(upload: Upload, limits: Limits) -> Image.Image:
    """A fully decoded RGB photo (EXIF orientation applied, no metadata); the pixel cap is checked first."""
    peek_size(upload, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(upload.data)), formats=tuple(ACCEPTED_FORMATS)) as image:
                image.load()  # a truncated or corrupt body fails here, not later
                rgb = _to_rgb(ImageOps.exif_transpose(image))
                if rgb is image:
                    rgb = rgb.copy()
    except ApiError:
        raise
    except MemoryError:
        raise ApiError(413, f"{upload.filename}: too large to decode") from None
    except Exception:
        raise ApiError(422, f"{upload.filename}: truncated or corrupt image") from None
    _check_pixels(upload.filename, rgb.size, limits)
    rgb.info.clear()
    return rgb
