"""LoRA DreamBooth: low-rank adapters on the UNet attention, saved in the diffusers LoRA format."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from noclone.attacks.base import Personalization
from noclone.data.atomic import atomic_output_dir

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def add_lora(unet, rank: int, alpha: float | None = None) -> None:
    """Attach a peft LoRA adapter to the UNet's attention projections (only the adapter trains)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    unet.add_adapter(config)


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers' key names (what `pipe.load_lora_weights` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


class LoRA(Personalization):
    name = "lora"

    def prepare(self, pipe) -> list[tuple[str, torch.nn.Parameter]]:
        add_lora(pipe.unet, self.config.lora_rank, self.config.lora_alpha)
        pipe.unet.train()
        return [("unet." + n, p) for n, p in pipe.unet.named_parameters() if p.requires_grad]

    def save(self, pipe, out: Path, card: dict) -> None:
        from diffusers import StableDiffusionPipeline

        with atomic_output_dir(out, overwrite=True) as tmp:
            StableDiffusionPipeline.save_lora_weights(
                str(tmp), unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in lora_state_dict(pipe.unet).items()},
                safe_serialization=True,
            )
            (tmp / "personalization.json").write_text(json.dumps(card, indent=2))
