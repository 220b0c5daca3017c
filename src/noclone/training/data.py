"""The one data path of attacks and defences: a subject's photos and class images as cached VAE latents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from noclone.data.images import images_to_tensor
from noclone.errors import NocloneError
from noclone.training.diffusion import encode_images, sample_latents


@dataclass
class LatentSet:
    """VAE posteriors (mean, std) of a set of images, with one prompt for the set."""

    mean: torch.Tensor
    std: torch.Tensor
    prompt: str

    @classmethod
    def from_images(cls, vae, images: Sequence[Image.Image], prompt: str, resolution: int) -> "LatentSet":
        if not images:
            raise NocloneError(f"no images for prompt {prompt!r}")
        mean, std = encode_images(vae, images_to_tensor(images, resolution))
        return cls(mean, std, prompt)

    def __len__(self) -> int:
        return len(self.mean)

    def batch(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """`batch_size` latents sampled from the posteriors of randomly chosen images."""
        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return sample_latents(self.mean[idx], self.std[idx], generator)

    def with_prompt(self, prompt: str) -> "LatentSet":
        return LatentSet(self.mean, self.std, prompt)


@dataclass
class SubjectData:
    """Instance set (the subject under the identifier prompt), optional class set (prior preservation) and optional
    photos of other members of the class (APDM's DPO positives, when given instead of the class set; its anchors)."""

    instance: LatentSet
    prior: LatentSet | None = None
    positives: LatentSet | None = None
    anchors: LatentSet | None = None


def pipeline_resolution(pipe) -> int:
    size = pipe.unet.config.sample_size
    return (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor
