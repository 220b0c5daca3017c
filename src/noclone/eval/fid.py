"""FID and KID between two image sets, on Inception-v3 pool features (or any [N, D] features).

Inception features need a weights file supplied by the user (nothing is downloaded):

* ``pt_inception-2015-12-05-*.pth``: pytorch-fid's port of the TensorFlow FID Inception (1008-way ``fc``; the
  FID variant of the blocks: average pools that ignore padding, max pool in the last block). This is the network
  behind published FID numbers.
* a torchvision ``inception_v3`` ImageNet state dict (1000-way ``fc``; standard blocks). Not comparable to
  published FIDs, but a valid feature extractor.

Either may be ``.safetensors`` (preferred: no code execution) or a pickle ``.pth``/``.pt``, which is read only when
``allow_pickle=True`` (``--allow-pickle``) and then with ``torch.load(weights_only=True)``.

Images are turned into [0, 1] tensors at their own size, resized to 299x299 bilinearly (``align_corners=False``,
no antialiasing) and scaled to [-1, 1], as pytorch-fid does; features are the 2048-d global average pool after
``Mixed_7c``. The Inception module names equal torchvision's, so its state dicts load as they are.

KID (Binkowski et al. 2018) is the unbiased MMD^2 estimate with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (as ``torch-fidelity``/clean-fid do).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from noclone.errors import NocloneError

__all__ = [
    "InceptionFeatures",
    "inception_features",
    "kid",
    "load_inception",
    "polynomial_mmd2_unbiased",
]


# ------------------------------------------------------------------------------------------------------- KID


def _features(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise NocloneError(f"{name}: expected a non-empty [N, D] feature array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise NocloneError(f"{name}: features contain NaN or infinite values")
    return a


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0,
                             gamma: float | None = None) -> float:
    """Unbiased MMD^2 between samples x [m, d] and y [n, d] (m, n >= 2) with k(a, b) = (gamma a.b + coef0)^degree,
    gamma = 1/d by default: mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)."""
    x = _features(x, "x")
    y = _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise NocloneError(f"kid: feature dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise NocloneError("kid: each feature set needs at least 2 samples")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    kxx = (g * x @ x.T + coef0) ** degree
    kyy = (g * y @ y.T + coef0) ** degree
    kxy = (g * x @ y.T + coef0) ** degree
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(feats_a, feats_b, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased polynomial MMD^2 over ``n_subsets`` random subsets of
    ``subset_size`` samples drawn without replacement from each set. When either set has at most ``subset_size``
    samples, subsets cannot vary: the estimate over the whole sets is returned with std 0."""
    a = _features(feats_a, "feats_a")
    b = _features(feats_b, "feats_b")
    size = min(int(subset_size), len(a), len(b))
    if size < 2:
        raise NocloneError("kid: each feature set needs at least 2 samples")
    if size >= len(a) and size >= len(b):
        return polynomial_mmd2_unbiased(a, b), 0.0
    rng = np.random.default_rng(seed)
    vals = [polynomial_mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                                     b[rng.choice(len(b), size, replace=False)]) for _ in range(int(n_subsets))]
    return float(np.mean(vals)), float(np.std(vals))


# ------------------------------------------------------------------------------------------------------- Inception


class _Conv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _pool(x, fid: bool):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool_features: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool(x, self.fid)),
        ], 1)


class _BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_pool(x, self.fid))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool  # "avg" (torchvision), "avg_fid" (no padded zeros), "max" (FID Mixed_7c)
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            p = _pool(x, self.pool == "avg_fid")
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class InceptionFeatures(nn.Module):
    """Inception-v3 up to the 2048-d global average pool, with torchvision's module names.

    ``variant="fid"`` is the TensorFlow FID network (pytorch-fid's ``fid_inception_v3``), ``"torchvision"`` the
    ImageNet ``inception_v3``. ``forward`` takes [N, 3, H, W] in [0, 1].
    """

    def __init__(self, variant: str = "fid"):
        super().__init__()
        if variant not in ("fid", "torchvision"):
            raise NocloneError(f"unknown Inception variant {variant!r}; expected fid or torchvision")
        fid = variant == "fid"
        self.variant = variant
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b = _BlockA(192, 32, fid)
        self.Mixed_5c = _BlockA(256, 64, fid)
        self.Mixed_5d = _BlockA(288, 64, fid)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128, fid)
        self.Mixed_6c = _BlockC(768, 160, fid)
        self.Mixed_6d = _BlockC(768, 160, fid)
        self.Mixed_6e = _BlockC(768, 192, fid)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, "avg_fid" if fid else "avg")
        self.Mixed_7c = _BlockE(2048, "max" if fid else "avg")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _read_state_dict(path: Path, allow_pickle: bool) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise NocloneError(f"{path}: not a readable safetensors file ({' '.join(str(exc).split())[:200]})") from None
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        if not allow_pickle:
            raise NocloneError(f"{path}: a pickle checkpoint can run code when loaded; pass --allow-pickle to read it "
                               "(with torch.load(weights_only=True)), or convert it to .safetensors")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise NocloneError(f"{path}: cannot load ({' '.join(str(exc).split())[:200]})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise NocloneError(f"{path}: expected a state dict, got {type(state).__name__}")
        return state
    raise NocloneError(f"{path}: unsupported weights file type {path.suffix!r} (use .safetensors or .pth)")


@functools.lru_cache(maxsize=1)
def _load_inception(path: str, allow_pickle: bool, variant: str) -> InceptionFeatures:
    p = Path(path)
    if not p.is_file():
        raise NocloneError(f"{p}: no such Inception weights file")
    state = _read_state_dict(p, allow_pickle)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if variant == "auto":
        fc = state.get("fc.weight")
        if fc is None:
            raise NocloneError(f"{p}: no fc.weight to tell the FID Inception (1008 classes) from torchvision's "
                               "(1000); not an Inception-v3 state dict?")
        variant = {1008: "fid", 1000: "torchvision"}.get(int(fc.shape[0]))
        if variant is None:
            raise NocloneError(f"{p}: fc has {fc.shape[0]} outputs; expected 1008 (FID Inception) or 1000 (torchvision)")
    model = InceptionFeatures(variant)
    own = model.state_dict()
    features = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    missing = [k for k in own if k not in features and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in features if k not in own]
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "")
        raise NocloneError(f"{p}: not a torchvision-layout Inception-v3 state dict ({detail})")
    for k, v in features.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise NocloneError(f"{p}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in features.items()}, strict=False)
    return model.eval()


def load_inception(path: str | Path, allow_pickle: bool = False, variant: str = "auto") -> InceptionFeatures:
    """Load Inception-v3 feature layers from a state dict file (cached). ``variant`` "auto" reads it from fc's size."""
    return _load_inception(str(Path(path)), bool(allow_pickle), variant)


@torch.no_grad()
def inception_features(model: InceptionFeatures, images: Sequence, batch_size: int = 8) -> np.ndarray:
    """2048-d pool features (float64 [N, 2048]) of PIL images / uint8 arrays of any sizes."""
    images = list(images)
    if not images:
        raise NocloneError("no images given")
    out = []
    for i in range(0, len(images), batch_size):
        xs = []
        for im in images[i:i + batch_size]:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im))
            a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            xs.append(F.interpolate(a, size=(299, 299), mode="bilinear", align_corners=False))
        out.append(model(torch.cat(xs)).double().numpy())
    return np.concatenate(out)
