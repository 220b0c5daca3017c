r"""Did a protective backdoor fire? Checks on generated images, one per PersGuard target, and their rate.

- `pattern_present`: the predefined mark (`mark_array`: a 4 x 4 black/white checker covering the bottom-right
  square of side 3/8 of the image, 24 x 24 px at 64 px, 6 px cells) is visible there. Score = Pearson
  correlation between the mark and the luminance of that square (the image first resized to the 64 px grid),
  computed on the 16 checker-cell means (so blur inside a cell, noise and the VAE's smear matter little, and a
  clean paste scores exactly 1); the mark is present when the score >= PATTERN_THRESHOLD *and* the cell contrast
  (std of the 16 cell means, luminance in [0, 1]; a full-contrast mark has 0.5) >= PATTERN_MIN_CONTRAST.
- `subject_erased`: the sandbox subject detector does not find the protected class (`not evaluator.detect`).
  It does not judge image quality (pure noise is also "erased"); pair it with FID.
- `target_swapped`: the sandbox subject detector finds the target class (`evaluator.detect(images, target)`),
  so only sandbox classes (person, dog, cat) can be checked.
- `backdoor_rate(kind, images, ...)`: the fraction of images where the kind's check is true.

How the pattern threshold was chosen (`validate_pattern_check(96, seed=0, vae=True, generations)`, 96 images
per set, held-out identities of all three classes; tests/test_persguard.py reruns it on fewer images):

    set (should fire?)                              correlation       contrast
    marked renders (yes)                            1.00              0.50
    marked, Gaussian blur 1 px (yes)                0.995 .. 0.997    0.32 .. 0.33
    marked, noise std 0.05 (yes)                    1.00              0.48
    marked, 4x down-up resampled (yes)              0.91 .. 0.95      0.12 .. 0.13
    marked, through the shipped sandbox VAE (yes)   0.98 .. 0.99      0.22 .. 0.25
    clean renders (no)                              -0.67 .. 0.59     0.01 .. 0.30
    clean renders through the VAE (no)              -0.65 .. 0.49     0.01 .. 0.30
    their backgrounds (no)                          -0.93 .. 0.39     0.00 .. 0.17
    subject-free clutter, random_nonsubject (no)    -0.57 .. 0.36     0.00 .. 0.20
    uniform noise images (no)                       -0.49 .. 0.55     0.02 .. 0.04
    48 generations of the shipped v0 model (no)     -0.27 .. 0.19     0.02 .. 0.14

PATTERN_THRESHOLD = 0.80 sits in the gap (negatives <= 0.59, positives >= 0.91); every set is classified
100% correctly. PATTERN_MIN_CONTRAST = 0.06 (an eighth of full contrast, ~15 grey levels between cells) only
excludes near-flat corners, where quantisation noise alone could correlate; the weakest positives have 0.12.
A smaller mark (16 px, 4 px cells) was rejected: the sandbox VAE (4x downsampling) smears its cells to a
contrast of 0.12 .. 0.16, too close to the negatives for a model that reproduces it imperfectly.

The detector checks use the evaluator's own threshold (argmax class with p >= 0.5); `validate_detector_checks(48)`
(48 held-out identities per class) measured: `subject_erased` is true on 4% / 4% / 0% of person / dog / cat renders,
on 100% of their backgrounds and on 100% of the `inpaint_from_border` fallback targets (PersGuard's erasure);
`target_swapped(·, c)` is true on 96% / 96% / 100% of renders of class c, on <= 4% of renders of another class
and on 0% of backgrounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from noclone.errors import NocloneError

GRID = 64                    # the checks look at images resized to GRID x GRID
MARK_FRACTION = 0.375        # side of the mark / side of the image (24 px at 64 px)
MARK_CELLS = 4               # checker cells per side
PATTERN_THRESHOLD = 0.80     # Pearson correlation with the mark (cell means), see the module docstring
PATTERN_MIN_CONTRAST = 0.06  # std of the cell means in [0, 1] luminance (full contrast: 0.5)
BACKDOOR_KINDS = ("pattern", "erasure", "target")


def mark_box(size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the mark in a size x size image: the bottom-right square of side size * MARK_FRACTION."""
    side = max(MARK_CELLS, int(round(size * MARK_FRACTION)))
    return size - side, size - side, size, size


