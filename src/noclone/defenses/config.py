"""Defence configs made of sections (as peft's configs are made of sub-configs), with one table of flat names.

A config class is a dataclass whose section fields hold dataclasses (APDM: `protection`, `l2p`, `repair`, `guard`)
beside its run-level fields (seed, batch size, ...), and whose FLAT_KEYS table gives each section field the flat
name it had before the sections existed -- the name bench YAML files, audit batteries, benchmarks, the CLI and
older cards still use, e.g. 'outer_steps' -> ('protection', 'steps'). Settings are accepted either way:

    APDMConfig(outer_steps=300)                          a flat name, as before
    APDMConfig(protection={"steps": 300})                a section as a dict (its keys may also be flat names)
    APDMConfig(protection=ProtectionSettings(...))       a whole section

and read either way (`config.outer_steps` is `config.protection.steps`). `asdict(config)` and the cards give the
nested form; `flat()` the flat one, which is what checkpoint markers hash, so runs started before the sections
existed still resume.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, ClassVar

from noclone.errors import NocloneError


def field_values(obj) -> dict[str, Any]:
    """A dataclass's fields as a shallow dict (sections keep their objects)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _tuples(value: Any) -> Any:
    # YAML and JSON give lists where the configs keep tuples (templates, attack lengths): compare and hash alike
    return tuple(value) if isinstance(value, list) else value


