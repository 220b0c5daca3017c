"""LoRA DreamBooth: low-rank adapters on the UNet attention (and optionally the text encoder's), saved in the
diffusers LoRA format that `pipe.load_lora_weights` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noclone.attacks.base import LORA_TARGET_SETS, Personalization
from noclone.data.atomic import atomic_output_dir

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _lora_config(rank: int, alpha: float | None, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)


def add_lora(unet, rank: int, alpha: float | None = None, targets: str = "attention") -> None:
    """Attach a peft LoRA adapter to the UNet's attention projections (or all its layers; only the adapter trains)."""
    unet.requires_grad_(False)
    unet.add_adapter(_lora_config(rank, alpha, LORA_TARGET_SETS[targets]))


def add_text_lora(text_encoder, rank: int, alpha: float | None = None) -> None:
    """Attach a LoRA adapter to the CLIP text encoder's self-attention projections (only the adapter trains)."""
    from peft import inject_adapter_in_model

    text_encoder.requires_grad_(False)
    # peft directly: transformers' own add_adapter wants a newer peft than diffusers needs
    inject_adapter_in_model(_lora_config(rank, alpha, TEXT_LORA_TARGETS), text_encoder)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key format, which `pipe.load_lora_weights` reads as is (diffusers' older
    "lora.down/up" names do not round-trip an adapter on the resnet convolutions: measured, the UNet output differed)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


class LoRA(Personalization):
    name = "lora"

    def prepare(self, pipe) -> list[tuple[str, torch.nn.Parameter]]:
        add_lora(pipe.unet, self.config.lora_rank, self.config.lora_alpha, self.config.lora_targets)
        pipe.unet.train()
        params = [("unet." + n, p) for n, p in pipe.unet.named_parameters() if p.requires_grad]
        if self.config.train_text_encoder:
            add_text_lora(pipe.text_encoder, self.config.lora_rank, self.config.lora_alpha)
            pipe.text_encoder.train()
            params += [("text_encoder." + n, p) for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
        return params

    def save(self, pipe, out: Path, card: dict) -> None:
        from diffusers import StableDiffusionPipeline

        def detached(state: dict) -> dict:
            return {k: v.detach().cpu().contiguous() for k, v in state.items()}

        text = detached(lora_state_dict(pipe.text_encoder)) if self.config.train_text_encoder else None
        with atomic_output_dir(out, overwrite=True) as tmp:
            StableDiffusionPipeline.save_lora_weights(
                str(tmp), unet_lora_layers=detached(lora_state_dict(pipe.unet)), text_encoder_lora_layers=text,
                safe_serialization=True,
            )
            (tmp / "personalization.json").write_text(json.dumps(card, indent=2))
