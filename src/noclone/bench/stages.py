"""The benchmark's stages, each cached on disk under cache/<stage>/<key>.

A stage's key is the SHA-256 of a canonical JSON of its inputs' keys, its settings and the code version, so it is
known before anything runs: a finished stage is found by its key and never recomputed, and any changed setting
upstream changes every key downstream. Each stage is built in a temporary folder that is renamed into place when
it succeeds (noclone.data.atomic), so a killed run leaves no half-written result. Long stages (attacks, model
defences) keep their training checkpoints in cache/<stage>/.<key>.checkpoint and resume from them.

Stages: subject_photos, protected_model, cloaked_photos, transformed_photos, personalized, generated, metrics.
Class (prior-preservation) images are cached by noclone.class_images under cache/class_images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from noclone.bench.config import AttackSpec, BenchConfig, DefenceSpec, SubjectSpec
from noclone.data.atomic import atomic_output_dir, atomic_write_json
from noclone.errors import NocloneError

log = logging.getLogger(__name__)

BENCH_CACHE_VERSION = 1
# Bump a stage's number when its code changes what it produces: its cache entries (and those downstream) go stale.
STAGE_VERSIONS = {"subject_photos": 1, "protected_model": 1, "cloaked_photos": 1, "transformed_photos": 1,
                  "personalized": 1, "generated": 1, "metrics": 1}
META = "stage.json"


def canonical_json(obj) -> str:
    """Sorted keys, no whitespace, paths and other objects as strings: the same inputs give the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=True)


def code_version(stage: str) -> dict:
    """What code made a stage's result: part of its key."""
    from noclone import __version__

    return {"noclone": __version__, "bench": BENCH_CACHE_VERSION, "stage": STAGE_VERSIONS.get(stage, 1)}


def stage_key(stage: str, inputs: dict) -> str:
    """sha256 of the canonical JSON of (stage, inputs, code version)."""
    text = canonical_json({"stage": stage, "inputs": inputs, "code": code_version(stage)})
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Ref:
    """Something a stage produced or an input it read: its cache key and the path to use (images dir, model dir)."""

    key: str
    path: Path
    stage: str = "input"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def seconds(self) -> float:
        return float(self.meta.get("seconds", 0.0))


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


class Cache:
    """cache/<stage>/<key>/ folders, built atomically; counts what it computed and what it found."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.computed: Counter = Counter()
        self.found: Counter = Counter()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def checkpoint_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / f".{key}.checkpoint"

    def clean_temporaries(self) -> int:
        """Remove temporary folders left by a killed run (checkpoints are kept: they are resumable)."""
        removed = 0
        if self.root.is_dir():
            for stage_dir in self.root.iterdir():
                if not stage_dir.is_dir():
                    continue
                for entry in stage_dir.iterdir():
                    if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                        removed += 1
        return removed

    def run(self, stage: str, inputs: dict, build: Callable[[Path], dict | None], output: str = "") -> Ref:
        """The stage's result for `inputs`: found in the cache, or built by `build(tmp_dir)` and moved into place."""
        key = stage_key(stage, inputs)
        final = self.path(stage, key)
        if (final / META).is_file():
            self.found[stage] += 1
            return Ref(key, final / output if output else final, stage, json.loads((final / META).read_text()))
        started = time.perf_counter()
        gpu = _reset_gpu_peak()
        with atomic_output_dir(final, overwrite=True) as tmp:
            info = build(tmp) or {}
            meta = {"stage": stage, "key": key, "inputs": inputs, "code": code_version(stage),
                    "seconds": round(time.perf_counter() - started, 3), "peak_rss_mb": _peak_rss_mb(),
                    "peak_gpu_mb": _gpu_peak(gpu), **info}
            atomic_write_json(tmp / META, json.loads(canonical_json(meta)))
        shutil.rmtree(self.checkpoint_dir(stage, key), ignore_errors=True)
        _release_memory()
        self.computed[stage] += 1
        return Ref(key, final / output if output else final, stage, meta)


def _release_memory() -> None:
    """Free the pipelines a finished stage loaded before the next one loads its own."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _reset_gpu_peak() -> bool:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
            return True
    except Exception:  # noqa: BLE001 - memory accounting must never fail a stage
        pass
    return False


def _gpu_peak(active: bool) -> float | None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:  # noqa: BLE001
        pass
    return None


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Runtime:
    """Where models run; part of every model stage's key (GPU and CPU numbers differ)."""

    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def key(self) -> dict:
        """The resolved device type and dtype, e.g. {'device': 'cpu', 'dtype': 'float32'}."""
        from noclone.models.pipeline import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        return {"device": device.type, "dtype": str(resolve_dtype(self.dtype, device)).replace("torch.", "")}

    def load(self, path: Path):
        """A freshly loaded pipeline (stages that train change it in place)."""
        from noclone.models.pipeline import load_pipeline

        return load_pipeline(path, device=self.device, dtype=self.dtype)