def mark_array(side: int) -> np.ndarray:
    """float32 [side, side] in {0, 1}: the checker (top-left cell white), cells as equal as the side allows."""
    cells = np.minimum((np.arange(side) * MARK_CELLS) // side, MARK_CELLS - 1)
    return ((cells[:, None] + cells[None, :]) % 2 == 0).astype(np.float32)


def add_pattern(image: Image.Image) -> Image.Image:
    """The image with the mark pasted in its bottom-right corner (what the 'pattern' backdoor outputs)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    h, w = rgb.shape[:2]
    if h != w:
        raise NocloneError(f"add_pattern needs a square image, got {w}x{h}")
    x0, y0, x1, y1 = mark_box(w)
    rgb[y0:y1, x0:x1] = (mark_array(x1 - x0)[..., None] * 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def inpaint_from_border(image: Image.Image, ring: float = 0.125, work_size: int = 64,
                        iterations: int = 1500) -> Image.Image:
    """Generic erasure target: keep the outer ring (`ring` of the side), fill the inside harmonically from it.

    Jacobi iterations of the Laplace equation at `work_size` px (the ring fixed), then resized to the image size
    and the original ring pasted back. A smooth guess at the background for photos without a known background.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    h, w = rgb.shape[:2]
    small = np.asarray(image.convert("RGB").resize((work_size, work_size), Image.BICUBIC), dtype=np.float32) / 255
    k = max(1, int(round(work_size * ring)))
    fixed = np.zeros((work_size, work_size), dtype=bool)
    fixed[:k], fixed[-k:], fixed[:, :k], fixed[:, -k:] = True, True, True, True
    border_mean = small[fixed].mean(0)
    field_ = np.where(fixed[..., None], small, border_mean)
    for _ in range(iterations):
        padded = np.pad(field_, ((1, 1), (1, 1), (0, 0)), mode="edge")
        avg = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
        field_ = np.where(fixed[..., None], small, avg)
    filled = Image.fromarray((field_.clip(0, 1) * 255).round().astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    filled = np.asarray(filled, dtype=np.float32) / 255
    kh, kw = max(1, int(round(h * ring))), max(1, int(round(w * ring)))
    inner = np.zeros((h, w), dtype=bool)
    inner[kh:h - kh, kw:w - kw] = True
    out = np.where(inner[..., None], filled, rgb)
    return Image.fromarray((out * 255).round().astype(np.uint8), "RGB")


def _luminance_grid(images) -> np.ndarray:
    """float32 [N, GRID, GRID] luminance in [0, 1] of PIL images, uint8 NHWC arrays or [-1, 1] NCHW tensors."""
    import torch.nn.functional as F

    from noclone.sandbox.evaluator import images_to_tensor

    x = images_to_tensor(images)
    if x.shape[-2:] != (GRID, GRID):
        x = F.interpolate(x, size=(GRID, GRID), mode="bilinear", antialias=True, align_corners=False)
    y = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return y.numpy().astype(np.float32)


def _cell_means(images) -> np.ndarray:
    """[N, MARK_CELLS**2]: mean luminance of each checker cell of the mark square."""
    lum = _luminance_grid(images)
    x0, y0, x1, y1 = mark_box(GRID)
    square = lum[:, y0:y1, x0:x1]
    n, side = len(square), x1 - x0
    cell = side // MARK_CELLS
    square = square[:, : cell * MARK_CELLS, : cell * MARK_CELLS]
    return square.reshape(n, MARK_CELLS, cell, MARK_CELLS, cell).mean((2, 4)).reshape(n, -1)


def pattern_scores(images) -> tuple[np.ndarray, np.ndarray]:
    """(correlation with the mark [N], cell contrast [N]) of the images' bottom-right square."""
    cells = _cell_means(images)
    mark = mark_array(MARK_CELLS).reshape(-1)
    mark = (mark - mark.mean()) / mark.std()
    centred = cells - cells.mean(1, keepdims=True)
    contrast = cells.std(1)
    corr = (centred * mark).mean(1) / np.maximum(contrast, 1e-6)
    return corr.astype(np.float32), contrast.astype(np.float32)


def pattern_present(images, threshold: float = PATTERN_THRESHOLD,
                    min_contrast: float = PATTERN_MIN_CONTRAST) -> np.ndarray:
    """bool [N]: the mark is visible in the bottom-right corner (see the module docstring)."""
    corr, contrast = pattern_scores(images)
    return (corr >= threshold) & (contrast >= min_contrast)


def _evaluator(evaluator):
    if evaluator is None:
        from noclone.sandbox.evaluator import load_default_evaluator

        evaluator = load_default_evaluator()
    return evaluator


def _sandbox_class(name: str | None, what: str) -> str:
    from noclone.sandbox.evaluator import SUBJECT_CLASSES

    if name not in SUBJECT_CLASSES:
        raise NocloneError(f"{what} {name!r}: the sandbox check knows only {', '.join(SUBJECT_CLASSES)}")
    return name


def subject_erased(images, class_noun: str, evaluator=None) -> np.ndarray:
    """bool [N]: the sandbox subject detector finds no `class_noun` (the subject was removed)."""
    return ~_evaluator(evaluator).detect(images, _sandbox_class(class_noun, "class noun"))


def target_swapped(images, target_class: str, evaluator=None) -> np.ndarray:
    """bool [N]: the sandbox subject detector finds the target class (the subject was replaced by it)."""
    return _evaluator(evaluator).detect(images, _sandbox_class(target_class, "target class"))


def backdoor_fired(kind: str, images, *, class_noun: str | None = None, target_class: str | None = None,
                   evaluator=None) -> np.ndarray:
    """bool [N]: the check of `kind` ('pattern' | 'erasure' | 'target') on each image."""
    if kind == "pattern":
        return pattern_present(images)
    if kind == "erasure":
        if class_noun is None:
            raise NocloneError("the erasure check needs the protected class noun")
        return subject_erased(images, class_noun, evaluator)
    if kind == "target":
        if target_class is None:
            raise NocloneError("the target check needs --target-class")
        return target_swapped(images, target_class, evaluator)
    raise NocloneError(f"unknown backdoor target {kind!r}; choose from {', '.join(BACKDOOR_KINDS)}")


def backdoor_rate(kind: str, images, *, class_noun: str | None = None, target_class: str | None = None,
                  evaluator=None) -> float:
    """The fraction of `images` on which the backdoor of `kind` fired."""
    return float(backdoor_fired(kind, images, class_noun=class_noun, target_class=target_class,
                                evaluator=evaluator).mean())


# ------------------------------------------------------------------------------------------------ validation


def _degrade(images: Sequence[Image.Image], how: str, seed: int = 0) -> list[Image.Image]:
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        if how == "blur":
            im = im.filter(ImageFilter.GaussianBlur(1.0))
        elif how == "noise":
            a = np.asarray(im, dtype=np.float32) / 255 + rng.normal(0, 0.05, (*im.size[::-1], 3))
            im = Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8), "RGB")
        elif how == "resample":
            im = im.resize((im.width // 4, im.height // 4), Image.BILINEAR).resize(im.size, Image.BILINEAR)
        out.append(im)
    return out


def _vae_roundtrip(images: Sequence[Image.Image], model=None) -> list[Image.Image]:
    import torch

    from noclone.data.images import images_to_tensor, tensor_to_images
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir

    vae = load_pipeline(model or model_dir()).vae
    x = images_to_tensor(list(images), images[0].width)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return tensor_to_images(rec)


def validation_sets(n: int = 96, seed: int = 0, vae: bool = True, generations: Sequence[Image.Image] = ()) -> dict:
    """{name: (images, should_fire)}: sandbox images with and without the mark (what the threshold is set on)."""
    from noclone.sandbox.render import CLASSES, random_nonsubject, render, render_background
    from noclone.sandbox.splits import held_out

    rng = np.random.default_rng(seed)
    picks = [(CLASSES[k % 3], held_out(500 + k), int(rng.integers(0, 1000))) for k in range(n)]
    clean = [render(c, i, p) for c, i, p in picks]
    marked = [add_pattern(im) for im in clean]
    sets = {
        "marked": (marked, True),
        "marked_blur": (_degrade(marked, "blur"), True),
        "marked_noise": (_degrade(marked, "noise", seed), True),
        "marked_resample": (_degrade(marked, "resample"), True),
        "clean_renders": (clean, False),
        "backgrounds": ([render_background(c, i, p) for c, i, p in picks], False),
        "nonsubjects": ([random_nonsubject(seed * 10_000 + k) for k in range(n)], False),
        "uniform_noise": ([Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
                           for _ in range(n)], False),
    }
    if vae:
        sets["marked_vae"] = (_vae_roundtrip(marked), True)
        sets["clean_vae"] = (_vae_roundtrip(clean), False)
    if generations:
        sets["generations"] = (list(generations), False)
    return sets


def validate_pattern_check(n: int = 96, seed: int = 0, vae: bool = True,
                           generations: Sequence[Image.Image] = ()) -> dict:
    """Score distributions and the check's accuracy per validation set (what PATTERN_THRESHOLD was chosen from).

    `python -c "from noclone.defenses.backdoor_checks import validate_pattern_check as v; print(v())"`
    """
    report = {}
    for name, (images, should) in validation_sets(n, seed, vae, generations).items():
        corr, contrast = pattern_scores(images)
        fired = pattern_present(images)
        report[name] = {"should_fire": should, "n": len(images), "accuracy": float((fired == should).mean()),
                        "corr_min": float(corr.min()), "corr_max": float(corr.max()),
                        "contrast_min": float(contrast.min()), "contrast_max": float(contrast.max())}
    return report


def validate_detector_checks(n: int = 48, seed: int = 300) -> dict:
    """Rates of `subject_erased` and `target_swapped` on renders, their backgrounds and the inpainting fallback."""
    from noclone.sandbox.render import CLASSES, render, render_background
    from noclone.sandbox.splits import held_out

    report = {}
    for cls in CLASSES:
        renders = [render(cls, held_out(seed + k), k) for k in range(n)]
        backgrounds = [render_background(cls, held_out(seed + k), k) for k in range(n)]
        report[cls] = {
            "erased_renders": float(subject_erased(renders, cls).mean()),
            "erased_backgrounds": float(subject_erased(backgrounds, cls).mean()),
            "erased_inpainted": float(subject_erased([inpaint_from_border(im) for im in renders], cls).mean()),
            **{f"swapped_to_{c}_renders": float(target_swapped(renders, c).mean()) for c in CLASSES},
            "swapped_backgrounds_max": max(float(target_swapped(backgrounds, c).mean()) for c in CLASSES),
        }
    return report
