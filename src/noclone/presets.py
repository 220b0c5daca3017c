"""Presets as data: a preset is a name for a set of settings; `--show` prints its table, the cards record it.

Every method with presets keeps them as a dict of setting overrides on its config dataclass (e.g.
`APDMConfig.PRESETS`). This module turns a resolved config into the table `--show` prints (setting, value, the
default preset's value, `*` where they differ) and into what a card records (`preset` and `settings`: the
settings that differ from the default preset, value and default each). A config made of sections
(noclone.defenses.config) is shown and recorded one field per row, as `section.field`. It imports nothing of noclone but its
errors, so any layer may use it.

`--max-grad-norm none|FLOAT` (every command that trains): `parse_max_grad_norm` gives None (no clipping) or a
positive float.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import fields, is_dataclass
from typing import Any

from noclone.errors import NocloneError

# settings that say how a run is shown or carried, not what it computes: left out of tables and cards
HIDDEN = frozenset({"progress", "extra", "preset_name"})


def settings_of(config: Any, hidden: Iterable[str] = HIDDEN) -> dict[str, Any]:
    """A dataclass config (or a dict) as {setting: value}, without the `hidden` ones; a section of a config made of
    sections (noclone.defenses.config) gives one row per field, named `section.field`."""
    values = _dotted(config) if is_dataclass(config) else dict(config)
    hidden = set(hidden)
    return {k: v for k, v in values.items() if k not in hidden}


def _dotted(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            out.update(_dotted(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = copy.deepcopy(value)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal settings (tuples and lists alike, as a card read back from JSON has lists)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b and type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b


def table_rows(config: Any, default: Any) -> list[tuple[str, Any, Any, bool]]:
    """(setting, value, default value, differs) for every setting of `config`, in declaration order."""
    values, defaults = settings_of(config), settings_of(default)
    return [(k, v, defaults.get(k), k not in defaults or not _same(v, defaults[k])) for k, v in values.items()]


def differing(config: Any, default: Any) -> dict[str, dict[str, Any]]:
    """{setting: {"value", "default"}} for the settings where `config` differs from `default` (what a card keeps)."""
    return {k: {"value": v, "default": d} for k, v, d, diff in table_rows(config, default) if diff}


def card_entry(preset: str | None, config: Any, default: Any, default_name: str) -> dict[str, Any]:
    """What a protection card / cloak manifest records: the preset's name and its settings that differ from the
    default preset (`default_name`), nested as the config is (`section.field` rows under their section). The full
    values are on the card beside it."""
    differs: dict[str, Any] = {}
    for name, entry in differing(config, default).items():
        *sections, key = name.split(".")
        place = differs
        for section in sections:
            place = place.setdefault(section, {})
        place[key] = entry
    return {"preset": preset, "settings": {"compared_with": default_name, "differs": differs}}


def fmt(value: Any) -> str:
    """A setting's value as the table shows it (None as 'none', floats short)."""
    if value is None:
        return "none"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(fmt(v) for v in value) or "()"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_table(title: str, rows: list[tuple[str, Any, Any, bool]], default_name: str,
                 notes: Iterable[str] = ()) -> str:
    """The text `--show` prints: a title line, then `setting  value  default  *` per row (`*`: differs)."""
    header = ("setting", "value", f"default ({default_name})", "")
    cells = [header] + [(k, fmt(v), fmt(d), "*" if diff else "") for k, v, d, diff in rows]
    # a few long values (PersGuard's templates) run past their column rather than widen every row
    widths = [min(max(len(c[i]) for c in cells), 48) for i in range(3)]
    lines = [title, ""]
    for k, v, d, mark in cells:
        lines.append(f"  {k:<{widths[0]}}  {v:<{widths[1]}}  {d:<{widths[2]}}  {mark}".rstrip())
    n = sum(1 for row in rows if row[3])
    lines += ["", f"{n} setting(s) differ from the default preset ({default_name}), marked *"]
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


def parse_max_grad_norm(value: str | float | None) -> float | None:
    """'none' (or 'off') -> None: no gradient clipping; a positive number -> that max norm."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("none", "off"):
        return None
    try:
        norm = float(text)
    except ValueError:
        raise NocloneError(f"--max-grad-norm {value!r}: give none or a positive number, e.g. 1.0") from None
    if not math.isfinite(norm) or norm <= 0:
        raise NocloneError(f"--max-grad-norm {value!r}: give none or a positive number, e.g. 1.0")
    return norm


def check_max_grad_norm(value: float | None) -> None:
    """A config's max_grad_norm must be None (no clipping) or a positive finite number."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise NocloneError(f"max_grad_norm {value!r} must be none (no clipping) or a positive number")


__all__ = ["HIDDEN", "card_entry", "check_max_grad_norm", "differing", "fmt", "format_table", "parse_max_grad_norm",
           "settings_of", "table_rows"]
