"""Textual inversion: learn one new token embedding for the subject; everything else stays frozen."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noclone.attacks.base import Personalization
from noclone.errors import NocloneError


class TextualInversion(Personalization):
    name = "ti"

    def prepare(self, pipe) -> list[tuple[str, torch.nn.Parameter]]:
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        token, init_word = self.config.token, self.config.class_noun
        if tokenizer.add_tokens([token]) != 1 and token in tokenizer.get_added_vocab():
            raise NocloneError(f"token {token!r} is already a learned token of this model; pick another --token")
        init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        encoder.resize_token_embeddings(len(tokenizer))
        self.token_id = tokenizer.convert_tokens_to_ids(token)
        embeddings = encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[self.token_id] = embeddings[init_ids].mean(0)
        self.original = embeddings.detach().clone()
        # the encoder whole in fp32, as diffusers' textual_inversion.py keeps it: an fp32 embedding feeding half
        # layer norms is not covered by CPU autocast (noclone.training.precision)
        torch.nn.Module.to(encoder, torch.float32)
        embeddings = encoder.get_input_embeddings().weight
        embeddings.requires_grad_(True)
        # keeps dropout off: only the embedding row learns, the encoder is otherwise frozen
        encoder.eval()
        return [("text_encoder.embeddings", embeddings)]

    def optimizer(self, params):
        return torch.optim.AdamW([p for _, p in params], lr=self.config.lr, weight_decay=0.0)

    def after_step(self, pipe, step: int) -> None:
        weight = pipe.text_encoder.get_input_embeddings().weight
        keep = torch.ones(len(weight), dtype=torch.bool)
        keep[self.token_id] = False
        with torch.no_grad():
            weight[keep] = self.original[keep].to(weight.dtype)

    def learned_embedding(self, pipe) -> torch.Tensor:
        return pipe.text_encoder.get_input_embeddings().weight[self.token_id].detach().cpu().clone()

    def save(self, pipe, out: Path, card: dict) -> None:
        from safetensors.torch import save_file

        from noclone.models.pipeline import save_pipeline

        save_pipeline(pipe, out, overwrite=True, extra_files={"personalization.json": json.dumps(card, indent=2)})
        # also the standalone embedding in the format of `pipe.load_textual_inversion`
        save_file({self.config.token: self.learned_embedding(pipe)[None]}, str(Path(out) / "learned_embeds.safetensors"))
