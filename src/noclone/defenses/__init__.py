"""Model-level defences: change a model's weights so that personalizing it on a protected subject fails."""

from noclone.defenses.apdm import APDM, APDMConfig, dpo_loss
from noclone.defenses.backdoor_checks import backdoor_rate, pattern_present, subject_erased, target_swapped
from noclone.defenses.base import ProtectionSubject, protection_card, read_protection_card, simulate_personalization
from noclone.defenses.persguard import Backdoor, PersGuard, PersGuardConfig

__all__ = ["APDM", "APDMConfig", "Backdoor", "PersGuard", "PersGuardConfig", "ProtectionSubject", "backdoor_rate",
           "dpo_loss", "pattern_present", "protection_card", "read_protection_card", "simulate_personalization",
           "subject_erased", "target_swapped"]
