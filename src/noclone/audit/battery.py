"""The audit's battery of attackers, read from YAML (the shipped `batteries.yaml` or a user's file) and validated
up front: every problem is one line naming the attacker."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from noclone.errors import NocloneError

KINDS = ("personalization", "surgery", "purification")
LEVELS = ("model", "cloak")
ATTACKER_KEYS = {"name", "kind", "method", "lr_mult", "steps_mult", "token", "class_word", "settings", "mix_clean",
                 "op", "group", "when", "transform", "steps", "n_images"}
BATTERY_KEYS = {"description", "attack", "attackers", "relearning", "class_words", "attack_preset", "attack_settings",
                "unprotected"}


@dataclass
class Attacker:
    """One attacker: the preset attack with one thing changed (its settings, the photos or the model)."""

    name: str
    kind: str
    method: str = "dreambooth"
    lr_mult: float = 1.0
    steps_mult: float = 1.0
    token: str | None = None
    class_word: bool = False
    settings: dict = field(default_factory=dict)
    mix_clean: float = 0.0
    op: str | None = None
    group: str | None = None
    when: str = "before"
    transform: str | None = None
    surgery_steps: int | None = None
    surgery_images: int | None = None

    def applies_to(self, level: str) -> bool:
        """Surgery needs published weights (model level); purification and mixed-in clean photos need cloaks."""
        if self.kind == "surgery":
            return level == "model"
        if self.kind == "purification" or self.mix_clean:
            return level == "cloak"
        return True

    @property
    def tags(self) -> set[str]:
        """What the attacker changes, in the words the defences' threat models use."""
        tags = {self.kind}
        if self.token:
            tags.add("new_identifier")
        if self.class_word:
            tags.add("other_class_word")
        if self.method != "dreambooth":
            tags.add(f"method_{self.method}")
        if self.op:
            tags.add(self.op)
        if self.lr_mult != 1 or self.steps_mult != 1:
            tags.add("schedule")
        if self.mix_clean:
            tags.add("clean_photos")
        return tags


@dataclass
class Battery:
    name: str
    attack: str
    attackers: list[Attacker]
    relearning: list[float]
    class_words: dict[str, str]
    description: str = ""
    attack_preset: str = "sandbox"
    attack_settings: dict = field(default_factory=dict)  # applied to every attacker (its own settings win)
    unprotected: str = "preset"  # which attackers also run without the protection: 'preset' | 'all' (personalizations)

    def for_level(self, level: str) -> list[Attacker]:
        return [a for a in self.attackers if a.applies_to(level)]


def shipped() -> dict:
    import yaml

    return yaml.safe_load(resources.files("noclone.audit").joinpath("batteries.yaml").read_text())


def battery_names() -> list[str]:
    return sorted(shipped())


