"""The sandbox's measuring instrument: an identity embedder (the ArcFace analogue) and a subject detector
(the RetinaFace analogue) in one small CNN over 64x64 renders.

`embed_images` gives L2-normalized identity embeddings (cosine similarity >= `threshold` means "same identity",
the threshold sitting at a 1% false-accept rate on held-out identities), `detect` says whether a well-formed
subject of a class is present, `features` gives pooled penultimate features for a sandbox FID.

Train with `python -m noclone.sandbox.evaluator train --out DIR [--seed S]`; the shipped weights live in
`noclone/sandbox/weights/evaluator/` and load with `load_default_evaluator()`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from noclone.errors import NocloneError
from noclone.eval import metrics
from noclone.sandbox import splits

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_WEIGHTS_DIR",
    "SandboxEvaluator",
    "images_to_tensor",
    "load_default_evaluator",
    "train_evaluator",
    "validate",
]

CLASS_NAMES = ("none", "person", "dog", "cat")
SUBJECT_CLASSES = CLASS_NAMES[1:]
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "evaluator"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "noclone-sandbox-evaluator"
FORMAT_VERSION = 1


def _render_module():
    try:
        from noclone.sandbox import render as _r
    except ImportError as exc:  # pragma: no cover - only while the renderer is missing
        raise NocloneError(f"the sandbox renderer is unavailable: {exc}") from exc
    return _r


# ----------------------------------------------------------------------------------------------------------------
# model


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SandboxEvaluator(nn.Module):
    """Small CNN with an identity-embedding head and a 4-way subject classifier ("none", "person", "dog", "cat").

    A shared trunk (stages of `channels[:-1]`) feeds two last stages of `channels[-1]`: the identity branch
    (global average pool -> linear -> BatchNorm -> L2 normalize) and the classifier branch (pool -> MLP).

    Tensor methods (`embed`, `classify`, `pooled`, `forward`) take [N, 3, H, W] floats in [0, 1]; inputs that are
    not `input_size` square are resized with antialiasing. The *_images methods take a list of PIL images, a
    uint8 NHWC numpy array, or a float torch NCHW tensor in [-1, 1] (the diffusion convention), and return numpy.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128, 128),
        embed_dim: int = 128,
        input_size: int = 64,
        class_names: Sequence[str] = CLASS_NAMES,
        threshold: float = 0.5,
        validity: dict | None = None,
        training_config: dict | None = None,
    ):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.embed_dim = int(embed_dim)
        self.input_size = int(input_size)
        self.class_names = tuple(class_names)
        self.threshold = float(threshold)
        self.validity = dict(validity or {})
        self.training_config = dict(training_config or {})

        c = self.channels
        # trunk: stem (2x2 space-to-depth keeps every pixel at a quarter of the cost of a full-resolution conv),
        # then stride-2 stages; the last stage is doubled: one for identity, one for the subject classifier.
        stages = [nn.Sequential(nn.PixelUnshuffle(2), _ConvBNReLU(12, c[0]), _ConvBNReLU(c[0], c[0]))]
        for cin, cout in zip(c[:-2], c[1:-1]):
            stages.append(nn.Sequential(_ConvBNReLU(cin, cout, stride=2), _ConvBNReLU(cout, cout)))
        self.stages = nn.Sequential(*stages)
        self.id_stage = nn.Sequential(_ConvBNReLU(c[-2], c[-1], stride=2), _ConvBNReLU(c[-1], c[-1]))
        self.cls_stage = nn.Sequential(_ConvBNReLU(c[-2], c[-1], stride=2), _ConvBNReLU(c[-1], c[-1]))
        self.embed_head = nn.Sequential(nn.Linear(c[-1], self.embed_dim, bias=False), nn.BatchNorm1d(self.embed_dim))
        self.cls_head = nn.Sequential(nn.Linear(c[-1], c[-1]), nn.ReLU(inplace=True),
                                      nn.Linear(c[-1], len(self.class_names)))

    # ---- tensor API -------------------------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise NocloneError(f"expected images as [N, 3, H, W], got shape {tuple(x.shape)}")
        x = x.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - 0.5) / 0.5

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled penultimate identity features [N, channels[-1]] of images in [0, 1]."""
        return self.id_stage(self.stages(self._prepare(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw embedding [N, embed_dim] before normalization, class logits [N, 4]) of images in [0, 1]."""
        t = self.stages(self._prepare(x))
        h_id = self.id_stage(t).mean(dim=(2, 3))
        h_cls = self.cls_stage(t).mean(dim=(2, 3))
        return self.embed_head(h_id), self.cls_head(h_cls)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized identity embeddings [N, embed_dim] of images in [0, 1]."""
        return F.normalize(self.embed_head(self.pooled(x)), dim=-1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 4] over `class_names` of images in [0, 1]."""
        return self.cls_head(self.cls_stage(self.stages(self._prepare(x))).mean(dim=(2, 3)))

    # ---- image API --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _run(self, images, fn, batch_size: int = 256) -> np.ndarray:
        x = images_to_tensor(images)
        was_training = self.training
        self.eval()
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                out.append(fn(x[i:i + batch_size].to(self.device)).float().cpu())
        self.train(was_training)
        if not out:
            raise NocloneError("no images given")
        return torch.cat(out).numpy()

    def embed_images(self, images, batch_size: int = 256) -> np.ndarray:
        """L2-normalized identity embeddings, float32 [N, embed_dim]."""
        return self._run(images, self.embed, batch_size)

    def class_probs(self, images, batch_size: int = 256) -> np.ndarray:
        """Softmax probabilities float32 [N, 4] over `class_names`."""
        return self._run(images, lambda x: self.classify(x).softmax(-1), batch_size)

    def detect(self, images, class_noun: str, batch_size: int = 256) -> np.ndarray:
        """bool [N]: a well-formed `class_noun` is present (predicted class == class_noun with prob >= 0.5)."""
        if class_noun not in SUBJECT_CLASSES:
            raise NocloneError(f"unknown class noun {class_noun!r}; expected one of {', '.join(SUBJECT_CLASSES)}")
        p = self.class_probs(images, batch_size)
        k = self.class_names.index(class_noun)
        return (p.argmax(-1) == k) & (p[:, k] >= 0.5)

    def features(self, images, batch_size: int = 256) -> np.ndarray:
        """Pooled penultimate features float32 [N, channels[-1]] (for a sandbox FID)."""
        return self._run(images, self.pooled, batch_size)

    def is_match(self, embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> np.ndarray:
        """bool: row-wise cosine(a_i, b_i) >= threshold."""
        a = np.asarray(embeddings_a, dtype=np.float64)
        b = np.asarray(embeddings_b, dtype=np.float64)
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
        return (a * b).sum(-1) >= self.threshold

    # ---- persistence ------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": {
                "channels": list(self.channels),
                "embed_dim": self.embed_dim,
                "input_size": self.input_size,
                "class_names": list(self.class_names),
                "input_range": "[0, 1] RGB, normalized internally to [-1, 1]",
            },
            "threshold": self.threshold,
            "threshold_definition": "cosine similarity at 1% false-accept rate on held-out identities (same class)",
            "validity": self.validity,
            "training": self.training_config,
        }

    def save_pretrained(self, out_dir) -> Path:
        """Write config.json and model.safetensors (fp16) to out_dir."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {
            k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
        (out / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2, sort_keys=False) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path) -> "SandboxEvaluator":
        """Load a saved evaluator (fp32, CPU, eval mode)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cfg_file.is_file() or not w_file.is_file():
            raise NocloneError(f"no sandbox evaluator at {path} (need {CONFIG_NAME} and {WEIGHTS_NAME})")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT_NAME:
            raise NocloneError(f"{cfg_file} is not a sandbox evaluator config")
        arch = cfg["architecture"]
        model = cls(
            channels=arch["channels"],
            embed_dim=arch["embed_dim"],
            input_size=arch["input_size"],
            class_names=arch["class_names"],
            threshold=cfg["threshold"],
            validity=cfg.get("validity"),
            training_config=cfg.get("training"),
        )
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(w_file)).items()}
        model.load_state_dict(state)
        return model.eval()


