"""The threat model each defence claims, as data: what its paper (or our own card) says it withstands, and the
assumptions that put an attacker outside the claim. The audit reports every attacker either way; the claim only
says which failures the defence owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from noclone.audit.battery import Attacker


@dataclass(frozen=True)
class ThreatModel:
    defence: str
    claim: str
    assumes: dict[str, str] = field(default_factory=dict)  # attacker tag -> the assumption that tag breaks

    def outside(self, attacker: Attacker) -> list[str]:
        """The assumptions this attacker breaks (empty: the defence claims to hold against it)."""
        return [text for tag, text in self.assumes.items() if tag in attacker.tags]


_NO_BASE_UNET = {"graft": "the attacker does not hold the unprotected UNet (whoever does can fine-tune it instead)"}

THREAT_MODELS = {
    "apdm": ThreatModel(
        "APDM (paper)",
        "Fine-tuning the published weights on the subject (DreamBooth, Custom Diffusion; other identifiers and "
        "transformed photos, paper Sec. 5) does not learn the subject; other subjects still personalize.",
        dict(_NO_BASE_UNET)),
    "apdm+decoder": ThreatModel(
        "APDM with the decoder guard (ours)",
        "As APDM, and the decoder blurs whatever the model draws of the subject, with or without fine-tuning.",
        {**_NO_BASE_UNET, "swap_vae": "the attacker keeps the published VAE (the guard lives in its decoder)"}),
    "persguard-unet": ThreatModel(
        "PersGuard, UNet backdoor (paper)",
        "DreamBooth on the subject's photos fires the backdoor (the protective output instead of the subject), "
        "also under identifiers and templates the protector never saw (black-box setting); other subjects are "
        "unaffected.",
        dict(_NO_BASE_UNET)),
    "persguard-decoder": ThreatModel(
        "PersGuard, decoder backdoor (ours)",
        "The decoder marks every image of the subject the model draws, after any fine-tuning of the UNet.",
        {**_NO_BASE_UNET, "swap_vae": "the attacker keeps the published VAE (the backdoor lives in its decoder)"}),
    "rid": ThreatModel(
        "RID (paper)",
        "Photos cloaked in one forward pass stop DreamBooth, LoRA and textual inversion on them, and the authors "
        "report the protection survives JPEG 75, DiffPure 0.1, GrIDPure and noisy upscaling.",
        {"clean_photos": "every photo the attacker trains on is cloaked"}),
    "aspl": ThreatModel(
        "Anti-DreamBooth ASPL (paper)",
        "Photos cloaked at an L-inf budget of 0.05 (in [-1, 1]) stop DreamBooth on them; the paper reports the "
        "protection weakens under JPEG compression and when clean photos are mixed in.",
        {"clean_photos": "every photo the attacker trains on is cloaked"}),
}
for _name, _paper in (("fsmg", "Anti-DreamBooth FSMG"), ("advdm", "AdvDM"), ("photoguard", "PhotoGuard")):
    THREAT_MODELS[_name] = ThreatModel(
        f"{_paper} (paper)", "Cloaked photos disrupt what a diffusion model learns or edits from them.",
        {"clean_photos": "every photo the attacker trains on is cloaked"})

UNKNOWN = ThreatModel("unknown defence", "No card names the defence, so no claim is checked; every row is reported.")


def defence_key(level: str, card: dict | None) -> str:
    """The THREAT_MODELS key for a protection.json (model level) or cloak.json (cloak level) card."""
    if not card:
        return "unknown"
    method = str(card.get("method", "")).lower()
    if level == "model":
        implant = str(card.get("implant", "unet"))
        if method == "apdm":
            return "apdm" if implant == "unet" else "apdm+decoder"
        if method == "persguard":
            return "persguard-unet" if implant == "unet" else "persguard-decoder"
        return "unknown"
    return method if method in THREAT_MODELS else "unknown"


def threat_model(key: str) -> ThreatModel:
    return THREAT_MODELS.get(key, UNKNOWN)