def _number(value, label: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low or (high is not None and value > high):
        bound = f"in ({low}, {high}]" if high is not None else f"> {low}"
        raise NocloneError(f"{label}: expected a number {bound}, got {value!r}")
    return float(value)


def _attacker(raw, label: str, attack: str) -> Attacker:
    from noclone.attacks.surgery import GRAFT_GROUPS, OPERATIONS

    if not isinstance(raw, dict):
        raise NocloneError(f"{label}: expected a mapping like {{name: lr-3x, kind: personalization, lr_mult: 3}}")
    unknown = set(raw) - ATTACKER_KEYS
    if unknown:
        raise NocloneError(f"{label}: unknown key(s) {', '.join(sorted(unknown))}")
    name = str(raw.get("name") or "").strip()
    if not name:
        raise NocloneError(f"{label}: missing 'name'")
    label = f"{label} ({name})"
    kind = raw.get("kind", "personalization")
    if kind not in KINDS:
        raise NocloneError(f"{label}: kind {kind!r}; choose from {', '.join(KINDS)}")
    method = str(raw.get("method", attack)).lower()
    if method not in ("dreambooth", "lora", "ti"):
        raise NocloneError(f"{label}: method {method!r}; choose from dreambooth, lora, ti")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise NocloneError(f"{label}: settings must be a mapping")
    a = Attacker(name=name, kind=kind, method=method, settings=dict(settings),
                 lr_mult=_number(raw.get("lr_mult", 1.0), f"{label} lr_mult", 0),
                 steps_mult=_number(raw.get("steps_mult", 1.0), f"{label} steps_mult", 0),
                 token=raw.get("token"), class_word=bool(raw.get("class_word", False)),
                 mix_clean=float(raw.get("mix_clean", 0.0) or 0.0), op=raw.get("op"), group=raw.get("group"),
                 when=str(raw.get("when", "before")), transform=raw.get("transform"), surgery_steps=raw.get("steps"),
                 surgery_images=raw.get("n_images"))
    if a.token is not None and (not isinstance(a.token, str) or not a.token.strip() or " " in a.token.strip()):
        raise NocloneError(f"{label}: token must be one word, got {a.token!r}")
    if not 0 <= a.mix_clean < 1:
        raise NocloneError(f"{label}: mix_clean must be in [0, 1)")
    if kind == "surgery":
        if a.op not in OPERATIONS:
            raise NocloneError(f"{label}: op {a.op!r}; choose from {', '.join(OPERATIONS)}")
        if a.op == "graft" and a.group not in GRAFT_GROUPS:
            raise NocloneError(f"{label}: graft needs group: one of {', '.join(GRAFT_GROUPS)}")
        if a.when not in ("before", "after"):
            raise NocloneError(f"{label}: when must be 'before' or 'after' the attack")
        if a.when == "after" and (a.op == "generic_finetune" or method != "dreambooth"):
            raise NocloneError(f"{label}: only a swap or graft can follow the attack, and only a DreamBooth one")
    elif any(raw.get(k) is not None for k in ("op", "group", "steps", "n_images")) or "when" in raw:
        raise NocloneError(f"{label}: op/group/when/steps are surgery settings (kind: surgery)")
    if kind == "purification":
        if not a.transform:
            raise NocloneError(f"{label}: a purification needs a transform, e.g. 'jpeg:75'")
        from noclone.bench.registry import transform

        try:
            transform(str(a.transform)).check(str(a.transform))
        except NocloneError as exc:
            raise NocloneError(f"{label}: {exc}") from None
    elif a.transform:
        raise NocloneError(f"{label}: 'transform' belongs to kind: purification")
    return a


def parse_battery(raw: dict, name: str) -> Battery:
    """A validated Battery from its YAML mapping."""
    if not isinstance(raw, dict):
        raise NocloneError(f"battery {name}: expected a mapping with attackers")
    unknown = set(raw) - BATTERY_KEYS
    if unknown:
        raise NocloneError(f"battery {name}: unknown key(s) {', '.join(sorted(unknown))}")
    attack = str(raw.get("attack", "dreambooth")).lower()
    if attack not in ("dreambooth", "lora", "ti"):
        raise NocloneError(f"battery {name}: attack {attack!r}; choose from dreambooth, lora, ti")
    items = raw.get("attackers")
    if not isinstance(items, list) or not items:
        raise NocloneError(f"battery {name}: 'attackers' must be a non-empty list")
    attackers = [_attacker(item, f"battery {name} attackers[{i}]", attack) for i, item in enumerate(items)]
    names = [a.name for a in attackers]
    if len(set(names)) != len(names):
        raise NocloneError(f"battery {name}: two attackers share a name")
    relearning = raw.get("relearning") or []
    if not isinstance(relearning, list):
        raise NocloneError(f"battery {name}: relearning must be a list of step multiples like [0.5, 1, 2, 4]")
    relearning = sorted({_number(v, f"battery {name} relearning", 0) for v in relearning})
    if relearning and 1.0 not in relearning:
        raise NocloneError(f"battery {name}: the relearning curve must include 1 (the preset's length)")
    words = raw.get("class_words") or {}
    if not isinstance(words, dict):
        raise NocloneError(f"battery {name}: class_words must map a class to another word for it")
    common = raw.get("attack_settings") or {}
    if not isinstance(common, dict):
        raise NocloneError(f"battery {name}: attack_settings must be a mapping")
    unprotected = str(raw.get("unprotected", "preset"))
    if unprotected not in ("preset", "all"):
        raise NocloneError(f"battery {name}: unprotected must be 'preset' or 'all' (every personalization attacker)")
    return Battery(name, attack, attackers, relearning, {str(k): str(v) for k, v in words.items()},
                   str(raw.get("description", "")), str(raw.get("attack_preset", "sandbox")), dict(common),
                   unprotected)


def load_battery(spec: str) -> Battery:
    """A shipped battery by name (quick, full) or a YAML file holding one battery (or several: then the first)."""
    from noclone.data.yamlfile import load_yaml

    if spec in shipped():
        return parse_battery(shipped()[spec], spec)
    path = Path(spec)
    if not path.is_file():
        raise NocloneError(f"--battery {spec}: not a shipped battery ({', '.join(battery_names())}) nor a YAML file")
    raw = load_yaml(path.read_text(), str(path))
    if isinstance(raw, dict) and "attackers" not in raw and raw and all(isinstance(v, dict) for v in raw.values()):
        first = next(iter(raw))
        return parse_battery(raw[first], f"{path.name}:{first}")
    return parse_battery(raw, path.name)
