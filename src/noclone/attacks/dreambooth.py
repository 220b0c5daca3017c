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
        self.frozen_rows = None
        if self.config.train_text_encoder and self.config.text_encoder_params == "identifier":
            params.append(("text_encoder.embeddings", self._identifier_rows(pipe)))
        elif self.config.train_text_encoder:
            pipe.text_encoder.train().requires_grad_(True)
            params += [("text_encoder." + n, p) for n, p in pipe.text_encoder.named_parameters()]
        return params

    def _identifier_rows(self, pipe) -> torch.nn.Parameter:
        """Train only the identifier's token embedding(s): every other prompt, "" included, encodes as before."""
        ids = pipe.tokenizer(self.config.token, add_special_tokens=False).input_ids
        embeddings = pipe.text_encoder.get_input_embeddings().weight
        self.frozen_rows = torch.ones(len(embeddings), dtype=torch.bool)
        self.frozen_rows[ids] = False
        self.original_rows = embeddings.detach().clone()
        pipe.text_encoder.eval()
        return embeddings.requires_grad_(True)

    def after_step(self, pipe, step: int) -> None:
        if self.frozen_rows is not None:
            weight = pipe.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[self.frozen_rows] = self.original_rows[self.frozen_rows].to(weight.dtype)

    def save(self, pipe, out: Path, card: dict) -> None:
        from noclone.models.pipeline import save_pipeline

        save_pipeline(pipe, out, overwrite=True, extra_files={"personalization.json": json.dumps(card, indent=2)})
