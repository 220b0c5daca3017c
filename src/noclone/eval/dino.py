"""DINO and CLIP-I subject fidelity: mean cosine similarity over all (reference, generated) pairs of image embeddings.

DreamBooth (Ruiz et al. 2023) reports DINO = the average pairwise cosine similarity between the ViT-S/16 DINO CLS
embeddings of generated and real images, and CLIP-I the same with CLIP image embeddings; Anti-DreamBooth and APDM
report the same quantities. Models are loaded from a local Hugging Face directory (never downloaded):

* DINO: a ``transformers`` ``ViTModel`` directory such as ``facebook/dino-vits16``; the embedding is the CLS token
  of the last hidden state (after the final LayerNorm, which is what DINO's own ``model(x)`` returns).
  Preprocessing is the DINO repository's evaluation transform that DreamBooth's authors point to: resize the
  shorter side to 256 (bicubic), centre-crop 224, ImageNet mean/std. (The ``ViTImageProcessor`` shipped with
  ``facebook/dino-vits16`` instead squashes the whole image to 224x224 bilinear; scores differ slightly.)
* CLIP-I: a ``CLIPModel``/``CLIPVisionModelWithProjection`` directory; the embedding is ``image_embeds``;
  preprocessing is CLIP's: shorter side to 224 (bicubic), centre-crop 224, CLIP mean/std.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noclone.errors import NocloneError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageEncoder",
    "load_image_encoder",
    "mean_pairwise_cosine",
    "preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# kind -> (resize shorter side to, crop, mean, std)
PREPROCESSING = {
    "dino": (256, 224, IMAGENET_MEAN, IMAGENET_STD),
    "clip": (224, 224, CLIP_MEAN, CLIP_STD),
}


def mean_pairwise_cosine(generated, references) -> float:
    """Mean over all (generated_i, reference_j) pairs of cosine(generated_i, reference_j)."""
    from noclone.eval.metrics import _embeddings, _l2n

    g = _l2n(_embeddings(generated, "generated"))
    r = _l2n(_embeddings(references, "references"))
    if g.shape[1] != r.shape[1]:
        raise NocloneError(f"generated embeddings have dimension {g.shape[1]} but references have {r.shape[1]}")
    return float((g @ r.T).mean())


def _resize_crop(image: Image.Image, short: int, crop: int) -> Image.Image:
    """torchvision ``Resize(short, BICUBIC)`` then ``CenterCrop(crop)`` on a PIL image."""
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def preprocess(images: Sequence, kind: str = "dino") -> torch.Tensor:
    """A float32 [N, 3, 224, 224] batch normalised for ``kind`` ("dino" or "clip")."""
    if kind not in PREPROCESSING:
        raise NocloneError(f"unknown image encoder kind {kind!r}; expected one of {', '.join(PREPROCESSING)}")
    short, crop, mean, std = PREPROCESSING[kind]
    arrays = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = Image.fromarray(np.asarray(im))
        arrays.append(np.asarray(_resize_crop(im, short, crop), dtype=np.float32) / 255.0)
    if not arrays:
        raise NocloneError("no images given")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


class ImageEncoder:
    """A loaded DINO ViT or CLIP vision tower; ``embed(images)`` gives float64 [N, D] embeddings (not normalised)."""

    def __init__(self, model: torch.nn.Module, kind: str, source: str = ""):
        self.model = model.eval()
        self.kind = kind
        self.source = source

    @torch.no_grad()
    def embed(self, images: Sequence, batch_size: int = 16) -> np.ndarray:
        images = list(images)
        if not images:
            raise NocloneError("no images given")
        out = []
        for i in range(0, len(images), batch_size):
            x = preprocess(images[i:i + batch_size], self.kind)
            if self.kind == "dino":
                h = self.model(pixel_values=x).last_hidden_state[:, 0]
            else:
                h = self.model(pixel_values=x).image_embeds
            out.append(h.float().cpu().numpy().astype(np.float64))
        return np.concatenate(out)

    def describe(self) -> dict:
        short, crop, mean, std = PREPROCESSING[self.kind]
        return {"model": self.source, "kind": self.kind,
                "preprocessing": f"shorter side {short} bicubic, centre crop {crop}, mean {list(mean)}, std {list(std)}"}


def _read_config(folder: Path) -> dict:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise NocloneError(f"{folder}: no config.json (expected a local Hugging Face model directory)")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise NocloneError(f"{cfg_file}: unreadable ({exc})") from None


class _ClipImageTower(torch.nn.Module):
    """The image half of a full ``CLIPModel``: ``image_embeds`` = visual_projection(pooled vision output)."""

    def __init__(self, clip):
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection

    def forward(self, pixel_values):
        from types import SimpleNamespace

        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return SimpleNamespace(image_embeds=self.visual_projection(pooled))


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass


@functools.lru_cache(maxsize=2)
def _load(path: str, kind: str | None) -> ImageEncoder:
    folder = Path(path)
    if not folder.is_dir():
        raise NocloneError(f"{folder}: no such model directory")
    cfg = _read_config(folder)
    model_type = cfg.get("model_type", "")
    if kind is None:
        kind = "clip" if model_type.startswith("clip") else "dino"
    _quiet_transformers()
    try:
        if kind == "dino":
            if model_type not in ("vit", "dino"):
                raise NocloneError(f"{folder}: model_type {model_type!r} is not a ViT (expected a "
                                   "facebook/dino-vits16-style ViTModel directory)")
            from transformers import ViTModel

            model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True)
        elif kind == "clip":
            if not model_type.startswith("clip"):
                raise NocloneError(f"{folder}: model_type {model_type!r} is not a CLIP model")
            if model_type == "clip":  # a full CLIP checkpoint: keep the vision tower and its projection
                from transformers import CLIPModel

                model = _ClipImageTower(CLIPModel.from_pretrained(str(folder), local_files_only=True))
            else:
                from transformers import CLIPVisionModelWithProjection

                model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        else:
            raise NocloneError(f"unknown image encoder kind {kind!r}; expected dino or clip")
    except NocloneError:
        raise
    except Exception as exc:
        raise NocloneError(f"{folder}: cannot load the {kind} model ({' '.join(str(exc).split())[:300]})") from None
    return ImageEncoder(model.float(), kind, str(folder))


def load_image_encoder(path: str | Path, kind: str | None = None) -> ImageEncoder:
    """Load a DINO ViT (kind "dino") or CLIP vision model (kind "clip") from a local directory; kind is inferred
    from config.json's model_type when None. Cached."""
    return _load(str(Path(path)), kind)
