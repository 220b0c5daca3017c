"""DreamBooth: fine-tune the full UNet (and optionally the text encoder) on the subject, with prior preservation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noclone.attacks.base import Personalization


class DreamBooth(Personalization):
    name = "dreambooth"

    def prepare(self, pipe) -> list[tuple[str, torch.nn.Parameter]]:
        pipe.unet.train().requires_grad_(True)
        params = [("unet." + n, p) for n, p in pipe.unet.named_parameters()]
        if self.config.train_text_encoder:
            pipe.text_encoder.train().requires_grad_(True)
            params += [("text_encoder." + n, p) for n, p in pipe.text_encoder.named_parameters()]
        return params

    def save(self, pipe, out: Path, card: dict) -> None:
        from noclone.models.pipeline import save_pipeline

        save_pipeline(pipe, out, overwrite=True, extra_files={"personalization.json": json.dumps(card, indent=2)})
