"""Tests for noclone.data.images and noclone.data.atomic. Every fixture is made here, in tmp_path."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noclone.data import images as images_module
from noclone.data.atomic import atomic_output_dir, atomic_write_json, atomic_write_text
from noclone.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    center_crop_resize,
    file_sha256,
    images_to_tensor,
    load_image,
    load_image_folder,
    save_image,
    tensor_to_images,
)
from noclone.errors import NocloneError

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


# ------------------------------------------------------------------------------------------------------ helpers


def close(pixel, expected, tol=12):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def write_rgb(path: Path, size=(24, 16), color=GREEN, **save_kwargs) -> Path:
    Image.new("RGB", size, color).save(path, **save_kwargs)
    return path


def noise_jpeg_bytes(size=(96, 96), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_with_claimed_size(path: Path, width: int, height: int) -> Path:
    """A tiny valid grayscale PNG whose IHDR is patched to claim width x height (CRC fixed): a cheap bomb."""
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 0).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------------------ load_image


def test_extensions_and_limit_constants():
    assert IMAGE_EXTENSIONS == frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
    assert MAX_PIXELS == 64_000_000


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40 wide x 20 tall, red block in the stored top-left corner. Orientation 6 = rotate 90 degrees clockwise
    # for display, so the loaded image is 20 wide x 40 tall and the red block sits in the top-right corner.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as stored_file:
        assert stored_file.getexif().get(0x0112) == 6

    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (20, 40)
    assert close(image.getpixel((17, 2)), RED)  # top-right
    assert close(image.getpixel((2, 2)), BLUE)  # top-left
    assert close(image.getpixel((17, 37)), BLUE)  # bottom-right
    assert close(image.getpixel((2, 37)), BLUE)  # bottom-left
    assert "exif" not in image.info


def test_rgba_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))  # fully transparent red: must become white, not red/black
    rgba.paste((0, 0, 255, 255), (10, 0, 20, 5))  # opaque blue
    rgba.paste((0, 0, 0, 128), (10, 5, 20, 10))  # half-transparent black: mid grey on white
    path = tmp_path / "alpha.png"
    rgba.save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == WHITE
    assert image.getpixel((15, 2)) == BLUE
    assert close(image.getpixel((15, 7)), (127, 127, 127), tol=2)


def test_la_composited_on_white(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))
    path = tmp_path / "la.png"
    la.save(path)
    assert load_image(path).getpixel((3, 3)) == WHITE


def test_grayscale_l(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 6), 100).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((4, 4)) == (100, 100, 100)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file
    image = load_image(path)
    assert image.mode == "RGB"
    row = np.asarray(image)[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255
    assert (np.diff(row) >= 0).all()  # still a monotone gradient
    assert len(np.unique(row)) > 200  # spans the range instead of saturating at 255
    assert abs(row[128] - 128) <= 2


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (4, 1))
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "F"
    row = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[32] - 129) <= 2


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # no cyan, full magenta+yellow: red
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    assert close(image.getpixel((8, 8)), RED, tol=16)


def test_palette_png_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette.paste(1, (5, 0, 10, 10))
    transparent = tmp_path / "pal_t.png"
    palette.save(transparent, transparency=0)
    opaque = tmp_path / "pal.png"
    palette.save(opaque)

    image = load_image(transparent)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == WHITE  # transparent index composited on white
    assert image.getpixel((7, 1)) == GREEN
    image = load_image(opaque)
    assert image.getpixel((1, 1)) == RED
    assert image.getpixel((7, 1)) == GREEN


def test_other_formats_load(tmp_path):
    for suffix in (".webp", ".bmp", ".tiff", ".jpeg"):
        path = write_rgb(tmp_path / f"x{suffix}", color=BLUE)
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (24, 16)
        assert close(image.getpixel((5, 5)), BLUE)


def test_loaded_image_is_detached_from_file(tmp_path):
    path = write_rgb(tmp_path / "a.png")
    image = load_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == GREEN
    assert type(image) is Image.Image


def test_truncated_jpeg_is_an_error(tmp_path):
    data = noise_jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NocloneError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: truncated or corrupt image (")
    assert "\n" not in message


def test_random_bytes_png_is_an_error(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(b"\x00garbage" + np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(NocloneError, match=r"noise\.png: not an image \(cannot identify image file\)$"):
        load_image(path)


def test_text_file_named_jpg_is_an_error(tmp_path):
    path = tmp_path / "notes.txt.jpg"
    path.write_text("these are my notes, not a photo\n")
    with pytest.raises(NocloneError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: not an image (cannot identify image file)"


def test_other_format_with_image_extension_is_refused(tmp_path):
    path = tmp_path / "actually_a_gif.png"
    Image.new("RGB", (4, 4)).save(path, format="GIF")
    with pytest.raises(NocloneError, match="not an image"):
        load_image(path)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (70000, 70000, "4900000000 pixels is larger than the 64000000-pixel limit (decompression bomb guard)"),
        # between Pillow's warning and error thresholds: Pillow's warning must become our error, not leak out
        (10000, 10000, "100000000 pixels is larger than the 64000000-pixel limit (decompression bomb guard)"),
        (9000, 8000, "9000x8000 pixels is larger than the 64000000-pixel limit (decompression bomb guard)"),
        (20000, 10, "20000x10 pixels has a side longer than the 16384-pixel limit (decompression bomb guard)"),
    ],
)
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height, expected):
    path = png_with_claimed_size(tmp_path / "bomb.png", width, height)
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NocloneError) as info:
            load_image(path)
    assert str(info.value) == f"{path}: {expected}"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    # PIL's global settings and the warning filters are left as they were.
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert list(warnings.filters) == filters_before


def test_bomb_header_really_claims_the_size(tmp_path):
    path = png_with_claimed_size(tmp_path / "claim.png", 9000, 8000)
    with Image.open(path) as image:
        assert image.size == (9000, 8000)


def test_missing_file_and_directory_instead_of_file(tmp_path):
    with pytest.raises(NocloneError, match=r"nope\.png: no such file$"):
        load_image(tmp_path / "nope.png")
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(NocloneError, match="is a directory, expected an image file"):
        load_image(folder)


# ------------------------------------------------------------------------------------------------------ folders


def make_photo_folder(folder: Path) -> Path:
    folder.mkdir()
    write_rgb(folder / "b.png", color=GREEN)
    write_rgb(folder / "a.jpg", color=RED, quality=95)
    write_rgb(folder / "C.JPG", color=BLUE, quality=95)  # upper-case extension counts
    write_rgb(folder / "d.webp", color=RED)
    (folder / "notes.txt").write_text("not an image")
    (folder / "meta.json").write_text("{}")
    write_rgb(folder / "raw.gif", format="GIF")  # not one of our extensions: ignored
    (folder / ".hidden.png").write_bytes(b"garbage that would fail to load")
    (folder / "._a.jpg").write_bytes(b"macOS resource fork junk")
    (folder / "sub.png").mkdir()  # a folder, even with an image name, is ignored
    write_rgb(folder / "sub.png" / "inner.png")
    return folder


def test_load_folder_sorted_filtered(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    loaded = load_image_folder(folder, min_count=4)
    assert [p.name for p, _ in loaded] == ["C.JPG", "a.jpg", "b.png", "d.webp"]
    assert all(p.parent == folder for p, _ in loaded)
    assert all(image.mode == "RGB" for _, image in loaded)
    assert close(loaded[1][1].getpixel((3, 3)), RED)


def test_load_folder_does_not_modify_inputs(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    before = hashes(folder)
    names_before = sorted(os.listdir(folder))
    mtimes_before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    load_image_folder(folder)
    assert hashes(folder) == before
    assert sorted(os.listdir(folder)) == names_before
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes_before


def test_load_folder_too_few_and_too_many(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_rgb(folder / "a.png")
    write_rgb(folder / "b.png")
    with pytest.raises(NocloneError) as info:
        load_image_folder(folder, min_count=4)
    assert str(info.value) == f"{folder}{os.sep}: found 2 images, need at least 4"
    with pytest.raises(NocloneError, match="found 2 images, at most 1 allowed"):
        load_image_folder(folder, max_count=1)
    assert len(load_image_folder(folder, min_count=2, max_count=2)) == 2


def test_empty_folder_is_an_error_by_default(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    with pytest.raises(NocloneError, match="found 0 images, need at least 1"):
        load_image_folder(folder)


def test_load_folder_missing_and_file_instead_of_folder(tmp_path):
    with pytest.raises(NocloneError) as info:
        load_image_folder(tmp_path / "photos")
    assert str(info.value) == f"{tmp_path / 'photos'}{os.sep}: no such directory"
    file = write_rgb(tmp_path / "single.png")
    with pytest.raises(NocloneError, match=r"single\.png: is a file, expected a directory"):
        load_image_folder(file)


@pytest.mark.parametrize("kind", ["truncated", "text", "random"])
def test_bad_file_in_folder_is_an_error_naming_it(tmp_path, kind):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_rgb(folder / "a.png")
    write_rgb(folder / "c.png")
    bad = folder / "b.jpg"
    if kind == "truncated":
        data = noise_jpeg_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "text":
        bad.write_text("hello")
    else:
        bad.write_bytes(bytes(range(7, 250)) * 10)
    before = hashes(folder)
    with pytest.raises(NocloneError) as info:
        load_image_folder(folder)
    message = str(info.value)
    assert message.startswith(f"{bad}: ")
    assert ("truncated or corrupt" in message) if kind == "truncated" else ("not an image" in message)
    assert hashes(folder) == before


def test_bomb_in_folder_is_an_error(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_rgb(folder / "a.png")
    png_with_claimed_size(folder / "z.png", 70000, 70000)
    with pytest.raises(NocloneError, match=r"z\.png: .*decompression bomb guard"):
        load_image_folder(folder)


# ------------------------------------------------------------------------------------------------------ tensors


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (50, 120), (64, 64), (65, 64)])
def test_center_crop_resize_sizes(size):
    out = center_crop_resize(Image.new("RGB", size, GREEN), 64)
    assert out.size == (64, 64) and out.mode == "RGB"


def test_center_crop_keeps_the_centre():
    # The central square (x 100..200) lies inside a green band with a margin wider than the Lanczos kernel, so an
    # off-centre crop (or a squash instead of a crop) would show red or blue.
    wide = Image.new("RGB", (300, 100), RED)
    wide.paste(GREEN, (80, 0, 220, 100))
    wide.paste(BLUE, (220, 0, 300, 100))
    out = np.asarray(center_crop_resize(wide, 32)).reshape(-1, 3)
    assert (out == np.array(GREEN)).all()
    tall = Image.new("RGB", (10, 30), RED)  # central square: y 10..20
    tall.paste(BLUE, (0, 6, 10, 24))
    out = np.asarray(center_crop_resize(tall, 20)).reshape(-1, 3)
    assert (out == np.array(BLUE)).all()
    # the boundary itself: a crop off by a few pixels is caught here
    edge = Image.new("RGB", (300, 100), RED)
    edge.paste(GREEN, (100, 0, 200, 100))
    out = np.asarray(center_crop_resize(edge, 100)).astype(int)  # scale 1: a pure crop
    assert (out == np.array(GREEN)).all()


def test_center_crop_resize_is_antialiased():
    # A 1-pixel checkerboard downscaled 8x must average to grey, not alias to black or white.
    board = ((np.indices((256, 256)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = np.asarray(center_crop_resize(Image.fromarray(board).convert("RGB"), 32)).astype(int)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 6


def test_center_crop_resize_bad_resolution():
    with pytest.raises(NocloneError):
        center_crop_resize(Image.new("RGB", (8, 8)), 0)


def test_images_to_tensor_shape_range():
    images = [Image.new("RGB", (40, 30), (0, 128, 255)), Image.new("RGB", (30, 40), WHITE)]
    tensor = images_to_tensor(images, 16)
    assert tensor.shape == (2, 3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert torch.allclose(tensor[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    assert torch.all(tensor[1] == 1.0)
    assert images_to_tensor([], 8).shape == (0, 3, 8, 8)


def test_tensor_round_trip_within_one_level():
    torch.manual_seed(0)
    tensor = torch.rand(3, 3, 12, 12) * 2 - 1
    images = tensor_to_images(tensor)
    assert len(images) == 3 and all(im.mode == "RGB" and im.size == (12, 12) for im in images)
    back = images_to_tensor(images, 12)
    assert (back - tensor).abs().max().item() <= 1 / 255 + 1e-6
    # uint8 -> tensor -> uint8 is exact
    again = tensor_to_images(back)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))


def test_tensor_to_images_clamps_and_validates():
    tensor = torch.tensor([3.0, -7.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).to(torch.float16)
    (image,) = tensor_to_images(tensor)
    assert image.getpixel((0, 0)) == (255, 0, 128)
    with pytest.raises(NocloneError, match="N, 3, H, W"):
        tensor_to_images(torch.zeros(3, 4, 4))
    with pytest.raises(NocloneError, match="NaN"):
        tensor_to_images(torch.full((1, 3, 2, 2), float("nan")))


# ------------------------------------------------------------------------------------------------------ writing


def image_with_metadata(tmp_path) -> Image.Image:
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x010F] = "SpyCam"  # Make
    exif[0x0112] = 1
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = tmp_path / "meta_src.jpg"
    Image.new("RGB", (16, 12), RED).save(source, exif=exif.tobytes(), icc_profile=icc, dpi=(300, 300))
    with Image.open(source) as opened:
        opened.load()
        image = opened.copy()
    assert "exif" in image.info and "icc_profile" in image.info
    image.info["comment"] = b"private"
    return image


@pytest.mark.parametrize("name", ["out.png", "out.jpg", "out.webp", "out.tiff", "out.bmp", "noext"])
def test_save_image_strips_metadata(tmp_path, name):
    image = image_with_metadata(tmp_path)
    target = tmp_path / "results" / "deep" / name  # parent folders are created
    save_image(image, target)
    assert sorted(os.listdir(target.parent)) == [name]  # no temporary file left behind
    with Image.open(target) as saved:
        saved.load()
        expected = {"noext": "PNG", "out.png": "PNG", "out.jpg": "JPEG", "out.webp": "WEBP",
                    "out.tiff": "TIFF", "out.bmp": "BMP"}[name]
        assert saved.format == expected
        assert saved.size == (16, 12)
        if expected == "TIFF":  # TIFF keeps structural tags (width, strips...) in the same directory as EXIF
            tags = saved.getexif()
            assert 0x010F not in tags and 0x8769 not in tags and 34675 not in tags  # Make, EXIF IFD, ICC
        else:
            assert len(saved.getexif()) == 0
        for key in ("exif", "icc_profile", "comment", "xmp", "XML:com.adobe.xmp"):
            assert key not in saved.info
        assert b"SpyCam" not in target.read_bytes()
        assert close(saved.convert("RGB").getpixel((8, 6)), RED)
    assert image.info.get("comment") == b"private"  # the caller's image is not modified


def test_save_image_rgba_to_jpeg_and_png_round_trip(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    save_image(rgba, tmp_path / "a.jpg")
    with Image.open(tmp_path / "a.jpg") as saved:
        assert close(saved.getpixel((4, 4)), WHITE)
    pixels = Image.fromarray(np.random.default_rng(3).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    save_image(pixels, tmp_path / "lossless.png")
    with Image.open(tmp_path / "lossless.png") as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(pixels))


def test_save_image_is_atomic(tmp_path, monkeypatch):
    target = write_rgb(tmp_path / "keep.png", color=BLUE)
    before = file_sha256(target)

    def broken_save(self, fp, format=None, **params):
        fp.write(b"\x89PNG partial")
        raise OSError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(NocloneError, match=r"keep\.png: cannot write"):
        save_image(Image.new("RGB", (8, 8), RED), target)
    monkeypatch.undo()
    assert file_sha256(target) == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]  # and no temporary file is left
    save_image(Image.new("RGB", (8, 8), RED), target)
    assert file_sha256(target) != before
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_save_image_unsupported_suffix(tmp_path):
    with pytest.raises(NocloneError, match=r"x\.gif: unsupported image extension"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "x.gif")
    assert os.listdir(tmp_path) == []


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(NocloneError, match="no such file"):
        file_sha256(tmp_path / "missing")


def test_images_module_does_not_change_pil_globals():
    from PIL import ImageFile

    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's default, untouched by importing our module
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert images_module.MAX_PIXELS == 64_000_000


# ------------------------------------------------------------------------------------------------------ atomic


def siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


def test_atomic_output_dir_success(tmp_path):
    out = tmp_path / "runs" / "out"  # parents are created
    with atomic_output_dir(out) as work:
        assert work.parent == out.parent and work.name.startswith(".out.tmp-")
        assert not out.exists()  # nothing visible until the work succeeds
        (work / "result.txt").write_text("done")
    assert (out / "result.txt").read_text() == "done"
    assert siblings(out) == ["out"]


def test_atomic_output_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as work:
            (work / "partial.txt").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_failure_keeps_existing_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as work:
            (work / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(os.listdir(out)) == ["old.txt"]
    assert siblings(out) == ["out"]


def test_atomic_output_dir_refuses_non_empty_out_at_entry(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    ran = False
    with pytest.raises(NocloneError, match="already exists and is not empty"):
        with atomic_output_dir(out):
            ran = True
    assert not ran  # refused before any work
    assert (out / "old.txt").read_text() == "old"
    assert siblings(out) == ["out"]


def test_atomic_output_dir_overwrite_and_empty_existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as work:
        (work / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert siblings(out) == ["out"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as work:
        (work / "x").write_text("x")
    assert os.listdir(empty) == ["x"]


def test_atomic_output_dir_refuses_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("I am a file")
    with pytest.raises(NocloneError, match="is a file, expected a directory"):
        with atomic_output_dir(out, overwrite=True):
            pass
    assert out.read_text() == "I am a file"


def test_atomic_write_text_and_json(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"b": 1, "é": [1, 2]})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": 1, "é": [1, 2]}
    assert path.read_text(encoding="utf-8").endswith("\n")
    atomic_write_text(path, "replaced")
    assert path.read_text() == "replaced"
    assert siblings(path) == ["a.json"]
    with pytest.raises(NocloneError, match="cannot write JSON"):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["sub"]
