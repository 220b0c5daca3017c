"""Run an audit: every attacker of the battery against one protection, through the bench's cached stages.

Each measurement is a job (an attacker on one side, at one length and seed). A job's stages (photos, surgery,
personalization, generation, metrics) live in OUT/cache under their content hashes, and its row is written to
OUT/rows/<job>.json when it finishes, so a killed audit resumes and `--shard I/N` splits the jobs between processes
sharing OUT. Whoever finishes writes the verdict (audit.json, audit.html) from the rows present; missing rows are
listed as such.

Sides: `protected` (the protected model, or the cloaked photos), `unprotected` (the base model, or the clean
photos: the reference the protection is measured against), `collateral` (another subject of the class on the
protected and on the base model) and `generic` (class-prompt samples of the protected and the base model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from noclone.audit.battery import Attacker, Battery, load_battery
from noclone.audit.threats import defence_key, threat_model
from noclone.bench import stages
from noclone.bench.config import AttackSpec, BenchConfig, DefenceSpec, EvaluationSpec, GenerationSpec
from noclone.data.atomic import atomic_write_json
from noclone.errors import NocloneError

log = logging.getLogger(__name__)

MARKER = ".noclone-audit"
AUDIT_VERSION = 1


@dataclass
class AuditConfig:
    """What to audit and how hard; `level` 'model' (protected weights) or 'cloak' (cloaked photos)."""

    level: str
    model: str
    class_noun: str
    images: str | None = None          # model level: the subject's clean photos (what the attacker fine-tunes on)
    cloaked: str | None = None         # cloak level: the cloaked photos
    clean: str | None = None           # cloak level: the same photos, clean
    base: str | None = None            # model level: the unprotected original (reference, surgery, collateral)
    references: str | None = None      # photos identity is measured against (default: the clean photos)
    other_images: str | None = None    # model level: another subject of the class (collateral)
    battery: str = "quick"
    threshold: float = 0.2
    seeds: list[int] = field(default_factory=lambda: [0])
    images_per_prompt: int = 16
    prompts: list[str] = field(default_factory=lambda: ["a photo of {token} {class_noun}"])
    generic_samples: int = 32
    attack_preset: str | None = None   # None: the battery's (sandbox)
    device: str = "auto"
    dtype: str = "auto"
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    progress: bool = True


@dataclass
class Job:
    side: str                  # protected | unprotected | collateral-protected | collateral-unprotected | generic-*
    attacker: Attacker | None
    length: float = 1.0        # multiple of the attacker's steps (the relearning curve)
    seed: int = 0

    @property
    def name(self) -> str:
        who = self.attacker.name if self.attacker else "samples"
        return f"{self.side}.{who}.x{self.length:g}.s{self.seed}"


def jobs(config: AuditConfig, battery: Battery) -> list[Job]:
    """Every job of the audit, in the order that reaches a verdict soonest (the preset first)."""
    attackers = battery.for_level(config.level)
    preset = next((a for a in attackers if a.name == "preset"), None) or Attacker("preset", "personalization",
                                                                                  battery.attack)
    has_reference = config.level == "cloak" or config.base is not None
    out: list[Job] = []
    for seed in config.seeds:
        out.append(Job("protected", preset, 1.0, seed))
        if has_reference:
            out.append(Job("unprotected", preset, 1.0, seed))
        out += [Job("protected", a, 1.0, seed) for a in attackers if a.name != preset.name]
        if has_reference and battery.unprotected == "all":  # each attack's own unprotected reference
            out += [Job("unprotected", a, 1.0, seed) for a in attackers
                    if a.name != preset.name and a.kind == "personalization" and not a.mix_clean]
        for length in battery.relearning:
            if length != 1.0:
                out.append(Job("protected", preset, length, seed))
                if has_reference:
                    out.append(Job("unprotected", preset, length, seed))
        if config.level == "model" and config.other_images:
            out.append(Job("collateral-protected", preset, 1.0, seed))
            if config.base:
                out.append(Job("collateral-unprotected", preset, 1.0, seed))
    if config.level == "model":
        out.append(Job("generic-protected", None))
        if config.base:
            out += [Job("generic-base", None), Job("generic-floor", None)]
    return out


# ------------------------------------------------------------------------------------------------ checking


def _folder(path: str | None, label: str, min_images: int = 2) -> Path:
    from noclone.data.images import _image_files

    if not path:
        raise NocloneError(f"{label} is required")
    p = Path(path)
    if not p.is_dir():
        raise NocloneError(f"{label} {p}: not a directory")
    n = len(_image_files(p))
    if n < min_images:
        raise NocloneError(f"{label} {p}: {n} image(s), need at least {min_images}")
    return p


def _model_path(path: str | None, label: str) -> str:
    from noclone.sandbox.assets import is_shipped

    if is_shipped(path):
        return path
    if not path:
        raise NocloneError(f"{label} is required")
    p = Path(path)
    if not p.is_dir() or not (p / "model_index.json").is_file():
        raise NocloneError(f"{label} {p}: not a diffusers pipeline directory (no model_index.json)")
    return str(p)


def check(config: AuditConfig) -> Battery:
    """Validate the inputs before anything runs; returns the battery."""
    if config.level not in ("model", "cloak"):
        raise NocloneError(f"audit level {config.level!r}: choose model or cloak")
    _model_path(config.model, "--model")
    if config.base:
        _model_path(config.base, "--base")
    if config.level == "model":
        _folder(config.images, "--images")
        if config.cloaked or config.clean:
            raise NocloneError("--cloaked/--clean audit cloaked photos; with --images the model is audited (choose one)")
        if config.other_images:
            _folder(config.other_images, "--other-images")
    else:
        cloaked, clean = _folder(config.cloaked, "--cloaked"), _folder(config.clean, "--clean")
        from noclone.data.images import _image_files

        if len(_image_files(cloaked)) != len(_image_files(clean)):
            raise NocloneError(f"--cloaked has {len(_image_files(cloaked))} photos and --clean "
                               f"{len(_image_files(clean))}: they must be the same photos")
        if config.other_images:
            raise NocloneError("--other-images (collateral on another subject) is a model-level option")
    if config.references:
        _folder(config.references, "--references", 1)
    if not 0 <= config.threshold <= 1:
        raise NocloneError(f"--threshold {config.threshold}: must be in [0, 1]")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds) or min(config.seeds) < 0:
        raise NocloneError("--seeds: distinct non-negative integers, e.g. 0,1")
    if config.images_per_prompt < 1 or config.generic_samples < 2:
        raise NocloneError("--images-per-prompt must be >= 1 and generic samples >= 2")
    if config.evaluation.backend == "sandbox":
        from noclone.bench.config import SANDBOX_CLASSES

        if config.class_noun not in SANDBOX_CLASSES:
            raise NocloneError(f"the sandbox evaluator measures {', '.join(SANDBOX_CLASSES)}, not "
                               f"{config.class_noun!r} (give --evaluation-backend dlib or arcface)")
    battery = load_battery(config.battery)
    attackers = battery.for_level(config.level)
    if not attackers:
        raise NocloneError(f"battery {battery.name}: no attacker applies to a {config.level}-level audit")
    needs_base = [a.name for a in attackers if a.kind == "surgery"]
    if needs_base and not config.base:
        log.warning("audit: no --base, so the surgery attackers (%s), the unprotected reference and the relearning "
                    "target are skipped", ", ".join(needs_base))
    for a in attackers:
        if a.class_word and config.class_noun not in battery.class_words:
            raise NocloneError(f"battery {battery.name}: attacker {a.name} needs class_words.{config.class_noun}")
        try:
            _attack_spec(a, battery, config, 1.0).personalization(config.class_noun, 0)
        except NocloneError as exc:
            raise NocloneError(f"battery {battery.name}: attacker {a.name}: {exc}") from None
    return battery


# ------------------------------------------------------------------------------------------------- stages


def _attack_spec(attacker: Attacker, battery: Battery, config: AuditConfig, length: float) -> AttackSpec:
    settings = {**battery.attack_settings, **attacker.settings}
    if attacker.token:
        settings["token"] = attacker.token
    return AttackSpec(attacker.name, attacker.method, settings, attacker.lr_mult, attacker.steps_mult * length,
                      config.attack_preset or battery.attack_preset)


def _bench_config(config: AuditConfig, prompts: list[str], n: int, metrics: list[str]) -> BenchConfig:
    return BenchConfig(name="audit", models=[], subjects=[], defences=[], attacks=[], transforms=[], prompts=prompts,
                       images_per_prompt=n, seeds=list(config.seeds), metrics=metrics,
                       generation=config.generation, evaluation=config.evaluation, device=config.device,
                       dtype=config.dtype)


def _folder_ref(cache: stages.Cache, folder: str, role: str) -> stages.Ref:
    """A folder of photos as a cached input (hashed by content, copied once)."""
    from noclone.bench.config import SubjectSpec
    from noclone.data.images import _image_files

    files = tuple(str(p) for p in _image_files(Path(folder)))
    subject = SubjectSpec(Path(folder).name or "photos", "x", photos=files, references=files)
    return stages.subject_photos(cache, subject, role)


def mixed_photos(cache: stages.Cache, cloaked: stages.Ref, clean: stages.Ref, share: float) -> stages.Ref:
    """The cloaked photos with `share` of them (at least one, never all) replaced by their clean originals."""
    from noclone.data.images import _image_files

    inputs = {"cloaked": cloaked.key, "clean": clean.key, "share": share}

    def build(tmp: Path) -> dict:
        a, b = _image_files(cloaked.path), _image_files(clean.path)
        k = min(len(a) - 1, max(1, round(share * len(a))))
        (tmp / "images").mkdir()
        for i, (c, o) in enumerate(zip(a, b)):
            src = o if i < k else c
            shutil.copyfile(src, tmp / "images" / f"{i:04d}{src.suffix}")
        return {"clean": k, "cloaked": len(a) - k}

    return cache.run("mixed_photos", inputs, build, "images")


def surgered(cache: stages.Cache, model: stages.Ref, base: stages.Ref, attacker: Attacker, class_noun: str,
             seed: int, runtime: stages.Runtime) -> stages.Ref:
    """`model` after one surgery operation taking parts from `base`: a pipeline directory."""
    from noclone.attacks.surgery import SurgeryConfig, apply_surgery

    extra = {k: int(v) for k, v in (("steps", attacker.surgery_steps), ("n_images", attacker.surgery_images)) if v}
    surgery = SurgeryConfig(attacker.op, attacker.group, seed=seed, progress=runtime.progress, **extra)
    surgery.validate()
    settings = {k: v for k, v in asdict(surgery).items() if k != "progress"}
    inputs = {"model": model.key, "base": base.key, "surgery": settings, "class": class_noun,
              "runtime": runtime.key()}

    def build(tmp: Path) -> dict:
        from noclone.models.pipeline import save_pipeline

        pipe = runtime.load(model.path)
        with stages._class_image_cache(cache) as class_cache:
            done = apply_surgery(pipe, runtime.load(base.path), surgery, class_noun, class_cache)
        save_pipeline(pipe, tmp / "model", overwrite=True, extra_files={"surgery.json": json.dumps(done, indent=2)})
        return {"surgery": done}

    return cache.run("surgery", inputs, build, "model")


class Auditor:
    """Runs jobs through the cache; holds the resolved inputs."""

    def __init__(self, config: AuditConfig, battery: Battery, out: Path, cache: Path | None = None):
        self.config, self.battery, self.out = config, battery, out
        self.cache = stages.Cache(cache or out / "cache")
        self.runtime = stages.Runtime(config.device, config.dtype, config.progress)
        self.model = stages.model_ref(self.cache, config.model)
        self.base = stages.model_ref(self.cache, config.base) if config.base else None
        if config.level == "model":
            self.photos = self.clean = _folder_ref(self.cache, config.images, "train")
        else:
            self.photos = _folder_ref(self.cache, config.cloaked, "train")
            self.clean = _folder_ref(self.cache, config.clean, "train")
        self.references = _folder_ref(self.cache, config.references, "references") if config.references else \
            _folder_ref(self.cache, config.images if config.level == "model" else config.clean, "references")
        self.other = _folder_ref(self.cache, config.other_images, "train") if config.other_images else None
        self.card = _read_card(config)
        self.defence = self._defence_spec()

    def _defence_spec(self) -> DefenceSpec:
        """For the metrics stage: a PersGuard card turns on the backdoor rate with its target."""
        if self.config.level == "model" and self.card and self.card.get("method") == "persguard":
            hp = self.card.get("hyperparameters") or {}
            hp = {**hp, **(hp.get("backdoor") or {})}  # newer cards keep target / target_class in a section
            return DefenceSpec("persguard", "persguard", "model",
                               {"target": hp.get("target", "pattern"), "target_class": hp.get("target_class")})
        return DefenceSpec("protection", "none", "none", {})

    def run(self, job: Job) -> dict:
        if job.side.startswith("generic"):
            return self._generic(job)
        cfg, attacker = self.config, job.attacker
        model = self.model
        if job.side in ("unprotected", "collateral-unprotected") and cfg.level == "model":
            model = self.base
        photos = self.photos
        if job.side == "unprotected" and cfg.level == "cloak":
            photos = self.clean
        if job.side.startswith("collateral"):
            photos = self.other
        if job.side == "protected":
            if attacker.mix_clean:
                photos = mixed_photos(self.cache, self.photos, self.clean, attacker.mix_clean)
            if attacker.kind == "purification":
                photos = stages.transformed_photos(self.cache, model, photos, attacker.transform, job.seed,
                                                   self.runtime)
            if attacker.kind == "surgery" and attacker.when == "before":
                model = surgered(self.cache, model, self.base, attacker, cfg.class_noun, job.seed, self.runtime)
        attack_class = self.battery.class_words[cfg.class_noun] if attacker.class_word else cfg.class_noun
        spec = _attack_spec(attacker, self.battery, cfg, job.length)
        lengths = sorted(self.battery.relearning)
        if attacker.name == "preset" and job.side in ("protected", "unprotected") and len(lengths) > 1:
            # the relearning curve in one run: the longest attack, with the shorter ones written on the way
            stages.personalized(self.cache, model, photos, _attack_spec(attacker, self.battery, cfg, lengths[-1]),
                                attack_class, job.seed, self.runtime,
                                shorter=tuple(_attack_spec(attacker, self.battery, cfg, n) for n in lengths[:-1]))
        attacked = stages.personalized(self.cache, model, photos, spec, attack_class, job.seed, self.runtime)
        personalization = spec.personalization(attack_class, job.seed)
        gen_model, gen_attacked = model, attacked
        if job.side == "protected" and attacker.kind == "surgery" and attacker.when == "after":
            gen_model, gen_attacked = surgered(self.cache, attacked, self.base, attacker, cfg.class_noun, job.seed,
                                               self.runtime), None
        prompts = [p.format(token=personalization.token, class_noun=attack_class) for p in cfg.prompts]
        bench = _bench_config(cfg, prompts, cfg.images_per_prompt, ["ism", "identity_match_rate", "fdfr"]
                              + (["backdoor_rate"] if self.defence.method == "persguard" else []))
        images = stages.generated(self.cache, gen_model, gen_attacked, prompts, bench, job.seed, self.runtime)
        references = self.references
        if job.side.startswith("collateral"):
            references = _folder_ref(self.cache, cfg.other_images, "references")
        scores = stages.metrics(self.cache, images, references, cfg.class_noun, bench, self.defence)
        return {**scores.meta["metrics"], "steps": personalization.steps, "lr": personalization.lr,
                "prompts": prompts, "images": _relative(images.path, self.out)}

    def _generic(self, job: Job) -> dict:
        """Class-prompt samples: the protected model's against the base model's (FID), and the detector rate."""
        cfg = self.config
        prompts = [f"a photo of a {cfg.class_noun}"]
        bench = _bench_config(cfg, prompts, cfg.generic_samples, ["fdfr", "fid"])
        model = self.model if job.side == "generic-protected" else self.base
        seed = 1 if job.side == "generic-floor" else 0
        images = stages.generated(self.cache, model, None, prompts, bench, seed, self.runtime)
        row = {"images": _relative(images.path, self.out), "prompts": prompts}
        # FID against the base model's own samples (the base itself: only its detector rate)
        against = None
        if self.base is not None and job.side != "generic-base":
            against = stages.generated(self.cache, self.base, None, prompts, bench, 0, self.runtime)
        scored = bench if against is not None else _bench_config(cfg, prompts, cfg.generic_samples, ["fdfr"])
        row.update(stages.metrics(self.cache, images, against or images, cfg.class_noun, scored,
                                  DefenceSpec("none", "none", "none")).meta["metrics"])
        return row


def _relative(path: Path, out: Path) -> str:
    """`path` relative to the audit folder (a shared cache lies beside it)."""
    import os

    return os.path.relpath(Path(path).resolve(), Path(out).resolve())


def _read_card(config: AuditConfig) -> dict | None:
    if config.level == "model":
        from noclone.defenses.base import read_protection_card

        from noclone.sandbox.assets import is_shipped

        return None if is_shipped(config.model) else read_protection_card(config.model)
    manifest = Path(config.cloaked) / "cloak.json"
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text())
        except ValueError as exc:
            raise NocloneError(f"{manifest}: unreadable ({exc})") from None
    return None


# ------------------------------------------------------------------------------------------------ the run


def _fingerprint(config: AuditConfig, battery: Battery) -> str:
    shown = {k: v for k, v in asdict(config).items() if k != "progress"}
    text = stages.canonical_json({"config": shown, "battery": asdict(battery), "version": AUDIT_VERSION})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_out(out: Path, fingerprint: str) -> Path:
    """Create or reuse an audit folder; rows of another audit setup in it are dropped (the cache is kept)."""
    out = Path(out)
    if out.is_file():
        raise NocloneError(f"{out}: exists and is a file, expected an output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise NocloneError(f"{out}/: exists, is not empty and is not a noclone audit folder (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if marker.is_file() and marker.read_text().strip() != fingerprint and (out / "rows").is_dir():
        log.info("audit: the setup changed since the last run in %s; its rows are re-collected from the cache", out)
        shutil.rmtree(out / "rows")
    marker.write_text(fingerprint + "\n")
    (out / "rows").mkdir(exist_ok=True)
    return out


def run_audit(config: AuditConfig, out: str | Path, shard: tuple[int, int] | None = None,
              cache: str | Path | None = None) -> dict:
    """Run (or resume) the audit into `out`; returns the verdict (also in OUT/audit.json and OUT/audit.html).
    `cache` (default OUT/cache) may be shared by several audits: attacks on the same model and photos (such as
    the unprotected reference) are then computed once."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from noclone.bench.runner import locked

    battery = check(config)
    out = prepare_out(Path(out), _fingerprint(config, battery))
    todo = jobs(config, battery)
    mine = todo
    if shard is not None:
        index, count = shard
        mine = [j for i, j in enumerate(todo) if i % count == index - 1]
    cache_dir = Path(cache) if cache else out / "cache"
    # temporaries of a killed run are removed only from a private cache: a shared one may hold live work
    with locked(out, shard, when_alone=None if cache else lambda: stages.Cache(cache_dir).clean_temporaries()):
        auditor = Auditor(config, battery, out, cache_dir)
        with logging_redirect_tqdm(), tqdm(total=len(mine), desc="audit", unit="job",
                                           disable=not config.progress) as bar:
            for job in mine:
                row_file = out / "rows" / f"{job.name}.json"
                if not row_file.is_file():
                    row = {"job": job.name, "side": job.side, "length": job.length, "seed": job.seed,
                           "attacker": job.attacker.name if job.attacker else None,
                           "kind": job.attacker.kind if job.attacker else "samples", **auditor.run(job)}
                    atomic_write_json(row_file, row)
                    log.info("audit %s: match %s", job.name, row.get("identity_match_rate"))
                bar.update(1)
        pictures = {"references": _relative(auditor.references.path, out),
                    "cloaked photos" if config.level == "cloak" else "subject photos": _relative(auditor.photos.path, out)}
        return write_verdict(config, battery, out, auditor.card, pictures)