def _file_digest(path: Path, memo: dict) -> str:
    from noclone.data.images import file_sha256

    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if tag not in memo:
        memo[tag] = file_sha256(path)
    return memo[tag]


def model_ref(cache: Cache, path_or_sandbox: str) -> Ref:
    """The input model: its path and a content hash of its files (memoised by path, size and mtime)."""
    from noclone.sandbox.assets import model_path

    path = model_path(path_or_sandbox)
    memo_file = cache.root / "file_hashes.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    before = len(memo)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        rel = f.relative_to(path) if path.is_dir() else f.name
        digest.update(f"{rel}:{_file_digest(f, memo)}\n".encode())
    if len(memo) != before:
        atomic_write_json(memo_file, memo)
    return Ref(digest.hexdigest(), path, "model")


def subject_photos(cache: Cache, subject: SubjectSpec, role: str) -> Ref:
    """The subject's photos ('train': what attacker and defender have; 'references': what identity is measured on)."""
    from noclone.data.images import file_sha256

    if subject.identity is not None:
        ids = subject.train_photos if role == "train" else subject.reference_photos
        inputs = {"sandbox": {"class": subject.class_noun, "identity": subject.identity, "photos": list(ids),
                              "size": subject.size}}

        def build(tmp: Path) -> dict:
            from noclone.data.images import save_image
            from noclone.sandbox.render import render

            (tmp / "images").mkdir()
            for photo in ids:
                save_image(render(subject.class_noun, subject.identity, photo, size=subject.size),
                           tmp / "images" / f"{photo:04d}.png")
            return {"n": len(ids)}
    else:
        files = [Path(p) for p in (subject.photos if role == "train" else subject.references)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise NocloneError(f"subject {subject.name}: photo {missing[0]} no longer exists")
        inputs = {"files": [[f.name, file_sha256(f)] for f in files]}

        def build(tmp: Path) -> dict:
            (tmp / "images").mkdir()
            for i, f in enumerate(files):
                shutil.copyfile(f, tmp / "images" / f"{i:04d}_{f.name}")
            return {"n": len(files), "sources": [str(f) for f in files]}

    return cache.run("subject_photos", {**inputs, "role": role}, build, "images")


@contextmanager
def _class_image_cache(cache: Cache) -> Iterator[Path]:
    """Point noclone's class-image cache (NOCLONE_CACHE/class_images) into this benchmark's cache."""
    before = os.environ.get("NOCLONE_CACHE")
    os.environ["NOCLONE_CACHE"] = str(cache.root)
    try:
        yield cache.root / "class_images"
    finally:
        if before is None:
            os.environ.pop("NOCLONE_CACHE", None)
        else:
            os.environ["NOCLONE_CACHE"] = before


# ------------------------------------------------------------------------------------------------- defences


def protected_model(cache: Cache, model: Ref, photos: Ref, subject: SubjectSpec, defence: DefenceSpec,
                    runtime: Runtime) -> Ref:
    """A model-level defence (APDM, PersGuard) run on the base model for one subject: a pipeline directory."""
    from noclone.bench.registry import defence as get_defence

    token = str(defence.settings.get("token", "sks"))
    inputs = {"model": model.key, "subject": {"photos": photos.key, "class": subject.class_noun, "token": token},
              "method": defence.method, "settings": defence.settings, "runtime": runtime.key()}

    negatives = [subject_photos(cache, negative_subject(subject, value), "train")
                 for value in defence.settings.get("negatives") or []]

    def build(tmp: Path) -> dict:
        from noclone.defenses.base import ProtectionSubject
        from noclone.sandbox.experiment import images_in

        entry = get_defence(defence.method)
        key = stage_key("protected_model", inputs)
        extra = {"negatives": [images_in(ref.path) for ref in negatives]} if negatives else {}
        with _class_image_cache(cache) as class_cache:
            entry.run(runtime.load(model.path), [ProtectionSubject.from_folder(photos.path, subject.class_noun, token)],
                      tmp / "model", defence.settings, class_cache, cache.checkpoint_dir("protected_model", key),
                      runtime.progress, **extra)
        return {"method": defence.method}

    return cache.run("protected_model", inputs, build, "model")


def negative_subject(subject: SubjectSpec, value) -> SubjectSpec:
    """A sandbox identity of the subject's class, as a subject whose train photos a defence keeps apart."""
    from noclone.sandbox.splits import parse_identity

    identity, short = parse_identity(value, "negatives")
    return SubjectSpec(f"{subject.class_noun}-{short}", subject.class_noun, identity, size=subject.size)


def cloaked_photos(cache: Cache, model: Ref, photos: Ref, defence: DefenceSpec, class_noun: str,
                   runtime: Runtime) -> Ref:
    """An image cloak (RID, ASPL, PhotoGuard ...) applied to the subject's photos: a folder of images."""
    from noclone.bench.registry import defence as get_defence

    entry = get_defence(defence.method)
    needs_model = entry.needs_model()
    settings = {"class_noun": class_noun, **defence.settings}
    inputs = {"photos": photos.key, "method": defence.method, "settings": settings,
              "model": model.key if needs_model else None, "runtime": runtime.key() if needs_model else None}

    def build(tmp: Path) -> dict:
        pipe = runtime.load(model.path) if needs_model else None
        entry.run(photos.path, tmp / "images", pipe, settings)
        _require_images(tmp / "images", f"defence {defence.name}")
        return {"method": defence.method}

    return cache.run("cloaked_photos", inputs, build, "images")


def transformed_photos(cache: Cache, model: Ref, photos: Ref, spec: str, seed: int, runtime: Runtime) -> Ref:
    """A photo transform (JPEG, resize, blur, purification ...) applied before the attack: a folder of images."""
    from noclone.bench.registry import transform
    from noclone.data.images import load_image_folder, save_image

    entry = transform(spec)
    inputs = {"photos": photos.key, "transform": spec, "seed": seed,
              "model": model.key if entry.needs_model else None,
              "runtime": runtime.key() if entry.needs_model else None}

    def build(tmp: Path) -> dict:
        loaded = load_image_folder(photos.path)
        pipe = runtime.load(model.path) if entry.needs_model else None
        images = entry.apply([im for _, im in loaded], spec, pipe, seed)
        if len(images) != len(loaded):
            raise NocloneError(f"transform {spec!r} returned {len(images)} images for {len(loaded)} photos")
        (tmp / "images").mkdir()
        for (path, _), image in zip(loaded, images):
            save_image(image, tmp / "images" / f"{path.stem}.png")
        return {"transform": spec}

    return cache.run("transformed_photos", inputs, build, "images")


def _require_images(folder: Path, what: str) -> None:
    from noclone.data.images import _image_files

    if not folder.is_dir() or not _image_files(folder):
        raise NocloneError(f"{what} wrote no images")


# ------------------------------------------------------------------------------------------ attack, generation


def _personalized_inputs(model: Ref, photos: Ref, attack: AttackSpec, class_noun: str, seed: int,
                         runtime: Runtime):
    config = attack.personalization(class_noun, seed, runtime.progress)
    settings = {k: v for k, v in asdict(config).items() if k not in ("progress", "checkpoint_every")}
    inputs = {"model": model.key, "photos": photos.key, "method": attack.method, "config": settings,
              "runtime": runtime.key()}
    return config, inputs, "lora" if attack.method == "lora" else "model"


def personalized(cache: Cache, model: Ref, photos: Ref, attack: AttackSpec, class_noun: str, seed: int,
                 runtime: Runtime, shorter: tuple[AttackSpec, ...] = ()) -> Ref:
    """The attacker's personalization (DreamBooth, LoRA, TI) of `model` on `photos`: a pipeline or LoRA directory.

    `shorter`: the same attack with fewer steps (a relearning curve). When this run trains, each of them that is
    not cached yet is written from this run's state at its step count, which is exactly its own result (no lr
    schedule; every step's randomness is drawn from its index), so the whole curve costs one run.
    """
    from noclone.attacks import METHODS

    config, inputs, output = _personalized_inputs(model, photos, attack, class_noun, seed, runtime)

    def build(tmp: Path) -> dict:
        key = stage_key("personalized", inputs)
        snapshots = {}
        for spec in shorter:
            short_config, short_inputs, _ = _personalized_inputs(model, photos, spec, class_noun, seed, runtime)
            same_run = {**asdict(short_config), "steps": config.steps} == asdict(config)
            if same_run and short_config.steps < config.steps and \
                    not (cache.path("personalized", stage_key("personalized", short_inputs)) / META).is_file():
                snapshots[short_config.steps] = _snapshot(cache, short_inputs, output, short_config)
        with _class_image_cache(cache):
            METHODS[attack.method](config).run(runtime.load(model.path), photos.path, tmp / output, overwrite=True,
                                               checkpoint_dir=cache.checkpoint_dir("personalized", key),
                                               snapshots=snapshots)
        return {"method": attack.method, "instance_prompt": config.instance_prompt, "kind": output}

    return cache.run("personalized", inputs, build, output)


def _snapshot(cache: Cache, inputs: dict, output: str, config) -> Callable:
    """A snapshot hook writing the cache entry of `inputs` (a shorter run of the same attack)."""

    def hook(save: Callable[[Path], None]) -> None:
        def build(tmp: Path) -> dict:
            save(tmp / output)
            return {"method": inputs["method"], "instance_prompt": config.instance_prompt, "kind": output,
                    "snapshot": True}

        cache.run("personalized", inputs, build, output)

    return hook


def generated(cache: Cache, base: Ref, attacked: Ref | None, prompts: list[str], config: BenchConfig, seed: int,
              runtime: Runtime) -> Ref:
    """Images of each prompt from the attacked model (`attacked` None: the base model itself): a folder + manifest."""
    from noclone.generation import GenerationConfig, generate_to_dir

    gen = config.generation
    gen_config = GenerationConfig(n=config.images_per_prompt, seed=1000 + 10_000 * seed, steps=gen.steps,
                                  guidance=gen.guidance, scheduler=gen.scheduler, batch_size=gen.batch_size,
                                  negative_prompt=gen.negative_prompt)
    lora = attacked is not None and attacked.meta.get("kind") == "lora"
    inputs = {"model": base.key, "attacked": attacked.key if attacked else None, "prompts": prompts,
              "generation": asdict(gen_config), "runtime": runtime.key()}

    def build(tmp: Path) -> dict:
        if lora:
            from noclone.models.pipeline import load_lora

            pipe = runtime.load(base.path)
            load_lora(pipe, str(attacked.path))
        else:
            pipe = runtime.load(attacked.path if attacked else base.path)
        generate_to_dir(pipe, prompts, tmp / "images", gen_config, overwrite=True, progress=runtime.progress)
        return {"prompts": prompts}

    return cache.run("generated", inputs, build, "images")


# ------------------------------------------------------------------------------------------------- metrics


def metrics(cache: Cache, images: Ref, references: Ref, class_noun: str, config: BenchConfig,
            defence: DefenceSpec) -> Ref:
    """The metrics of generated images against the references (plus the backdoor rate for PersGuard)."""
    from noclone.data.images import load_image_folder

    wanted = [m for m in config.metrics if m != "backdoor_rate"]
    evaluate = sorted({"ism" if m == "identity_match_rate" else m for m in wanted})
    backdoor = "backdoor_rate" in config.metrics and defence.method == "persguard"
    flat = {**defence.settings, **(defence.settings.get("backdoor") or {})}  # PersGuard's nested `backdoor` too
    target = {k: flat.get(k) for k in ("target", "target_class")} if backdoor else None
    inputs = {"images": images.key, "references": references.key, "class": class_noun, "metrics": evaluate,
              "evaluation": asdict(config.evaluation), "backdoor": target}

    def build(tmp: Path) -> dict:
        from noclone.eval.evaluate import evaluate_images

        gen = [im for _, im in load_image_folder(images.path)]
        ref = [im for _, im in load_image_folder(references.path)]
        ev = config.evaluation
        result = evaluate_images(gen, ref, evaluate, ev.backend, class_noun, arcface_models=ev.arcface_models,
                                 inception=ev.inception, identity_threshold=ev.identity_threshold) if evaluate else {}
        values = {k: result.get(k) for k in ("ism", "identity_match_rate", "fdfr", "brisque", "fid", "kid", "dino",
                                             "clip_i") if result.get(k) is not None}
        values["n_images"] = len(gen)
        if backdoor:
            from noclone.defenses.backdoor_checks import backdoor_rate

            values["backdoor_rate"] = backdoor_rate(str(target.get("target") or "pattern"), gen, class_noun=class_noun,
                                                    target_class=target.get("target_class"))
        atomic_write_json(tmp / "metrics.json", {"metrics": values, "details": result.get("details", {})})
        return {"metrics": values}

    return cache.run("metrics", inputs, build)
