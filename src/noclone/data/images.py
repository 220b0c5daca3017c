"""Loading a folder of a subject's photos robustly, and writing images safely.

Every image comes back fully decoded as 8-bit RGB with its EXIF orientation applied. Anything wrong with an input
(missing, not an image, corrupt, truncated, absurdly large) is a :class:`~noclone.errors.NocloneError` whose one-line
message names the file and the reason; nothing is skipped silently and inputs are never modified.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from noclone.data.atomic import atomic_write_bytes
from noclone.errors import NocloneError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MAX_SIDE",
    "center_crop_resize",
    "check_image_file",
    "file_sha256",
    "images_to_tensor",
    "load_image",
    "load_image_folder",
    "save_image",
    "tensor_to_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
MAX_PIXELS: int = 64_000_000
MAX_SIDE: int = 16384

# Decoders Image.open may use: the formats behind IMAGE_EXTENSIONS (the JPEG decoder also opens the multi-picture MPO
# files of cameras and phones). Keeps exotic plugins (EPS runs Ghostscript, for one) away from untrusted files.
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")

_SAVE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

_WHITE = (255, 255, 255)

_T = TypeVar("_T")


def _dir_label(path: Path) -> str:
    text = str(path)
    return text if text.endswith(os.sep) else text + os.sep


def _reason(exc: BaseException, path: Path | None = None) -> str:
    """A one-line rendering of an exception for use inside our own message (which already names the file)."""
    text = str(exc)
    if path is not None:
        text = text.replace(f" '{path}'", "").replace(f" {path}", "")
    text = " ".join(text.split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------------- modes


def _scale_to_uint8(values: np.ndarray, *, sixteen_bit: bool) -> np.ndarray:
    """Map a high-bit-depth or float single-channel array to uint8 without clipping away the image.

    16-bit data (``I;16*``, or mode ``I`` holding values in 0..65535) is scaled by 255/65535. Floats in [0, 1] are
    scaled by 255, floats in [0, 255] are kept, floats in [0, 65535] are treated as 16-bit; anything else (negative
    values, larger ranges) is stretched min..max onto 0..255. Non-finite values become 0.
    """
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(data.min()) if data.size else 0.0
    hi = float(data.max()) if data.size else 0.0
    if sixteen_bit or (lo >= 0.0 and hi <= 65535.0 and hi > 255.0):
        scaled = data * (255.0 / 65535.0)
    elif lo >= 0.0 and hi <= 1.0 and not np.issubdtype(values.dtype, np.integer):
        scaled = data * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = data
    elif hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency composited on white, 16-bit and float data scaled (not clipped)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), sixteen_bit=True)).convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), sixteen_bit=False)).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------- loading


def _check_size(label: str, size: tuple[int, int]) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise NocloneError(f"{label}: empty image ({width}x{height} pixels)")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise NocloneError(
            f"{label}: {width}x{height} pixels has a side longer than the {MAX_SIDE}-pixel limit "
            "(decompression bomb guard)"
        )
    if width * height > MAX_PIXELS:
        raise NocloneError(
            f"{label}: {width}x{height} pixels is larger than the {MAX_PIXELS}-pixel limit (decompression bomb guard)"
        )


def _bomb_message(label: str, exc: BaseException) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match and int(match.group(1)) > MAX_PIXELS:
        pixels = match.group(1)
        return f"{label}: {pixels} pixels is larger than the {MAX_PIXELS}-pixel limit (decompression bomb guard)"
    return f"{label}: refused by Pillow's decompression bomb guard ({' '.join(str(exc).split())})"


def _check_file(path: Path) -> None:
    """Refuse a missing path, a broken link, a folder or a special file, with one line naming it."""
    label = str(path)
    if not path.exists():
        if path.is_symlink():
            raise NocloneError(f"{label}: broken symbolic link")
        raise NocloneError(f"{label}: no such file")
    if path.is_dir():
        raise NocloneError(f"{_dir_label(path)}: is a directory, expected an image file")
    if not path.is_file():
        raise NocloneError(f"{label}: not a regular file")


def _open(path: Path) -> Image.Image:
    """Open a file's header with the allowed decoders only; an undecodable file is one line naming it."""
    try:
        return Image.open(path, formats=_OPEN_FORMATS)
    except Image.UnidentifiedImageError:
        raise NocloneError(f"{path}: not an image (cannot identify image file)") from None