class SectionedConfig:
    """Base of the defences' configs (see the module docstring); subclasses are `@dataclass(init=False)`."""

    LABEL: ClassVar[str] = "defence"
    FLAT_KEYS: ClassVar[dict[str, tuple[str, str]]] = {}
    PRESETS: ClassVar[dict[str, dict]] = {}
    DEFAULT_PRESET: ClassVar[str] = "quick"

    def __init__(self, **settings: Any):
        defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                    for f in fields(self)}
        for name, value in self._resolved(defaults, settings).items():
            object.__setattr__(self, name, value)

    # --- the sections and the flat names ---
    @classmethod
    def sections(cls) -> dict[str, type]:
        """{section field: its dataclass}, in declaration order."""
        found = cls.__dict__.get("_section_types")
        if found is None:
            found = {f.name: f.default_factory for f in fields(cls)
                     if f.default_factory is not MISSING and is_dataclass(f.default_factory)}
            cls._section_types = found
        return found

    @classmethod
    def _section_field(cls, section: str, key: str) -> str | None:
        """The field of `section` that `key` names: its own name, or a flat name that maps into this section."""
        if key in {f.name for f in fields(cls.sections()[section])}:
            return key
        where = cls.FLAT_KEYS.get(key)
        return where[1] if where is not None and where[0] == section else None

    @classmethod
    def _resolved(cls, base: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
        """`base` (every field) with `settings` applied: new section objects, nothing shared with `base`."""
        sections = cls.sections()
        values = {name: dict(field_values(v)) if name in sections else v for name, v in base.items()}
        unknown: list[str] = []
        # whole sections first: dataclasses.replace(config, outer_steps=5) hands over every section as it was, and
        # the 5 must still win
        ordered = sorted(settings.items(), key=lambda item: not (item[0] in sections and is_dataclass(item[1])))
        for key, value in ordered:
            if key in sections and is_dataclass(value):
                values[key] = dict(field_values(value))
            elif key in sections and isinstance(value, Mapping):
                for sub, sub_value in value.items():
                    name = cls._section_field(key, sub)
                    if name is None:
                        unknown.append(f"{key}.{sub}")
                    else:
                        values[key][name] = _tuples(sub_value)
            elif key in cls.FLAT_KEYS:
                section, name = cls.FLAT_KEYS[key]
                values[section][name] = _tuples(value)
            elif key in sections:
                raise NocloneError(f"{cls.LABEL} setting {key!r}: give a mapping of its settings, e.g. "
                                   f"{key}: {{{next(iter(values[key]))}: ...}}")
            elif key in values:
                values[key] = _tuples(value)
            else:
                unknown.append(key)
        if unknown:
            raise NocloneError(f"unknown {cls.LABEL} settings: {', '.join(sorted(unknown))}")
        return {name: sections[name](**v) if name in sections else v for name, v in values.items()}

    def updated(self, **settings: Any):
        """A new config: this one with `settings` applied (a section given as a dict updates this config's)."""
        new = object.__new__(type(self))
        for name, value in self._resolved(field_values(self), settings).items():
            object.__setattr__(new, name, value)
        return new

    def flat(self) -> dict[str, Any]:
        """Every setting under its flat name (the layout before the sections; what checkpoints hash)."""
        sections = self.sections()
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in sections}
        for key, (section, name) in self.FLAT_KEYS.items():
            out[key] = copy.deepcopy(getattr(getattr(self, section), name))
        return out

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: a flat name reads its section's field
        where = type(self).FLAT_KEYS.get(name)
        section = self.__dict__.get(where[0]) if where is not None else None
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(section, where[1])

    def __setattr__(self, name: str, value: Any) -> None:
        sections = self.sections()
        where = type(self).FLAT_KEYS.get(name)
        if name in sections and isinstance(value, Mapping):
            object.__setattr__(self, name, self._resolved(field_values(self), {name: value})[name])
        elif where is not None and not (name in sections and is_dataclass(value)):
            setattr(getattr(self, where[0]), where[1], _tuples(value))  # e.g. config.l2p = False: l2p.enabled
        else:
            object.__setattr__(self, name, value)

    # --- presets, the --show table, the card ---
    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """The preset's settings with `overrides` (flat names, sections as dicts or objects) applied."""
        if name not in cls.PRESETS:
            raise NocloneError(f"unknown {cls.LABEL} preset {name!r}; choose from {', '.join(cls.PRESETS)}")
        config = cls(**cls.PRESETS[name]).updated(**overrides)
        if "preset_name" in {f.name for f in fields(cls)}:
            object.__setattr__(config, "preset_name", name)
        return config

    @classmethod
    def preset_notes(cls, name: str) -> list[str]:
        """Lines printed under a preset's --show table."""
        return []

    @classmethod
    def show(cls, name: str, config=None, title: str | None = None, notes: tuple[str, ...] = ()) -> str:
        """The --show table of `config` (default: the preset `name`): each setting, its value, the default preset's,
        `*` where they differ."""
        from noclone.presets import format_table, table_rows

        config = cls.preset(name) if config is None else config
        return format_table(title or f"{cls.LABEL} preset {name!r}",
                            table_rows(config, cls.preset(cls.DEFAULT_PRESET)), cls.DEFAULT_PRESET,
                            [*cls.preset_notes(name), *notes])

    def card_entry(self) -> dict:
        """`preset` and `settings` (those differing from the default preset, by dotted name) for protection.json."""
        from noclone.presets import card_entry

        default = type(self).preset(self.DEFAULT_PRESET)
        return card_entry(getattr(self, "preset_name", None), self, default, self.DEFAULT_PRESET)

    # --- typed settings from YAML ---
    @classmethod
    def typed(cls, settings: Mapping[str, Any], where: str) -> dict[str, Any]:
        """`settings` (flat names or sections as dicts) with each value checked against its field's type; numbers
        written as strings ('5e-6', which YAML does not read as a float) become numbers. One-line errors name
        `where` and the key."""
        hints = _hints(cls)
        sections = cls.sections()
        top = {f.name for f in fields(cls)} - set(sections)
        out: dict[str, Any] = {}
        for key, value in settings.items():
            if key in sections and isinstance(value, Mapping):
                section_hints = _hints(sections[key])
                typed = {}
                for sub, sub_value in value.items():
                    name = cls._section_field(key, sub)
                    if name is None:
                        raise NocloneError(f"{where}: unknown {cls.LABEL} setting {key}.{sub}")
                    typed[sub] = _typed(sub_value, section_hints[name], f"{where}: {key}.{sub}")
                out[key] = typed
            elif key in cls.FLAT_KEYS:
                section, name = cls.FLAT_KEYS[key]
                out[key] = _typed(value, _hints(sections[section])[name], f"{where}: {key}")
            elif key in top:
                out[key] = _typed(value, hints[key], f"{where}: {key}")
            else:
                raise NocloneError(f"{where}: unknown {cls.LABEL} setting {key}")
        return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` asks for (bool, int, float, str, tuple, dict, `X | None`), or a one-line error."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise NocloneError(f"{where}: a value is required (got nothing)")
    for option in options:
        kind = typing.get_origin(option) or option
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue
        if kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)):
            return value
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if kind is str and isinstance(value, str):
            return value
        if kind is tuple and isinstance(value, (list, tuple)):
            args = typing.get_args(option)
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[float, ...]: every element of that type
                return tuple(_typed(v, args[0], where) for v in value)
            return tuple(value)
        if kind is dict and isinstance(value, Mapping):
            return dict(value)
    wanted = " or ".join(_KINDS.get(typing.get_origin(o) or o, str(o)) for o in options if o is not type(None))
    raise NocloneError(f"{where}: {value!r} is not {wanted}")


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", tuple: "a list", dict: "a mapping"}


__all__ = ["SectionedConfig", "field_values"]
