"""Plug-ins of the benchmark by name: defences (model-level and image cloaks), photo transforms, attacks.

Every method is looked up in a dict, so a method written elsewhere plugs in by adding one entry (tests inject fakes
the same way). The modules behind them are imported only when used: a missing module makes the method "not
available in this install" at config validation, not an import error.

- model defence: ``run(pipe, subjects, out, settings, class_cache, checkpoint_dir, progress)`` writes a pipeline
  directory to ``out`` (APDM, PersGuard).
- image cloak: ``run(images_dir, out_dir, pipe, settings)`` writes the cloaked photos into ``out_dir``.
- transform: ``apply(images, spec, pipe, seed) -> list[PIL.Image]`` (``needs_model`` says whether ``pipe`` is used).
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from noclone.errors import NocloneError

# read by the bench, not passed to the defence's config; "negatives": sandbox identities (ids or 'held_out:N', the
# protected subject's class) whose photos a PersGuard decoder backdoor must leave unmarked
BENCH_ONLY_DEFENCE_KEYS = ("token", "preset", "negatives")


@dataclass
class Defence:
    """A defence by kind: 'none' (the clean model), 'model' (changes the weights) or 'cloak' (changes the photos)."""

    kind: str
    check: Callable[[dict], None] = lambda settings: None
    run: Callable | None = None
    needs_model: Callable[[], bool] = lambda: True  # cloaks: whether `run` needs the loaded pipeline


@dataclass
class Transform:
    """A photo transform applied before the attack; `check(spec)` raises NocloneError on a bad spec."""

    check: Callable[[str], None]
    apply: Callable
    needs_model: bool = False
    settings: dict = field(default_factory=dict)


def _module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise NocloneError(f"{what} is not available in this install (module {name} is missing)") from None


def _defence_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in BENCH_ONLY_DEFENCE_KEYS}


# ------------------------------------------------------------------------------------------- model defences


def _model_defence(module: str, cls: str, config_cls: str, label: str) -> Defence:
    def config(settings: dict, progress: bool = False):
        mod = _module(module, f"defence {label!r}")
        if not hasattr(mod, cls) or not hasattr(mod, config_cls):
            raise NocloneError(f"defence {label!r} is not available in this install ({module} has no {cls})")
        try:
            cfg = getattr(mod, config_cls).preset(settings.get("preset", "quick"), progress=progress,
                                                  **_defence_settings(settings))
        except TypeError as exc:
            raise NocloneError(f"defence {label!r}: bad settings ({exc})") from None
        if hasattr(cfg, "validate"):
            cfg.validate()
        return getattr(mod, cls), cfg

    def run(pipe, subjects, out: Path, settings: dict, class_cache: Path, checkpoint_dir: Path, progress: bool,
            negatives: list | None = None) -> None:
        method, cfg = config(settings, progress)
        extra = {"negatives": negatives} if negatives else {}
        method(cfg).run(pipe, subjects, out, overwrite=True, checkpoint_dir=checkpoint_dir, class_cache=class_cache,
                        **extra)

    def check(settings: dict) -> None:
        config(settings)
        if settings.get("negatives") is not None:
            if label != "persguard":
                raise NocloneError(f"defence {label!r}: 'negatives' is a persguard setting (implant decoder/both)")
            if not isinstance(settings["negatives"], list) or not settings["negatives"]:
                raise NocloneError(f"defence {label!r}: negatives must be a non-empty list of sandbox identities")
            from noclone.sandbox.splits import parse_identity

            for value in settings["negatives"]:
                parse_identity(value, f"defence {label!r} negatives")

    return Defence("model", check=check, run=run)


# ----------------------------------------------------------------------------------------------- image cloaks


def _cloak(method: str) -> Defence:
    def module():
        mod = _module("noclone.cloak", f"defence {method!r}")
        if not hasattr(mod, "protect_folder"):
            raise NocloneError(f"defence {method!r} is not available in this install (noclone.cloak has no protect_folder)")
        return mod

    def cloak_class():
        methods = getattr(importlib.import_module("noclone.cloak.registry"), "cloak_methods", lambda: None)()
        if methods is not None and method not in methods:
            raise NocloneError(f"defence {method!r} is not available in this install (noclone.cloak has "
                               f"{', '.join(methods)})")
        return methods.get(method) if methods else None

    def check(settings: dict) -> None:
        mod = module()
        cls = cloak_class()
        if cls is not None and hasattr(cls, "preset_config"):
            cls.preset_config(**settings).validate()
        if cls is not None and not getattr(cls, "needs_model", True) and hasattr(mod, "get_cloak"):
            mod.get_cloak(method, None, **settings)  # model-free cloaks load their own weights: check them now

    def needs_model() -> bool:
        cls = cloak_class()
        return bool(getattr(cls, "needs_model", True))

    def run(images_dir: Path, out_dir: Path, pipe, settings: dict) -> None:
        written = Path(module().protect_folder(method, images_dir, out_dir, model=pipe, overwrite=True, **settings))
        if written.resolve() != Path(out_dir).resolve():  # the cloak chose its own folder: bring the photos here
            shutil.copytree(written, out_dir, dirs_exist_ok=True)

    return Defence("cloak", check=check, run=run, needs_model=needs_model)


DEFENCES: dict[str, Defence] = {
    "none": Defence("none"),
    "apdm": _model_defence("noclone.defenses.apdm", "APDM", "APDMConfig", "apdm"),
    "persguard": _model_defence("noclone.defenses.persguard", "PersGuard", "PersGuardConfig", "persguard"),
    **{name: _cloak(name) for name in ("rid", "aspl", "fsmg", "advdm", "photoguard")},
}


def defence(method: str) -> Defence:
    """The registered defence, or a one-line error naming the available ones."""
    if method not in DEFENCES:
        raise NocloneError(f"unknown defence {method!r}; available: {', '.join(DEFENCES)}")
    return DEFENCES[method]


# ------------------------------------------------------------------------------------------------ transforms



def _purify_module():
    mod = _module("noclone.attacks.purify", "transforms")
    for name in ("apply_transform", "parse_transform"):
        if not hasattr(mod, name):
            raise NocloneError(f"transforms are not available in this install (noclone.attacks.purify has no {name})")
    return mod


def _parsed(spec: str) -> tuple[str, dict]:
    """(name, settings) from `parse_transform(spec)`, whatever shape it returns (tuple, object or dict)."""
    parsed = _purify_module().parse_transform(spec)
    if isinstance(parsed, tuple) and len(parsed) == 2 and isinstance(parsed[1], dict):
        return str(parsed[0]), dict(parsed[1])
    if isinstance(parsed, dict):
        parsed = dict(parsed)
        return str(parsed.pop("name", spec.split(":")[0])), parsed
    if isinstance(parsed, str):
        return parsed, {}
    if hasattr(parsed, "name"):
        settings = getattr(parsed, "settings", None) or getattr(parsed, "params", None) or {}
        return str(parsed.name), dict(settings)
    raise NocloneError(f"transform {spec!r}: parse_transform returned {type(parsed).__name__}")


def _purify_transform(spec: str) -> Transform:
    def check(s: str) -> None:
        _parsed(s)

    def apply(images, s: str, pipe, seed: int):
        name, settings = _parsed(s)
        return list(_purify_module().apply_transform(name, images, model=pipe, seed=seed, **settings))

    model_transforms = getattr(_purify_module(), "MODEL_TRANSFORMS", ("purify",))  # the ones that run the model
    return Transform(check, apply, needs_model=spec.split(":")[0].strip().lower() in model_transforms)


TRANSFORMS: dict[str, Transform] = {
    "none": Transform(lambda spec: None, lambda images, spec, pipe, seed: list(images)),
}


def transform(spec: str) -> Transform:
    """The transform for a spec like 'jpeg:75': a registered one by name, else noclone.attacks.purify's."""
    name = spec.split(":")[0].strip().lower()
    if name in TRANSFORMS:
        return TRANSFORMS[name]
    return _purify_transform(spec)


# --------------------------------------------------------------------------------------------------- attacks

ATTACKS = ("dreambooth", "lora", "ti", "none")  # 'none': generate from the (protected) model without personalizing
