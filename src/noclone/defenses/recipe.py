"""Recipes: named settings for `noclone protect-model` that say what threat model they were measured against.

A recipe is a small YAML file; the shipped ones live in src/noclone/defenses/recipes/NAME.yaml (`--recipe NAME`), a
user's own is read with `--config FILE.yaml`:

    method: apdm                 # apdm | persguard (required)
    preset: quick                # the method's preset the settings start from (default: its default preset)
    settings:                    # applied over the preset: sections as mappings, or flat names
      protection: {steps: 300}
    model: what it was made for (a note)
    threat_model: the attackers it claims to stop, in one line
    measured: what was measured and the result, or that nothing was
    evidence: where the measurement lives

Flags given on the command line override the recipe's values, which override its preset's. The protected model's
protection.json records the recipe under "recipe" (name, file hash, threat model, what the command line changed).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noclone.errors import NocloneError

RECIPE_DIR = Path(__file__).parent / "recipes"
# each method's config class (with PRESETS and `preset(name)`), imported when used
CONFIG_CLASSES = {"apdm": "noclone.defenses.apdm:APDMConfig", "persguard": "noclone.defenses.persguard:PersGuardConfig"}
KEYS = ("method", "preset", "settings", "model", "threat_model", "measured", "evidence")


def config_class(method: str) -> type:
    """The config class of a protect-model method."""
    if method not in CONFIG_CLASSES:
        raise NocloneError(f"unknown method {method!r}; choose from {', '.join(CONFIG_CLASSES)}")
    module, _, name = CONFIG_CLASSES[method].partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Recipe:
    """A method, its preset and the settings over it, with what they were measured against."""

    name: str
    method: str
    preset: str
    settings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    threat_model: str | None = None
    measured: str | None = None
    evidence: str | None = None
    source: str = ""          # 'shipped' or the file's path
    sha256: str = ""          # of the file's text

    def config(self, preset: str | None = None, **overrides: Any):
        """The method's config: the preset (`preset` replaces the recipe's), then the recipe's settings, then
        `overrides` (the command line)."""
        return config_class(self.method).preset(preset or self.preset, **self.settings).updated(**overrides)

    def card(self, overridden: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """What protection.json records: which recipe, which file, its claim, and what the command line changed."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "preset": self.preset,
                "threat_model": self.threat_model, "measured": self.measured, "evidence": self.evidence,
                "overridden_on_command_line": sorted(overridden)}


def recipe_names() -> list[str]:
    """The shipped recipes, by name."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def shipped(name: str) -> Recipe:
    """A shipped recipe by name, or a one-line error listing the known ones."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise NocloneError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    return parse(path.read_text(), name, "shipped", where=f"recipe {name}")


def from_file(path: str | Path) -> Recipe:
    """A user's recipe file (the same format), or a one-line error naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise NocloneError(f"--config {path}: no such recipe file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise NocloneError(f"--config {path}: unreadable ({exc})") from None
    return parse(text, path.stem, str(path), where=str(path))


def parse(text: str, name: str, source: str, where: str) -> Recipe:
    """A recipe from its YAML text, checked down to every setting's name and type (errors start with `where`)."""
    from noclone.data.yamlfile import load_yaml

    raw = load_yaml(text, where)
    if not isinstance(raw, dict):
        raise NocloneError(f"{where}: a recipe is a YAML mapping with keys {', '.join(KEYS)}")
    unknown = [str(k) for k in raw if k not in KEYS]
    if unknown:
        raise NocloneError(f"{where}: unknown key {unknown[0]!r}; a recipe has {', '.join(KEYS)}")
    method = raw.get("method")
    if method not in CONFIG_CLASSES:
        raise NocloneError(f"{where}: method {method!r}: choose from {', '.join(CONFIG_CLASSES)}")
    cls = config_class(method)
    preset = raw.get("preset", cls.DEFAULT_PRESET)
    if preset not in cls.PRESETS:
        raise NocloneError(f"{where}: unknown {cls.LABEL} preset {preset!r}; choose from {', '.join(cls.PRESETS)}")
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict):
        raise NocloneError(f"{where}: settings must be a mapping of sections or settings")
    for key in ("model", "threat_model", "measured", "evidence"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise NocloneError(f"{where}: {key} must be text")
    recipe = Recipe(name, method, preset, cls.typed(settings, where), raw.get("model"), raw.get("threat_model"),
                    raw.get("measured"), raw.get("evidence"), source,
                    hashlib.sha256(text.encode()).hexdigest())
    try:
        recipe.config().validate()
    except NocloneError as exc:
        raise NocloneError(f"{where}: {exc}") from None
    return recipe


def listing() -> str:
    """The text `noclone protect-model --list-recipes` prints: each recipe, its method and preset, its claim."""
    lines = []
    for name in recipe_names():
        recipe = shipped(name)
        lines += [f"{name}  ({recipe.method}, preset {recipe.preset})",
                  f"  model: {recipe.model or '-'}",
                  f"  threat model: {recipe.threat_model or '-'}",
                  f"  measured: {recipe.measured or '-'}",
                  f"  evidence: {recipe.evidence or '-'}", ""]
    lines.append("use: noclone protect-model --recipe NAME --images DIR --class-noun NOUN --out DIR "
                 "(flags override the recipe; --config FILE.yaml reads your own)")
    return "\n".join(lines)


__all__ = ["CONFIG_CLASSES", "RECIPE_DIR", "Recipe", "config_class", "from_file", "listing", "parse", "recipe_names",
           "shipped"]
