"""The benchmark's YAML config: parsed into dataclasses and validated up front, every problem one line.

    name: my-bench
    models: [sandbox]                               # 'sandbox', a path, or {name: x, path: P}
    subjects:
      - {class: person, identity: "held_out:0"}     # a sandbox identity (or an int id)
      - {class: dog, photos: DIR, references: DIR2} # a folder of photos (+ optional reference folder)
      - {class: person, identities_dir: DIR, train: 4, limit: 10}  # one subject per sub-folder
    defences: [none, {apdm: {outer_steps: 10}}, {name: strong, method: apdm, beta: 0.5}]
    attacks: [{dreambooth: {steps: 60}}, {name: db-adaptive, method: dreambooth, lr_mult: 3, steps_mult: 2, token: zqv}]
    transforms: [none, "jpeg:75", "purify:0.15"]
    prompts: ["a photo of {token} {class_noun}"]
    images_per_prompt: 8
    seeds: [0]
    metrics: [ism, identity_match_rate, fdfr, brisque, fid, backdoor_rate]

List items of models/defences/attacks are a name, a one-key mapping ``{method: {settings}}`` or a mapping with
``method`` (and optionally ``name``) plus settings. Optional keys: ``generation`` ({steps, guidance, scheduler,
batch_size, negative_prompt}), ``evaluation`` ({backend, arcface_models, inception, identity_threshold}),
``device``, ``dtype``, ``attack_preset`` (sandbox | sd15), ``defence_preset`` (quick | paper), ``requires``
({gpu: true}), ``report`` ({images_per_cell}). Relative paths are relative to the config file.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from noclone.data.yamlfile import load_yaml
from noclone.errors import NocloneError
from noclone.sandbox.splits import parse_identity

KNOWN_KEYS = {"name", "description", "models", "subjects", "defences", "defenses", "attacks", "transforms", "prompts",
              "images_per_prompt", "seeds", "metrics", "generation", "evaluation", "device", "dtype", "attack_preset",
              "defence_preset", "requires", "report"}
REQUIRED_KEYS = ("models", "subjects", "defences", "attacks")
BENCH_METRICS = ("ism", "identity_match_rate", "fdfr", "brisque", "fid", "kid", "dino", "clip_i", "backdoor_rate")
DEFAULT_METRICS = ["ism", "identity_match_rate", "fdfr"]
SANDBOX_CLASSES = ("person", "dog", "cat")
TRAIN_PHOTOS = tuple(range(0, 5))        # as noclone.sandbox.experiment: what the attacker (and defender) has
REFERENCE_PHOTOS = tuple(range(100, 108))  # held-back photos identity is measured against
ATTACK_KEYS = ("lr_mult", "steps_mult", "preset")


@dataclass
class ModelSpec:
    name: str
    path: str  # 'sandbox' or a local diffusers directory / .safetensors file


@dataclass
class SubjectSpec:
    """A sandbox identity (``identity`` set) or photo files (``photos``, ``references``)."""

    name: str
    class_noun: str
    identity: int | None = None
    train_photos: tuple[int, ...] = TRAIN_PHOTOS
    reference_photos: tuple[int, ...] = REFERENCE_PHOTOS
    size: int = 64
    photos: tuple[str, ...] = ()
    references: tuple[str, ...] = ()


@dataclass
class DefenceSpec:
    name: str
    method: str
    kind: str  # 'none' | 'model' | 'cloak'
    settings: dict = field(default_factory=dict)


@dataclass
class AttackSpec:
    """An attack and its settings; ``lr_mult`` / ``steps_mult`` scale the preset (adaptive attackers)."""

    name: str
    method: str
    settings: dict = field(default_factory=dict)
    lr_mult: float = 1.0
    steps_mult: float = 1.0
    preset: str = "sandbox"

    def personalization(self, class_noun: str, seed: int, progress: bool = False):
        """The resolved PersonalizationConfig for one subject class and seed."""
        from noclone.attacks.base import preset_config

        try:
            config = preset_config(self.method, self.preset, class_noun=class_noun, seed=seed, progress=progress,
                                   **self.settings)
        except TypeError as exc:
            bad = re.findall(r"'(\w+)'", str(exc))
            raise NocloneError(f"attack {self.name!r}: unknown setting {bad[0] if bad else exc!s}") from None
        config.lr *= self.lr_mult
        config.steps = max(1, round(config.steps * self.steps_mult))
        config.validate()
        return config


@dataclass
class TransformSpec:
    name: str  # the spec as written, e.g. 'jpeg:75'


@dataclass
class GenerationSpec:
    steps: int = 25
    guidance: float = 7.5
    scheduler: str | None = None
    batch_size: int = 8
    negative_prompt: str | None = None


@dataclass
class EvaluationSpec:
    backend: str = "sandbox"
    arcface_models: str | None = None
    inception: str | None = None
    identity_threshold: float | None = None


@dataclass
class BenchConfig:
    name: str
    models: list[ModelSpec]
    subjects: list[SubjectSpec]
    defences: list[DefenceSpec]
    attacks: list[AttackSpec]
    transforms: list[TransformSpec]
    prompts: list[str]
    images_per_prompt: int = 8
    seeds: list[int] = field(default_factory=lambda: [0])
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "auto"
    dtype: str = "auto"
    requires: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict:
        """Plain JSON-able form (stored in the results database)."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    """The shipped presets (noclone/bench/presets/*.yaml)."""
    return sorted(p.name[:-5] for p in resources.files("noclone.bench").joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of a shipped preset."""
    if name not in preset_names():
        raise NocloneError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return resources.files("noclone.bench").joinpath("presets", f"{name}.yaml").read_text()


def load_raw(path: str | Path | None = None, preset: str | None = None,
             overrides: list[str] | None = None) -> tuple[dict, Path]:
    """The YAML mapping of a config file or a preset, with `--set key.sub=value` overrides; and its base directory."""
    if (path is None) == (preset is None):
        raise NocloneError("give a CONFIG.yaml or --preset NAME (one of them)")
    if preset is not None:
        text, base, label = preset_text(preset), Path.cwd(), f"preset {preset}"
    else:
        p = Path(path)
        if not p.is_file():
            raise NocloneError(f"{p}: no such config file")
        text, base, label = p.read_text(), p.resolve().parent, str(p)
    raw = load_yaml(text, label)
    if not isinstance(raw, dict):
        raise NocloneError(f"{label}: expected a mapping of settings at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    raw.setdefault("name", preset or Path(path).stem)
    return _numbers(raw), base


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.0.c=value` in the raw config (value parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise NocloneError(f"--set {item!r}: expected KEY=VALUE (e.g. models.0.path=/models/sd15)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise NocloneError(f"--set {key}: {'.'.join(parts[:i]) or 'top'} has no item {part}")
            part = int(part)
        elif not isinstance(node, dict):
            raise NocloneError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or list")
        if last:
            node[part] = yaml.safe_load(value)
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(obj):
    """YAML 1.1 reads '2e-4' as a string: make such strings floats."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    if isinstance(obj, str) and _SCIENTIFIC.match(obj.strip()):
        return float(obj)
    return obj


# ------------------------------------------------------------------------------------------------- validation


def _items(raw, where: str) -> list[tuple[str, str | None, dict]]:
    """[(method, name or None, settings)] from a list of names / one-key mappings / mappings with `method`."""
    if raw is None or isinstance(raw, (str, dict)):
        raw = [raw] if raw is not None else []
    if not isinstance(raw, list) or not raw:
        raise NocloneError(f"{where}: expected a non-empty list")
    out = []
    for i, item in enumerate(raw):
        label = f"{where}[{i}]"
        if isinstance(item, str):
            out.append((item.strip(), None, {}))
        elif isinstance(item, dict) and "method" in item:
            settings = {k: v for k, v in item.items() if k not in ("method", "name", "settings")}
            if isinstance(item.get("settings"), dict):
                settings.update(item["settings"])
            out.append((str(item["method"]).strip(), item.get("name"), settings))
        elif isinstance(item, dict) and len(item) == 1:
            (method, settings), = item.items()
            if settings is None:
                settings = {}
            if not isinstance(settings, dict):
                raise NocloneError(f"{label}: settings of {method!r} must be a mapping, got {settings!r}")
            settings = dict(settings)
            name = settings.pop("name", None)
            out.append((str(method).strip(), name, settings))
        else:
            raise NocloneError(f"{label}: expected a name, {{method: {{settings}}}} or a mapping with 'method', "
                               f"got {item!r}")
    return out


def _unique_names(specs, where: str) -> None:
    seen = set()
    for s in specs:
        if s.name in seen:
            raise NocloneError(f"{where}: two entries named {s.name!r}; give each a distinct 'name'")
        seen.add(s.name)


def _int(value, label: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NocloneError(f"{label}: expected an integer >= {minimum}, got {value!r}")
    return value


def _path(value, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def _models(raw, base: Path, missing: list[str]) -> list[ModelSpec]:
    if raw is None or isinstance(raw, (str, dict)):
        raw = [raw] if raw is not None else []
    if not isinstance(raw, list) or not raw:
        raise NocloneError("models: expected a non-empty list")
    models = []
    for i, item in enumerate(raw):
        label = f"models[{i}]"
        if isinstance(item, dict):
            unknown = set(item) - {"name", "path"}
            if unknown:
                raise NocloneError(f"{label}: unknown key(s) {', '.join(sorted(unknown))}; expected name, path")
            path, name = item.get("path"), item.get("name")
        else:
            path, name = item, None
        if path in (None, ""):
            missing.append(f"{label}.path (a local diffusers model directory)")
            models.append(ModelSpec(str(name or label), ""))
            continue
        from noclone.sandbox.assets import is_shipped

        if is_shipped(path):
            models.append(ModelSpec(str(name or path), str(path)))
            continue
        p = _path(path, base)
        if not p.exists():
            missing.append(f"{label}.path {p} (no such model directory or file)")
        elif p.is_dir() and not (p / "model_index.json").is_file():
            raise NocloneError(f"{label}: {p}/ is not a diffusers pipeline directory (no model_index.json)")
        models.append(ModelSpec(str(name or p.name), str(p)))
    _unique_names(models, "models")
    return models


def _image_files(folder: Path, label: str) -> list[Path]:
    from noclone.data.images import _image_files

    if not folder.is_dir():
        raise NocloneError(f"{label}: {folder}/ is not a directory")
    return _image_files(folder)


def _subjects(raw, base: Path, missing: list[str]) -> list[SubjectSpec]:
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise NocloneError("subjects: expected a non-empty list")
    subjects = []
    keys = {"class", "class_noun", "name", "identity", "photos", "references", "identities_dir", "train", "limit",
            "train_photos", "reference_photos", "size", "train_subdir", "references_subdir"}
    for i, item in enumerate(raw):
        label = f"subjects[{i}]"
        if not isinstance(item, dict):
            raise NocloneError(f"{label}: expected a mapping like {{class: person, identity: 'held_out:0'}}")
        unknown = set(item) - keys
        if unknown:
            raise NocloneError(f"{label}: unknown key(s) {', '.join(sorted(unknown))}")
        noun = item.get("class", item.get("class_noun"))
        if not noun or not str(noun).strip():
            raise NocloneError(f"{label}: missing 'class' (the subject's class noun, e.g. person)")
        noun = str(noun).strip()
        sources = [k for k in ("identity", "photos", "identities_dir") if k in item]
        if len(sources) != 1:
            raise NocloneError(f"{label}: give exactly one of identity (sandbox), photos (a folder) or identities_dir")
        if "identity" in item:
            if noun not in SANDBOX_CLASSES:
                raise NocloneError(f"{label}: sandbox identities are {', '.join(SANDBOX_CLASSES)}, not {noun!r}")
            ident, short = parse_identity(item["identity"], label)
            train = tuple(item.get("train_photos", TRAIN_PHOTOS))
            refs = tuple(item.get("reference_photos", REFERENCE_PHOTOS))
            if len(train) < 2 or not refs:
                raise NocloneError(f"{label}: need at least 2 train_photos and 1 reference_photos")
            subjects.append(SubjectSpec(str(item.get("name") or f"{noun}-{short}"), noun, ident, train, refs,
                                        _int(item.get("size", 64), f"{label}.size", 8)))
        elif "photos" in item:
            if item["photos"] in (None, ""):
                missing.append(f"{label}.photos (a folder of the subject's photos)")
                continue
            folder = _path(item["photos"], base)
            if not folder.is_dir():
                missing.append(f"{label}.photos {folder}/ (no such folder)")
                continue
            photos = _image_files(folder, f"{label}.photos")
            if len(photos) < 2:
                raise NocloneError(f"{label}: {folder}/ has {len(photos)} image(s), need at least 2")
            refs = photos
            if item.get("references"):
                refs = _image_files(_path(item["references"], base), f"{label}.references")
                if not refs:
                    raise NocloneError(f"{label}.references: no images found")
            subjects.append(SubjectSpec(str(item.get("name") or folder.name), noun,
                                        photos=tuple(map(str, photos)), references=tuple(map(str, refs))))
        else:
            if item["identities_dir"] in (None, ""):
                missing.append(f"{label}.identities_dir (a folder with one sub-folder of photos per identity)")
                continue
            root = _path(item["identities_dir"], base)
            if not root.is_dir():
                missing.append(f"{label}.identities_dir {root}/ (no such folder)")
                continue
            n_train = _int(item.get("train", 4), f"{label}.train", 2)
            limit = item.get("limit")
            folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            folders = folders[: _int(limit, f"{label}.limit", 1)] if limit is not None else folders
            if not folders:
                raise NocloneError(f"{label}: {root}/ has no identity sub-folders")
            for folder in folders:
                if item.get("train_subdir"):  # e.g. the Anti-DreamBooth layout: id/set_B (photos), id/set_A (refs)
                    photos = _image_files(folder / str(item["train_subdir"]), label)
                    refs = _image_files(folder / str(item.get("references_subdir") or item["train_subdir"]), label)
                    if len(photos) < 2 or not refs:
                        raise NocloneError(f"{label}: {folder}/ needs at least 2 photos in {item['train_subdir']}/ "
                                           "and 1 reference")
                else:
                    files = _image_files(folder, label)
                    if len(files) <= n_train:
                        raise NocloneError(f"{label}: {folder}/ has {len(files)} images, need more than "
                                           f"train={n_train} (the rest are the references)")
                    photos, refs = files[:n_train], files[n_train:]
                subjects.append(SubjectSpec(f"{noun}-{folder.name}", noun, photos=tuple(map(str, photos)),
                                            references=tuple(map(str, refs))))
    _unique_names(subjects, "subjects")
    return subjects


def _defences(raw, default_preset: str) -> list[DefenceSpec]:
    from noclone.bench import registry

    specs = []
    for i, (method, name, settings) in enumerate(_items(raw, "defences")):
        label = f"defences[{i}]"
        method = method.lower()
        if method not in registry.DEFENCES:
            raise NocloneError(f"{label}: unknown defence {method!r}; available: {', '.join(registry.DEFENCES)}")
        entry = registry.DEFENCES[method]
        if entry.kind == "none" and settings:
            raise NocloneError(f"{label}: defence 'none' takes no settings")
        if entry.kind == "model":
            settings.setdefault("preset", default_preset)
        elif entry.kind == "cloak":  # cloak presets are named after the model scale
            settings.setdefault("preset", "paper" if default_preset == "paper" else "sandbox")
        try:
            entry.check(settings)
        except NocloneError as exc:
            raise NocloneError(f"{label}: {exc}") from None
        specs.append(DefenceSpec(str(name or method), method, entry.kind, settings))
    _unique_names(specs, "defences")
    return specs


def _attacks(raw, default_preset: str) -> list[AttackSpec]:
    from noclone.bench.registry import ATTACKS

    specs = []
    for i, (method, name, settings) in enumerate(_items(raw, "attacks")):
        label = f"attacks[{i}]"
        method = method.lower()
        if method not in ATTACKS:
            raise NocloneError(f"{label}: unknown attack {method!r}; available: {', '.join(ATTACKS)}")
        extra = {k: settings.pop(k) for k in ATTACK_KEYS if k in settings}
        for k in ("lr_mult", "steps_mult"):
            if k in extra and (isinstance(extra[k], bool) or not isinstance(extra[k], (int, float)) or extra[k] <= 0):
                raise NocloneError(f"{label}: {k} must be a positive number, got {extra[k]!r}")
        if method == "none" and settings:
            raise NocloneError(f"{label}: attack 'none' takes no settings")
        spec = AttackSpec(str(name or method), method, settings, float(extra.get("lr_mult", 1.0)),
                          float(extra.get("steps_mult", 1.0)), str(extra.get("preset", default_preset)))
        if method != "none":
            try:
                spec.personalization("person", 0)
            except NocloneError as exc:
                raise NocloneError(f"{label}: {exc}") from None
        specs.append(spec)
    _unique_names(specs, "attacks")
    return specs


def _transforms(raw) -> list[TransformSpec]:
    from noclone.bench.registry import transform

    if raw is None:
        raw = ["none"]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise NocloneError("transforms: expected a non-empty list like [none, 'jpeg:75']")
    specs = []
    for i, spec in enumerate(raw):
        if not isinstance(spec, str) or not spec.strip() or spec.strip().startswith(":"):
            raise NocloneError(f"transforms[{i}]: expected a spec like 'jpeg:75', got {spec!r}")
        spec = spec.strip()
        try:
            transform(spec).check(spec)
        except NocloneError as exc:
            raise NocloneError(f"transforms[{i}] {spec!r}: {exc}") from None
        specs.append(TransformSpec(spec))
    _unique_names(specs, "transforms")
    return specs


def _metrics(raw) -> list[str]:
    if raw is None:
        return list(DEFAULT_METRICS)
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise NocloneError("metrics: expected a non-empty list")
    out = []
    for m in items:
        m = str(m).strip().lower().replace("-", "_")
        if m not in BENCH_METRICS:
            raise NocloneError(f"metrics: unknown metric {m!r}; available: {', '.join(BENCH_METRICS)}")
        if m not in out:
            out.append(m)
    return out


def _section(raw, cls, label: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise NocloneError(f"{label}: expected a mapping")
    known = set(cls.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise NocloneError(f"{label}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(known))}")
    return cls(**raw)


def validate(raw: dict, base: Path | None = None, check_runtime: bool = True) -> BenchConfig:
    """A BenchConfig from the raw YAML mapping, or NocloneError naming the first problem (or all missing inputs)."""
    raw = copy.deepcopy(raw)
    base = base or Path.cwd()
    if "defenses" in raw and "defences" not in raw:
        raw["defences"] = raw.pop("defenses")
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise NocloneError(f"unknown config key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(KNOWN_KEYS))}")
    absent = [k for k in REQUIRED_KEYS if not raw.get(k)]
    if absent:
        raise NocloneError(f"config is missing required key(s): {', '.join(absent)}")
    name = str(raw.get("name") or "bench")
    missing: list[str] = []
    models = _models(raw["models"], base, missing)
    subjects = _subjects(raw["subjects"], base, missing)
    requires = raw.get("requires") or {}
    evaluation = _section(raw.get("evaluation"), EvaluationSpec, "evaluation")
    if evaluation.backend not in ("sandbox", "dlib", "arcface"):
        raise NocloneError(f"evaluation.backend {evaluation.backend!r}: choose sandbox, dlib or arcface")
    if evaluation.backend == "arcface" and not evaluation.arcface_models:
        missing.append("evaluation.arcface_models (an insightface model folder: SCRFD detector + ArcFace .onnx)")
    for key in ("arcface_models", "inception"):
        value = getattr(evaluation, key)
        if value:
            p = _path(value, base)
            if not p.exists():
                missing.append(f"evaluation.{key} {p} (not found)")
            setattr(evaluation, key, str(p))
    if check_runtime and requires.get("gpu"):
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU (this config needs one; none is visible to torch)")
    if missing:
        raise NocloneError(f"{name}: missing inputs: " + "; ".join(missing))
    if check_runtime:
        from noclone.models.pipeline import resolve_device, resolve_dtype

        resolve_dtype(str(raw.get("dtype", "auto")), resolve_device(str(raw.get("device", "auto"))))
    if evaluation.backend == "sandbox":
        odd = sorted({s.class_noun for s in subjects} - set(SANDBOX_CLASSES))
        if odd:
            raise NocloneError(f"evaluation.backend sandbox measures only {', '.join(SANDBOX_CLASSES)}; "
                               f"got {', '.join(odd)}")
    attack_preset = str(raw.get("attack_preset", "sandbox"))
    defences = _defences(raw["defences"], str(raw.get("defence_preset", "quick")))
    attacks = _attacks(raw["attacks"], attack_preset)
    transforms = _transforms(raw.get("transforms"))
    prompts = raw.get("prompts") or ["a photo of {token} {class_noun}"]
    if isinstance(prompts, str):
        prompts = [prompts]
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise NocloneError(f"prompts: expected non-empty strings, got {p!r}")
        try:
            p.format(token="sks", class_noun="person")
        except (KeyError, IndexError, ValueError) as exc:
            raise NocloneError(f"prompts: {p!r} may use only {{token}} and {{class_noun}} ({exc})") from None
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise NocloneError("seeds: expected a non-empty list of integers")
    seeds = [_int(s, "seeds") for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise NocloneError("seeds: duplicates")
    metrics = _metrics(raw.get("metrics"))
    if "fid" in metrics or "kid" in metrics:
        n_gen = _int(raw.get("images_per_prompt", 8), "images_per_prompt", 1) * len(prompts)
        if n_gen < 2:
            raise NocloneError("metrics fid/kid need at least 2 generated images per cell")
    generation = _section(raw.get("generation"), GenerationSpec, "generation")
    _int(generation.steps, "generation.steps", 1)
    _int(generation.batch_size, "generation.batch_size", 1)
    report = raw.get("report") or {}
    if not isinstance(report, dict):
        raise NocloneError("report: expected a mapping")
    return BenchConfig(
        name=name, models=models, subjects=subjects, defences=defences, attacks=attacks, transforms=transforms,
        prompts=list(prompts), images_per_prompt=_int(raw.get("images_per_prompt", 8), "images_per_prompt", 1),
        seeds=seeds, metrics=metrics, generation=generation, evaluation=evaluation,
        device=str(raw.get("device", "auto")), dtype=str(raw.get("dtype", "auto")), requires=dict(requires),
        report=dict(report), source=str(raw.get("description", "")),
    )


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | None = None) -> BenchConfig:
    """Read, override and validate a config file or shipped preset."""
    raw, base = load_raw(path, preset, overrides)
    return validate(raw, base)
