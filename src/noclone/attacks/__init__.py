"""Personalization attacks (DreamBooth, LoRA, textual inversion) sharing one loss and one training loop."""

from noclone.attacks.base import Personalization, PersonalizationConfig, dreambooth_loss
from noclone.attacks.dreambooth import DreamBooth
from noclone.attacks.lora import LoRA
from noclone.attacks.textual_inversion import TextualInversion

METHODS = {"dreambooth": DreamBooth, "lora": LoRA, "ti": TextualInversion}

__all__ = ["METHODS", "DreamBooth", "LoRA", "Personalization", "PersonalizationConfig", "TextualInversion", "dreambooth_loss"]