def _decode(path: Path, fn: Callable[[Image.Image], _T]) -> _T:
    """Run ``fn(image)`` on the opened file, turning every failure into one line naming the file."""
    label = str(path)
    _check_file(path)
    try:
        # Pillow's own decompression-bomb warning becomes an error here only, never globally.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(path) as image:
                _check_size(label, image.size)  # lazy header only: nothing decoded yet
                return fn(image)
    except NocloneError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NocloneError(_bomb_message(label, exc)) from None
    except MemoryError:
        raise NocloneError(f"{label}: out of memory while decoding the image") from None
    except PermissionError:
        raise NocloneError(f"{label}: permission denied") from None
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ... for bad data
        raise NocloneError(f"{label}: truncated or corrupt image ({_reason(exc, path)})") from None


def check_image_file(path: str | Path) -> tuple[int, int]:
    """Check that a file is an image noclone can open, reading its header only; returns its (width, height).

    The same one-line errors as :func:`load_image` for a missing, non-image or oversized file, without decoding
    pixels: folders are checked with it before their images are counted, so a text file named ``x.png`` is
    reported as not an image rather than counted as one.
    """
    return _decode(Path(path), lambda image: tuple(image.size))


def load_image(path: str | Path) -> Image.Image:
    """Load one image file as a fully decoded RGB image, EXIF orientation applied.

    The header is read first and the size checked (at most ``MAX_PIXELS`` pixels and ``MAX_SIDE`` per side) before
    any pixel is decoded; the whole file is then decoded, so a truncated or corrupt file fails here, never later.
    Alpha/palette transparency is composited on white; grayscale, 16-bit, float, CMYK and YCbCr data become RGB.
    The returned image is detached from the file and carries no metadata.
    """
    path = Path(path)

    def decode(image: Image.Image) -> Image.Image:
        image.load()  # full decode: truncated/corrupt data fails now
        oriented = ImageOps.exif_transpose(image)  # a transposed copy (a plain copy when no orientation)
        rgb = _to_rgb(oriented)
        return rgb.copy() if rgb is image else rgb

    rgb = _decode(path, decode)
    if rgb.mode != "RGB":  # defensive: every branch of _to_rgb ends in RGB
        raise NocloneError(f"{path}: cannot convert colour mode {rgb.mode} to RGB")
    rgb.info.clear()
    return rgb


def _image_files(path: Path) -> list[Path]:
    """Candidate image files of a folder, sorted by name: image extensions only, hidden entries and folders ignored."""
    label = _dir_label(path)
    if not path.exists():
        raise NocloneError(f"{label}: no such directory")
    if not path.is_dir():
        raise NocloneError(f"{path}: is a file, expected a directory")
    try:
        entries = list(path.iterdir())
    except PermissionError:
        raise NocloneError(f"{label}: permission denied") from None
    except OSError as exc:
        raise NocloneError(f"{label}: cannot list directory ({exc.strerror or exc})") from None
    files = []
    for entry in entries:
        if entry.name.startswith(".") or entry.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if entry.is_dir():
            continue  # a sub-folder, whatever its name, is not a photo; folders are not searched recursively
        files.append(entry)
    return sorted(files, key=lambda p: p.name)


def load_image_folder(
    path: str | Path, min_count: int = 1, max_count: int | None = None
) -> list[tuple[Path, Image.Image]]:
    """Load every image of a folder (not recursive) as ``(path, RGB image)`` pairs, sorted by file name.

    Only files with an extension in ``IMAGE_EXTENSIONS`` (any case) are read; hidden entries (names starting with
    ``.``, which includes macOS ``._*`` files) and sub-folders are ignored. A file with an image extension that is
    not an image, or is corrupt or truncated, is an error naming it. ``max_count`` is checked first; every file's
    header is then checked (:func:`check_image_file`), so a file that is not an image is refused by name before
    ``min_count`` could count it; only then are the pixels decoded.
    """
    path = Path(path)
    label = _dir_label(path)
    if min_count < 0:
        raise NocloneError(f"{label}: min_count must be at least 0, got {min_count}")
    if max_count is not None and max_count < min_count:
        raise NocloneError(f"{label}: max_count ({max_count}) is smaller than min_count ({min_count})")
    files = _image_files(path)
    count = len(files)
    noun = "image" if count == 1 else "images"
    if max_count is not None and count > max_count:
        raise NocloneError(f"{label}: found {count} {noun}, at most {max_count} allowed")
    for file in files:  # a file that only looks like an image is named here, never counted as one
        check_image_file(file)
    if count < min_count:
        raise NocloneError(f"{label}: found {count} {noun}, need at least {min_count}")
    return [(file, load_image(file)) for file in files]