def collected_rows(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "rows").glob("*.json"))]


def write_verdict(config: AuditConfig, battery: Battery, out: Path, card: dict | None,
                  pictures: dict[str, str] | None = None) -> dict:
    """audit.json, audit.html and protection.json (the card with the audit summary joined) from the rows present."""
    from noclone.audit.page import render_page
    from noclone.audit.verdict import verdict
    from noclone.data.atomic import atomic_write_text

    key = defence_key(config.level, card)
    threats = threat_model(key)
    expected = [j.name for j in jobs(config, battery)]
    rows = [r for r in collected_rows(out) if r["job"] in expected]
    attackers = {a.name: a for a in battery.for_level(config.level)}
    result = verdict(rows, attackers, threats, config.threshold, battery.relearning)
    result.update({
        "level": config.level, "defence": key, "threat_model": {"defence": threats.defence, "claim": threats.claim,
                                                                "assumes": threats.assumes},
        "battery": battery.name, "seeds": list(config.seeds), "threshold": config.threshold,
        "missing_jobs": [name for name in expected if name not in {r["job"] for r in rows}],
        "inputs": {k: getattr(config, k) for k in ("model", "base", "images", "cloaked", "clean", "references",
                                                   "other_images", "class_noun")},
        "attackers": {name: {"kind": a.kind, "tags": sorted(a.tags), "outside_claim": threats.outside(a)}
                      for name, a in attackers.items()},
        "rows": rows, "pictures": pictures or {},
    })
    atomic_write_json(out / "audit.json", result)
    atomic_write_text(out / "audit.html", render_page(result, out))
    summary = {k: result[k] for k in ("passed", "worst", "worst_within_claim", "threshold", "battery", "seeds",
                                      "missing_jobs")}
    atomic_write_json(out / "protection.json", {**(card or {}), "audit": summary})
    return result
