"""Model-level defences: change a model's weights so that personalizing it on a protected subject fails."""

from noclone.defenses.apdm import APDM, APDMConfig, dpo_loss
from noclone.defenses.base import ProtectionSubject, protection_card, read_protection_card, simulate_personalization

__all__ = ["APDM", "APDMConfig", "ProtectionSubject", "dpo_loss", "protection_card", "read_protection_card",
           "simulate_personalization"]