# --------------------------------------------------------------------------------------------------------- tensors


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise NocloneError(f"resolution must be a positive integer, got {resolution!r}")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution``, then crop the centre square: an RGB ``resolution``² image.

    Done in one antialiased resampling pass (Lanczos) over the centre square of the source, which is the same as
    resizing then cropping but without an intermediate rounding of the size. Non-RGB input is converted as
    :func:`load_image` would.
    """
    _check_resolution(resolution)
    image = _to_rgb(image)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise NocloneError(f"cannot resize an empty {width}x{height} image")
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    box = (left, top, left + side, top + side)
    if (width, height) == (resolution, resolution):
        return image.copy()
    return image.resize((int(resolution), int(resolution)), Image.Resampling.LANCZOS, box=box)


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Images to a float32 ``[N, 3, R, R]`` tensor in [-1, 1] (each centre-cropped and resized first)."""
    _check_resolution(resolution)
    arrays = [np.asarray(center_crop_resize(image, resolution), dtype=np.uint8) for image in images]
    if not arrays:
        return torch.empty((0, 3, int(resolution), int(resolution)), dtype=torch.float32)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
    return (batch / 127.5 - 1.0).contiguous()


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """Inverse of :func:`images_to_tensor`: a ``[N, 3, H, W]`` tensor in [-1, 1] to RGB images (clamped, rounded).

    Accepts any float dtype and device; NaN is an error (it means a bug upstream), ±inf is clamped like any other
    out-of-range value.
    """
    if not isinstance(tensor, torch.Tensor):
        raise NocloneError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise NocloneError(f"expected an [N, 3, H, W] tensor, got shape {list(tensor.shape)}")
    values = tensor.detach().to(device="cpu", dtype=torch.float32)
    if torch.isnan(values).any():
        raise NocloneError("tensor contains NaN values; cannot convert to images")
    pixels = ((values.clamp(-1.0, 1.0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(array) for array in arrays]


# --------------------------------------------------------------------------------------------------------- writing


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``).

    The format follows the suffix (.png .jpg/.jpeg .webp .bmp .tif/.tiff, any case); a path without a suffix is
    written as PNG; any other suffix is an error. No metadata is written: EXIF, ICC profile, text chunks, XMP and
    DPI are all dropped. JPEG is written at quality 95 with 4:4:4 chroma; WebP losslessly. Modes a format cannot
    hold are converted to RGB (transparency composited on white). Parent directories are created.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == "":
        fmt = "PNG"
    elif suffix in _SAVE_FORMATS:
        fmt = _SAVE_FORMATS[suffix]
    else:
        choices = ", ".join(sorted(_SAVE_FORMATS))
        raise NocloneError(f"{path}: unsupported image extension {path.suffix!r} (use one of {choices})")

    image.load()
    supported = {
        "PNG": ("RGB", "RGBA", "L", "LA", "I;16", "1"),
        "JPEG": ("RGB", "L"),
        "WEBP": ("RGB", "RGBA"),
        "BMP": ("RGB", "RGBA", "L", "1"),
        "TIFF": ("RGB", "RGBA", "L", "LA", "I;16", "1", "CMYK"),
    }[fmt]
    if image.mode not in supported:
        image = _to_rgb(image)
    # A copy with an emptied info dict: some encoders fall back to image.info for the ICC profile, EXIF or text.
    clean = image.copy()
    clean.info.clear()
    options: dict[str, object] = {}
    if fmt == "JPEG":
        options = {"quality": 95, "subsampling": 0}
    elif fmt == "WEBP":
        options = {"lossless": True, "exact": True}

    def write(handle: IO[bytes]) -> None:
        clean.save(handle, format=fmt, **options)

    try:
        atomic_write_bytes(path, write)
    except NocloneError:
        raise
    except Exception as exc:
        raise NocloneError(f"{path}: cannot write image ({_reason(exc, path)})") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks)."""
    path = Path(path)
    if not path.exists():
        raise NocloneError(f"{path}: no such file")
    if path.is_dir():
        raise NocloneError(f"{_dir_label(path)}: is a directory, expected a file")
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise NocloneError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()