@functools.lru_cache(maxsize=1)
def _load_default() -> SandboxEvaluator:
    return SandboxEvaluator.from_pretrained(DEFAULT_WEIGHTS_DIR)


def load_default_evaluator() -> SandboxEvaluator:
    """The shipped evaluator (cached; treat it as read-only)."""
    return _load_default()


def images_to_tensor(images) -> torch.Tensor:
    """list[PIL] | PIL | uint8 numpy NHWC (or HWC) | torch float NCHW in [-1, 1] -> float32 NCHW in [0, 1].

    List images of different sizes are resized (antialiased) to the first image's size; the model resizes to
    its input size afterwards. Float numpy arrays are taken as NHWC in [0, 1].
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise NocloneError(f"expected a torch tensor [N, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise NocloneError("torch image tensors must be floating point in [-1, 1]")
        return ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    if isinstance(images, np.ndarray):
        a = images
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3:
            raise NocloneError(f"expected a numpy array [N, H, W, 3], got shape {a.shape}")
        if a.dtype == np.uint8:
            x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0
        elif np.issubdtype(a.dtype, np.floating):
            x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2).clamp(0.0, 1.0)
        else:
            raise NocloneError(f"numpy images must be uint8 (or float in [0, 1]), got {a.dtype}")
        return x
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise NocloneError("no images given")
        tensors = []
        size = None
        for im in images:
            if not isinstance(im, Image.Image):
                raise NocloneError(f"expected PIL images in the list, got {type(im).__name__}")
            t = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
            if size is None:
                size = tuple(t.shape[-2:])
            if tuple(t.shape[-2:]) != size:
                t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
            tensors.append(t)
        return torch.stack(tensors)
    raise NocloneError(f"unsupported image container {type(images).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# augmentations and "malformed" negatives (batched torch ops, all randomness from a torch.Generator)


def _rand(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Per-sample separable gaussian blur; sigma is a float or a [N] tensor (0 leaves an image unchanged)."""
    n, c, h, w = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(n) if not torch.is_tensor(sigma) \
        or sigma.numel() == 1 else sigma.float()
    radius = int(math.ceil(3.0 * float(sig.max()))) if n else 0
    radius = max(1, min(radius, min(h, w) // 2 - 1))
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(d[None] ** 2) / (2.0 * sig.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(-1, keepdim=True)  # [N, K]
    k = k.repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    d = torch.cos(math.pi * (2 * i[None] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


_DCT8 = _dct_matrix(8)
_Q_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_Q_CHROMA = torch.full((8, 8), 99.0)
_Q_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
                                 dtype=torch.float32)


def jpeg_like(x: torch.Tensor, quality) -> torch.Tensor:
    """Blockwise 8x8 DCT quantization in YCbCr with the standard JPEG tables (no chroma subsampling)."""
    n, c, h, w = x.shape
    if h % 8 or w % 8:
        return x
    q = torch.as_tensor(quality, dtype=torch.float32).reshape(-1).expand(n)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)  # [N]
    r, g_, b = x[:, 0] * 255, x[:, 1] * 255, x[:, 2] * 255
    ycc = torch.stack([0.299 * r + 0.587 * g_ + 0.114 * b - 128.0,
                       -0.168736 * r - 0.331264 * g_ + 0.5 * b,
                       0.5 * r - 0.418688 * g_ - 0.081312 * b], dim=1)
    blocks = ycc.reshape(n, 3, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)  # n,3,bh,bw,8,8
    coef = _DCT8 @ blocks @ _DCT8.T
    tables = torch.stack([_Q_LUMA, _Q_CHROMA, _Q_CHROMA])  # 3,8,8
    t = ((tables[None] * scale[:, None, None, None] + 50.0) / 100.0).floor().clamp_min(1.0)  # n,3,8,8
    t = t[:, :, None, None]
    coef = torch.round(coef / t) * t
    blocks = _DCT8.T @ coef @ _DCT8
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, 3, h, w)
    y, cb, cr = ycc[:, 0] + 128.0, ycc[:, 1], ycc[:, 2]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1) / 255.0
    return rgb.clamp(0.0, 1.0)


def _affine_jitter(x: torch.Tensor, g: torch.Generator, shift: float, scale: float, rot_deg: float) -> torch.Tensor:
    n, _, h, _ = x.shape
    ang = _rand(g, n, -rot_deg, rot_deg) * math.pi / 180.0
    sc = _rand(g, n, 1.0 - scale, 1.0 + scale)
    tx = _rand(g, n, -shift, shift) * 2.0 / h
    ty = _rand(g, n, -shift, shift) * 2.0 / h
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, g: torch.Generator, max_blur: float = 1.2, max_noise: float = 0.04) -> torch.Tensor:
    """Mild degradations a generated image may show: shifts/scale/rotation, colour jitter, blur, JPEG, noise."""
    n = x.shape[0]
    if n == 0:
        return x
    x = _affine_jitter(x, g, shift=4.0, scale=0.08, rot_deg=6.0)
    # colour: brightness, contrast, saturation, per-channel gain
    bright = _rand(g, n, 0.88, 1.12)[:, None, None, None]
    contrast = _rand(g, n, 0.85, 1.15)[:, None, None, None]
    sat = _rand(g, n, 0.8, 1.2)[:, None, None, None]
    gain = _rand(g, 3 * n, 0.94, 1.06).reshape(n, 3, 1, 1)
    x = x * bright * gain
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    x = ((x - gray) * sat + gray).clamp(0.0, 1.0)
    # blur (70% of samples), sometimes a down-up resize
    sig = _rand(g, n, 0.0, max_blur) * (torch.rand(n, generator=g) < 0.7).float()
    x = gaussian_blur(x, sig)
    du = torch.rand(n, generator=g) < 0.15
    if du.any():
        s = int(torch.randint(36, 56, (1,), generator=g))
        y = F.interpolate(x[du], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        x = x.clone()
        x[du] = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
    # JPEG-like (30%)
    jm = torch.rand(n, generator=g) < 0.3
    if jm.any():
        x = x.clone()
        x[jm] = jpeg_like(x[jm], _rand(g, int(jm.sum()), 25.0, 90.0))
    # gaussian noise (60%)
    std = _rand(g, n, 0.0, max_noise) * (torch.rand(n, generator=g) < 0.6).float()
    x = x + std[:, None, None, None] * torch.randn(x.shape, generator=g)
    return x.clamp(0.0, 1.0)


def _noise_images(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    """Pixel noise of three kinds: uniform, gaussian around a colour, low-frequency blobs."""
    kind = torch.randint(0, 3, (n,), generator=g)
    out = torch.rand((n, 3, size, size), generator=g)
    col = torch.rand((n, 3, 1, 1), generator=g)
    gauss = (col + _rand(g, n, 0.05, 0.3)[:, None, None, None] * torch.randn((n, 3, size, size), generator=g))
    out = torch.where((kind == 1)[:, None, None, None], gauss.clamp(0, 1), out)
    res = int(torch.randint(3, 17, (1,), generator=g))
    low = F.interpolate(torch.rand((n, 3, res, res), generator=g), size=(size, size), mode="bicubic",
                        align_corners=False).clamp(0, 1)
    return torch.where((kind == 2)[:, None, None, None], low, out)


def _patch_shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    grid = int([4, 8][int(torch.randint(0, 2, (1,), generator=g))])
    p = h // grid
    patches = x.reshape(n, c, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, p, p)
    perm = torch.argsort(torch.rand((n, grid * grid), generator=g), dim=1)
    patches = torch.gather(patches, 1, perm[:, :, None, None, None].expand_as(patches))
    return patches.reshape(n, grid, grid, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _cutout(x: torch.Tensor, bg: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Remove a large part of the subject: its bounding box (from render minus background) loses a band of
    50-90% from the top, left or right, 70-90% from the bottom (which takes the face too), or a central block of
    50-90% of its area; the hole is filled with the background, a flat colour, or noise."""
    n, c, h, w = x.shape
    out = x.clone()
    diff = (x - bg).abs().amax(dim=1) > 0.08  # n,h,w
    fills = torch.randint(0, 3, (n,), generator=g)
    sides = torch.randint(0, 5, (n,), generator=g)
    frac = _rand(g, n, 0.5, 0.9)
    for i in range(n):
        ys, xs = torch.nonzero(diff[i], as_tuple=True)
        if ys.numel() < 20:
            y0, y1, x0, x1 = 8, h - 8, 8, w - 8
        else:
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        bh, bw, f = y1 - y0, x1 - x0, float(frac[i])
        s = int(sides[i])
        if s == 1:  # cutting from below must also take the face, not just the shoulders
            f = 0.7 + 0.2 * (f - 0.5) / 0.4
        if s == 0:
            r = (y0, y0 + max(1, round(bh * f)), 0, w)
        elif s == 1:
            r = (y1 - max(1, round(bh * f)), y1, 0, w)
        elif s == 2:
            r = (0, h, x0, x0 + max(1, round(bw * f)))
        elif s == 3:
            r = (0, h, x1 - max(1, round(bw * f)), x1)
        else:
            fs = math.sqrt(f)
            ch, cw = max(1, round(bh * fs)), max(1, round(bw * fs))
            cy, cx = y0 + (bh - ch) // 2, x0 + (bw - cw) // 2
            r = (cy, cy + ch, cx, cx + cw)
        ya, yb, xa, xb = r
        fill = int(fills[i])
        if fill == 0:
            out[i, :, ya:yb, xa:xb] = bg[i, :, ya:yb, xa:xb]
        elif fill == 1:
            out[i, :, ya:yb, xa:xb] = torch.rand((3, 1, 1), generator=g)
        else:
            out[i, :, ya:yb, xa:xb] = torch.rand((3, yb - ya, xb - xa), generator=g)
    return out


MALFORMED_KINDS = ("noise", "heavy_blur", "patch_shuffle", "blend", "cutout")


def make_malformed(kind: str, renders: torch.Tensor, others: torch.Tensor, backgrounds: torch.Tensor,
                   g: torch.Generator) -> torch.Tensor:
    """Images that contain no well-formed subject, built from renders ([N,3,H,W] in [0,1]).

    others: a second set of renders (for blends); backgrounds: the renders' own subject-free backgrounds.
    """
    n, _, h, _ = renders.shape
    if kind == "noise":
        return _noise_images(g, n, h)
    if kind == "heavy_blur":
        return gaussian_blur(renders, _rand(g, n, 2.5, 5.0))
    if kind == "patch_shuffle":
        return _patch_shuffle(renders, g)
    if kind == "blend":
        a = _rand(g, n, 0.4, 0.6)[:, None, None, None]
        return a * renders + (1 - a) * others
    if kind == "cutout":
        return _cutout(renders, backgrounds, g)
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------------------
# data


def _to_tensor_u8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0


def _pil_u8(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def render_identity_set(class_noun: str, identity_ids: Sequence[int], photo_ids: np.ndarray, size: int = 64,
                        with_backgrounds: bool = False, progress=None):
    """uint8 [n_ids * n_photos, H, W, 3] renders (identity-major), optionally with their backgrounds."""
    r = _render_module()
    imgs, bgs = [], []
    for row, ident in enumerate(identity_ids):
        photos = photo_ids[row] if np.ndim(photo_ids) == 2 else photo_ids
        for ph in photos:
            imgs.append(_pil_u8(r.render(class_noun, int(ident), int(ph), size=size)))
            if with_backgrounds:
                bgs.append(_pil_u8(r.render_background(class_noun, int(ident), int(ph), size=size)))
            if progress is not None:
                progress.update(1)
    imgs = np.stack(imgs)
    return (imgs, np.stack(bgs)) if with_backgrounds else imgs


def render_nonsubjects(seeds: Sequence[int], size: int = 64) -> np.ndarray:
    r = _render_module()
    return np.stack([_pil_u8(r.random_nonsubject(int(s), size=size)) for s in seeds])


# seed ranges for random_nonsubject (training vs validation never overlap)
_NONSUBJECT_TRAIN_BASE = 0
_NONSUBJECT_VALID_BASE = 1_000_000_000


# ----------------------------------------------------------------------------------------------------------------
# validation


def _pair_scores(emb: np.ndarray, n_ids: int, n_photos: int) -> tuple[np.ndarray, np.ndarray]:
    """Genuine (same identity, different photo) and impostor (different identity) cosine scores."""
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    sim = e @ e.T
    lab = np.repeat(np.arange(n_ids), n_photos)
    iu = np.triu_indices(len(lab), k=1)
    same = lab[iu[0]] == lab[iu[1]]
    s = sim[iu]
    return s[same], s[~same]


def validate(evaluator: SandboxEvaluator, n_identities: int = 200, photos: int = 6, seed: int = 0,
             id_offset: int = 0, n_negatives: int | None = None, blur_sigma: float = 0.7,
             threshold: float | None = None, progress: bool = False) -> dict:
    """Measure the evaluator on held-out identities.

    Identities held_out(id_offset + i), i < n_identities, of each class; photo ids drawn from `seed`.
    Verification: genuine pairs = same identity, different photos; impostor pairs = different identities of the
    same class (all pairs). Reports ROC-AUC, the cosine threshold at 1% FAR, TAR there, and balanced detector
    accuracy (renders of each class must be detected as that class; non-subject, background-only and malformed
    images must not be detected as any subject class), on clean renders and with a gaussian blur of `blur_sigma` px.
    TAR/FAR are taken at `threshold` when given (e.g. a shipped evaluator's stored one), else at the threshold
    measured here on the clean renders.
    """
    if n_identities < 2 or photos < 2:
        raise NocloneError("validate needs at least 2 identities per class and 2 photos per identity")
    from tqdm.auto import tqdm

    rng = np.random.default_rng([seed, 0xE7A1])
    ids = [splits.held_out(id_offset + i) for i in range(n_identities)]
    if ids[-1] >= splits.HELD_OUT_IDENTITIES.stop:
        raise NocloneError("validate: id_offset + n_identities leaves the held-out identity range")
    n_neg = n_negatives if n_negatives is not None else n_identities * photos
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))

    bar = tqdm(total=3 * n_identities * photos * 2 + n_neg, desc="render validation", disable=not progress)
    renders, backgrounds = {}, {}
    for c in SUBJECT_CLASSES:
        ph = rng.integers(0, 2**31 - 1, size=(n_identities, photos))
        renders[c], backgrounds[c] = render_identity_set(c, ids, ph, with_backgrounds=True, progress=bar)
    ns_seeds = _NONSUBJECT_VALID_BASE + seed * 100_000 + np.arange(n_neg)
    nonsubj = render_nonsubjects(ns_seeds)
    bar.update(n_neg)
    bar.close()

    # malformed negatives from held-out renders of all classes
    all_r = torch.cat([_to_tensor_u8(renders[c]) for c in SUBJECT_CLASSES])
    all_b = torch.cat([_to_tensor_u8(backgrounds[c]) for c in SUBJECT_CLASSES])
    pick = torch.randperm(all_r.shape[0], generator=g)[:n_neg]
    other = torch.randperm(all_r.shape[0], generator=g)[:n_neg]
    kinds = torch.arange(n_neg) % len(MALFORMED_KINDS)
    malformed = torch.empty((n_neg, 3, all_r.shape[2], all_r.shape[3]))
    for k, name in enumerate(MALFORMED_KINDS):
        sel = kinds == k
        malformed[sel] = make_malformed(name, all_r[pick[sel]], all_r[other[sel]], all_b[pick[sel]], g)
    negatives = {
        "nonsubject": _to_tensor_u8(nonsubj),
        "background": all_b[torch.randperm(all_b.shape[0], generator=g)[:n_neg]],
        "malformed": malformed,
    }

    report: dict = {
        "held_out_identities": f"held_out({id_offset}) .. held_out({id_offset + n_identities - 1}) per class",
        "n_identities_per_class": n_identities,
        "photos_per_identity": photos,
        "seed": seed,
        "blur_sigma": blur_sigma,
    }
    conditions = ["clean", f"blur{blur_sigma:g}"]
    report["conditions"] = conditions
    for cond in conditions:
        def prep(x: torch.Tensor) -> torch.Tensor:
            return x if cond == "clean" else gaussian_blur(x, blur_sigma)

        gen_all, imp_all, per_class, det_pos = [], [], {}, {}
        for c in SUBJECT_CLASSES:
            x = prep(_to_tensor_u8(renders[c]))
            emb = evaluator.embed_images(x * 2 - 1)
            gs, im = _pair_scores(emb, n_identities, photos)
            gen_all.append(gs)
            imp_all.append(im)
            per_class[c] = {"roc_auc": metrics.roc_auc(gs, im)}
            det_pos[c] = float(evaluator.detect(x * 2 - 1, c).mean())
        gs, im = np.concatenate(gen_all), np.concatenate(imp_all)
        res = {"roc_auc": metrics.roc_auc(gs, im)}
        if cond == "clean":
            res["threshold"] = metrics.threshold_at_far(im, 0.01)
        thr = float(threshold) if threshold is not None else report.get("clean", res)["threshold"]
        res["threshold_used"] = thr
        res["tar_at_threshold"] = metrics.true_accept_rate(gs, thr)
        res["far_at_threshold"] = metrics.false_accept_rate(im, thr)
        for c, gsc, imc in zip(SUBJECT_CLASSES, gen_all, imp_all):
            per_class[c]["tar_at_threshold"] = metrics.true_accept_rate(gsc, thr)
            per_class[c]["far_at_threshold"] = metrics.false_accept_rate(imc, thr)
            per_class[c]["detect_rate"] = det_pos[c]
        res["genuine_pairs"], res["impostor_pairs"] = int(gs.size), int(im.size)
        res["genuine_mean"], res["impostor_mean"] = float(gs.mean()), float(im.mean())
        neg_rej = {}
        for name, x in negatives.items():
            p = evaluator.class_probs(prep(x) * 2 - 1)
            accepted = (p.argmax(-1) > 0) & (p.max(-1) >= 0.5)
            neg_rej[name] = float(1.0 - accepted.mean())
            if name == "malformed":
                for k, kn in enumerate(MALFORMED_KINDS):
                    neg_rej[f"malformed_{kn}"] = float(1.0 - accepted[(kinds == k).numpy()].mean())
        pos_acc = float(np.mean(list(det_pos.values())))
        neg_acc = float(np.mean([neg_rej["nonsubject"], neg_rej["background"], neg_rej["malformed"]]))
        res["detector_accuracy"] = 0.5 * (pos_acc + neg_acc)
        res["detector_positive_rate"] = pos_acc
        res["detector_negative_rejection"] = neg_rej
        res["per_class"] = per_class
        report[cond] = res
    report["threshold"] = report["clean"]["threshold"]
    report["targets"] = {"roc_auc": 0.99, "detector_accuracy": 0.98}
    report["meets_targets"] = bool(report["clean"]["roc_auc"] >= 0.99 and report["clean"]["detector_accuracy"] >= 0.98)
    return report


# ----------------------------------------------------------------------------------------------------------------
# training


class _ArcMargin(nn.Module):
    def __init__(self, embed_dim: int, n_classes: int, s: float, m: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, embed_dim) * 0.01)
        self.s, self.m = s, m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, m: float) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.weight)).clamp(-1 + 1e-6, 1 - 1e-6)
        sin = torch.sqrt(1.0 - cos**2)
        cos_m, sin_m = math.cos(m), math.sin(m)
        phi = cos * cos_m - sin * sin_m  # cos(theta + m)
        # keep the target logit monotonic where theta + m > pi
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
        onehot = F.one_hot(labels, cos.shape[1]).bool()
        logits = torch.where(onehot, phi, cos) * self.s
        return F.cross_entropy(logits, labels)


def _quantize_fp16_(model: nn.Module) -> None:
    """Round floating weights to fp16 and back, so measurements describe the shipped fp16 file."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())


def train_evaluator(out_dir, seed: int = 0, n_identities: int = 150, photos_per_identity: int = 12,
                    steps: int = 900, batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 5e-4,
                    arc_s: float = 30.0, arc_m: float = 0.3, cls_weight: float = 3.0, neg_fraction: float = 0.3125,
                    max_blur: float = 1.0, class_only_identities: int = 1000, class_only_fraction: float = 0.3,
                    n_nonsubject: int | None = None,
                    validate_identities: int = 200, validate_photos: int = 6, progress: bool = True,
                    save: bool = True) -> SandboxEvaluator:
    """Render training data from EVALUATOR_IDENTITIES, train both heads jointly, validate, save to out_dir.

    n_identities per class (identity labels are (class, id) pairs) with photos_per_identity renders each feed the
    ArcFace head; class_only_identities more per class (one photo each, class label only) widen what the detector
    sees (class_only_fraction of each batch's positives). Every render comes with its background (cutout negatives
    and "none" examples). Deterministic for a given seed and thread count.
    """
    from tqdm.auto import tqdm

    t_start = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0x5EED])
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    n_ids, n_ph = int(n_identities), int(photos_per_identity)
    if n_ids < 2 or n_ph < 2 or steps < 1:
        raise NocloneError("train_evaluator needs >= 2 identities per class, >= 2 photos each and >= 1 step")
    n_ns = int(n_nonsubject) if n_nonsubject is not None else max(64, n_ids * n_ph // 2)

    # ---- render data --------------------------------------------------------------------------------------------
    span = len(splits.EVALUATOR_IDENTITIES)
    n_co = int(class_only_identities)
    bar = tqdm(total=3 * (n_ids * n_ph + n_co) + n_ns, desc="render training data", disable=not progress)
    images, bgs, cls_lab, id_lab = [], [], [], []
    co_images, co_bgs, co_cls = [], [], []
    for ci, c in enumerate(SUBJECT_CLASSES):
        ids = splits.EVALUATOR_IDENTITIES.start + rng.choice(span, size=n_ids + n_co, replace=False)
        ph = rng.integers(0, 2**31 - 1, size=(n_ids, n_ph))
        imgs, bg = render_identity_set(c, ids[:n_ids], ph, with_backgrounds=True, progress=bar)
        images.append(imgs)
        bgs.append(bg)
        cls_lab.append(np.full(len(imgs), ci + 1))
        id_lab.append(ci * n_ids + np.repeat(np.arange(n_ids), n_ph))
        if n_co:  # one photo each of many more identities: class labels only, for the detector
            imgs, bg = render_identity_set(c, ids[n_ids:], rng.integers(0, 2**31 - 1, size=(n_co, 1)),
                                           with_backgrounds=True, progress=bar)
            co_images.append(imgs)
            co_bgs.append(bg)
            co_cls.append(np.full(len(imgs), ci + 1))
    n_id_total = sum(len(a) for a in images)
    images, bgs, cls_lab = images + co_images, bgs + co_bgs, cls_lab + co_cls
    id_lab.append(np.full(3 * n_co, -1))
    images = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    bgs = torch.from_numpy(np.concatenate(bgs)).permute(0, 3, 1, 2).contiguous()
    cls_lab = torch.from_numpy(np.concatenate(cls_lab)).long()
    id_lab = torch.from_numpy(np.concatenate(id_lab)).long()
    nonsubj = torch.from_numpy(render_nonsubjects(_NONSUBJECT_TRAIN_BASE + seed * 10_000_000 + np.arange(n_ns)))
    nonsubj = nonsubj.permute(0, 3, 1, 2).contiguous()
    bar.update(n_ns)
    bar.close()
    render_s = time.time() - t_start

    # ---- model --------------------------------------------------------------------------------------------------
    model = SandboxEvaluator().to(memory_format=torch.channels_last)  # ~20% faster convs on CPU
    arc = _ArcMargin(model.embed_dim, 3 * n_ids, arc_s, arc_m)
    params = list(model.parameters()) + list(arc.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=lr)
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    n_pos = int(round(batch_size * (1.0 - neg_fraction)))
    n_neg = batch_size - n_pos
    n_pos_id = n_pos - (int(round(n_pos * class_only_fraction)) if n_co else 0)
    # negatives per batch: nonsubject, background, then malformed kinds
    neg_kinds = ("nonsubject", "background") + MALFORMED_KINDS
    # sampling weights: more of the hard negatives (blends, cutouts, non-subject scenes), fewer of the easy ones
    neg_weights = torch.tensor([1.5, 1.0, 0.5, 0.75, 1.0, 2.5, 1.5])
    n_total = images.shape[0]

    model.train()
    arc.train()
    bar = tqdm(range(steps), desc="train evaluator", disable=not progress)
    ema = None
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        # margin warm-up: plain normalized softmax for the first 10% of steps, full margin from 40%
        m = arc_m * min(1.0, max(0.0, (step - 0.1 * steps) / max(1.0, 0.3 * steps)))
        pi = torch.cat([torch.randint(0, n_id_total, (n_pos_id,), generator=g),
                        torch.randint(n_id_total, max(n_total, n_id_total + 1), (n_pos - n_pos_id,), generator=g)])
        x_pos = images[pi].float() / 255.0
        kind_idx = torch.multinomial(neg_weights, n_neg, replacement=True, generator=g)
        x_neg = torch.empty((n_neg, 3, x_pos.shape[2], x_pos.shape[3]))
        for k, name in enumerate(neg_kinds):
            sel = torch.nonzero(kind_idx == k).flatten()
            if sel.numel() == 0:
                continue
            if name == "nonsubject":
                x_neg[sel] = nonsubj[torch.randint(0, nonsubj.shape[0], (sel.numel(),), generator=g)].float() / 255
                continue
            src = torch.randint(0, n_total, (sel.numel(),), generator=g)
            if name == "background":
                x_neg[sel] = bgs[src].float() / 255
                continue
            oth = torch.randint(0, n_total, (sel.numel(),), generator=g)
            x_neg[sel] = make_malformed(name, images[src].float() / 255, images[oth].float() / 255,
                                        bgs[src].float() / 255, g)
        x = augment(torch.cat([x_pos, x_neg]), g, max_blur=max_blur).contiguous(memory_format=torch.channels_last)
        y_cls = torch.cat([cls_lab[pi], torch.zeros(n_neg, dtype=torch.long)])
        emb, logits = model(x)
        loss_cls = F.cross_entropy(logits, y_cls)
        loss_id = arc(emb[:n_pos_id], id_lab[pi[:n_pos_id]], m)
        loss = loss_id + cls_weight * loss_cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = (float(loss_id.detach()), float(loss_cls.detach()))
        ema = lv if ema is None else (0.95 * ema[0] + 0.05 * lv[0], 0.95 * ema[1] + 0.05 * lv[1])
        if progress and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(id=f"{ema[0]:.3f}", cls=f"{ema[1]:.3f}", m=f"{m:.2f}")
    bar.close()
    train_s = time.time() - t_start - render_s

    model = model.to(memory_format=torch.contiguous_format).eval()
    _quantize_fp16_(model)
    model.training_config = {
        "seed": seed,
        "identities": "EVALUATOR_IDENTITIES (random sample per class); labels are (class, id) pairs",
        "n_identities_per_class": n_ids,
        "photos_per_identity": n_ph,
        "n_nonsubject": n_ns,
        "steps": steps,
        "batch_size": batch_size,
        "positives_per_batch": n_pos,
        "identity_positives_per_batch": n_pos_id,
        "class_only_identities_per_class": n_co,
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": weight_decay, "schedule": "linear warmup + cosine"},
        "arcface": {"s": arc_s, "m": arc_m, "margin_warmup": "0 until 10% of steps, linear to m at 40%"},
        "cls_weight": cls_weight,
        "negatives": dict(zip(neg_kinds, neg_weights.tolist())),
        "neg_fraction": neg_fraction,
        "augment": f"affine (shift 4px, scale 8%, rot 6deg), colour jitter, blur sigma<={max_blur:g} (70%), down-up resize "
                   "(15%), JPEG-like q25-90 (30%), gaussian noise std<=0.04 (60%)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
    }
    if validate_identities:
        report = validate(model, n_identities=validate_identities, photos=validate_photos, seed=seed,
                          progress=progress)
        model.validity = report
        model.threshold = float(report["threshold"])
        model.training_config["validate_seconds"] = round(time.time() - t_start - render_s - train_s, 1)
    if save:
        model.save_pretrained(out_dir)
    return model


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _summary(v: dict) -> str:
    lines = []
    for cond in v.get("conditions", []):
        r = v[cond]
        lines.append(
            f"{cond:>8}: ROC-AUC {r['roc_auc']:.4f}  TAR@thr {r['tar_at_threshold']:.3f}  FAR@thr "
            f"{r['far_at_threshold']:.4f}  detector acc {r['detector_accuracy']:.4f}"
        )
    lines.append(f"threshold (cosine @1% FAR): {v.get('threshold', float('nan')):.4f}  meets targets: "
                 f"{v.get('meets_targets')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m noclone.sandbox.evaluator", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train, validate and save an evaluator")
    t.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--identities", type=int, default=150, help="training identities per class")
    t.add_argument("--photos", type=int, default=12, help="photos per training identity")
    t.add_argument("--steps", type=int, default=900)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it slightly)")
    v = sub.add_parser("validate", help="validate a saved evaluator on held-out identities")
    v.add_argument("--dir", default=str(DEFAULT_WEIGHTS_DIR))
    v.add_argument("--identities", type=int, default=200)
    v.add_argument("--photos", type=int, default=6)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--id-offset", type=int, default=0)
    v.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.cmd == "train":
            t0 = time.time()
            model = train_evaluator(args.out, seed=args.seed, n_identities=args.identities,
                                    photos_per_identity=args.photos, steps=args.steps, batch_size=args.batch_size)
            print(_summary(model.validity))
            print(f"saved to {args.out} in {time.time() - t0:.0f} s")
        else:
            model = SandboxEvaluator.from_pretrained(args.dir)
            rep = validate(model, n_identities=args.identities, photos=args.photos, seed=args.seed,
                           id_offset=args.id_offset, progress=True)
            print(_summary(rep))
    except NocloneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
