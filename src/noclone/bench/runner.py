"""Run a benchmark: every cell (model x subject x defence x transform x attack) and seed, through the cached stages.

Each finished cell is one row in DIR/results.sqlite (metrics, seconds per stage, peak memory) and one log line. A
rerun finds every finished stage in DIR/cache and computes only what is missing, so a killed run resumes; the
results are re-exported (results.csv, results.json) and report.html re-rendered at the end.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from noclone.bench import stages
from noclone.bench.config import AttackSpec, BenchConfig, DefenceSpec, ModelSpec, SubjectSpec, TransformSpec
from noclone.bench.store import Store, export
from noclone.data.atomic import atomic_write_json
from noclone.errors import NocloneError

log = logging.getLogger(__name__)

MARKER = ".noclone-bench"


@dataclass
class Cell:
    """One benchmark cell at one seed."""

    position: int
    model: ModelSpec
    subject: SubjectSpec
    defence: DefenceSpec
    transform: TransformSpec
    attack: AttackSpec
    seed: int

    def labels(self) -> dict:
        return {"model": self.model.name, "subject": self.subject.name, "class_noun": self.subject.class_noun,
                "defence": self.defence.name, "defence_kind": self.defence.kind, "transform": self.transform.name,
                "attack": self.attack.name, "seed": self.seed}

    def cell_id(self, config: BenchConfig) -> str:
        """Hash of everything that defines the row: a changed setting makes a new row (the old one is dropped)."""
        shared = {k: getattr(config, k) for k in ("prompts", "images_per_prompt", "metrics")}
        text = stages.canonical_json([asdict(self.model), asdict(self.subject), asdict(self.defence),
                                      self.transform.name, asdict(self.attack), self.seed, shared,
                                      asdict(config.generation), asdict(config.evaluation), config.device, config.dtype])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def title(self) -> str:
        return (f"{self.model.name} | {self.subject.name} | {self.defence.name} | {self.transform.name} | "
                f"{self.attack.name} | seed {self.seed}")


def cells(config: BenchConfig) -> list[Cell]:
    """Every cell x seed in a stable order (shared stages, like a protected model, are computed once)."""
    out = []
    for model in config.models:
        for subject in config.subjects:
            for defence in config.defences:
                for transform in config.transforms:
                    for attack in config.attacks:
                        for seed in config.seeds:
                            out.append(Cell(len(out), model, subject, defence, transform, attack, seed))
    return out


def prepare_out(out: Path) -> Path:
    """Create (or reuse) a benchmark folder; refuse a non-empty folder that is not one."""
    out = Path(out)
    if out.is_file():
        raise NocloneError(f"{out}: exists and is a file, expected an output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise NocloneError(f"{out}/: exists, is not empty and is not a noclone bench folder (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("noclone bench output folder\n")
    return out


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """One benchmark process per folder at a time."""
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NocloneError(f"{out}/: another noclone bench is running in this folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def run_cell(cell: Cell, config: BenchConfig, cache: stages.Cache, runtime: stages.Runtime, out: Path,
             models: dict) -> dict:
    """All stages of one cell (each found in the cache or computed); returns its results row."""
    subject, defence, attack = cell.subject, cell.defence, cell.attack
    if cell.model.path not in models:
        models[cell.model.path] = stages.model_ref(cache, cell.model.path)
    base = models[cell.model.path]
    train = stages.subject_photos(cache, subject, "train")
    references = stages.subject_photos(cache, subject, "references")
    done: dict[str, stages.Ref] = {}
    attack_model, photos = base, train
    if defence.kind == "model":
        attack_model = done["protect"] = stages.protected_model(cache, base, train, subject, defence, runtime)
    elif defence.kind == "cloak":
        photos = done["cloak"] = stages.cloaked_photos(cache, base, train, defence, subject.class_noun, runtime)
    if cell.transform.name != "none":
        photos = done["transform"] = stages.transformed_photos(cache, base, photos, cell.transform.name, cell.seed,
                                                               runtime)
    attacked, token = None, "sks"
    if attack.method != "none":
        attacked = done["personalize"] = stages.personalized(cache, attack_model, photos, attack, subject.class_noun,
                                                             cell.seed, runtime)
        token = attack.personalization(subject.class_noun, cell.seed).token
    prompts = [p.format(token=token, class_noun=subject.class_noun) for p in config.prompts]
    images = done["generate"] = stages.generated(cache, attack_model, attacked, prompts, config, cell.seed, runtime)
    scores = done["metrics"] = stages.metrics(cache, images, references, subject.class_noun, config, defence)
    row = {"cell_id": cell.cell_id(config), "position": cell.position, **cell.labels(), **scores.meta["metrics"]}
    for name, ref in done.items():
        row[f"t_{name}"] = round(ref.seconds, 2)
    row["t_total"] = round(sum(ref.seconds for ref in done.values()), 2)
    rss = [ref.meta.get("peak_rss_mb") for ref in done.values() if ref.meta.get("peak_rss_mb") is not None]
    gpu = [ref.meta.get("peak_gpu_mb") for ref in done.values() if ref.meta.get("peak_gpu_mb") is not None]
    row["peak_rss_mb"] = max(rss) if rss else None
    row["peak_gpu_mb"] = max(gpu) if gpu else None
    row["artifacts"] = {"references": _relative(references.path, out), "photos": _relative(photos.path, out),
                        "generated": _relative(images.path, out), "prompts": prompts,
                        "attacked": _relative(attacked.path, out) if attacked else None,
                        "model": _relative(attack_model.path, out)}
    return row


def _summary_line(cell: Cell, row: dict, index: int, total: int, fresh: bool) -> str:
    parts = []
    for key, label, fmt in (("ism", "ISM", "{:.3f}"), ("identity_match_rate", "match", "{:.2f}"),
                            ("fdfr", "FDFR", "{:.2f}"), ("brisque", "BRISQUE", "{:.1f}"), ("fid", "FID", "{:.1f}"),
                            ("backdoor_rate", "backdoor", "{:.2f}")):
        if row.get(key) is not None:
            parts.append(f"{label} {fmt.format(row[key])}")
    how = f"{row['t_total']:.0f}s" if fresh else "cached"
    return f"[{index}/{total}] {cell.title()}: {'  '.join(parts)}  ({how})"


def run_bench(config: BenchConfig, out: str | Path, progress: bool = True, keep_going: bool = False) -> dict:
    """Run (or resume) the whole benchmark into `out`; returns {'rows', 'computed', 'found', 'report'}."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    out = prepare_out(Path(out))
    with locked(out):
        cache = stages.Cache(out / "cache")
        removed = cache.clean_temporaries()
        if removed:
            log.info("bench: removed %d temporary folder(s) left by an interrupted run", removed)
        runtime = stages.Runtime(config.device, config.dtype, progress)
        todo = cells(config)
        store = Store(out / "results.sqlite")
        store.set_meta("name", config.name)
        store.set_meta("config", config.to_dict())
        atomic_write_json(out / "config.json", config.to_dict())
        dropped = store.keep_only({c.cell_id(config) for c in todo})
        if dropped:
            log.info("bench: dropped %d result row(s) of cells no longer in the config", dropped)
        log.info("bench %s: %d cells x seeds into %s", config.name, len(todo), out)
        models: dict = {}
        failures = []
        with logging_redirect_tqdm(), tqdm(total=len(todo), desc="bench cells", unit="cell", disable=not progress,
                                           position=0) as bar:
            for i, cell in enumerate(todo, 1):
                before = sum(cache.computed.values())
                try:
                    row = run_cell(cell, config, cache, runtime, out, models)
                except Exception as exc:  # noqa: BLE001 - with keep_going a failed cell is recorded, not fatal
                    if not keep_going or isinstance(exc, KeyboardInterrupt):
                        raise
                    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    log.error("[%d/%d] %s: failed: %s", i, len(todo), cell.title(), message)
                    store.put({"cell_id": cell.cell_id(config), "position": cell.position, **cell.labels(),
                               "error": message, "artifacts": {}})
                    failures.append(cell.title())
                else:
                    store.put(row)
                    log.info(_summary_line(cell, row, i, len(todo), sum(cache.computed.values()) > before))
                bar.update(1)
        export(store, out)
        report_path = render_report(out)
        log.info("bench: computed %d stage(s), reused %d; report %s", sum(cache.computed.values()),
                 sum(cache.found.values()), report_path)
        return {"rows": store.rows(), "computed": dict(cache.computed), "found": dict(cache.found),
                "report": report_path, "failures": failures}


def render_report(out: str | Path) -> Path:
    """(Re-)render DIR/report.html and the CSV/JSON exports from the database alone, computing nothing."""
    from noclone.bench.report import render
    from noclone.data.atomic import atomic_write_text

    out = Path(out)
    db = out / "results.sqlite"
    if not db.is_file():
        raise NocloneError(f"{out}/: no results.sqlite here (not a noclone bench folder, or nothing has run yet)")
    store = Store(db)
    export(store, out)
    path = out / "report.html"
    atomic_write_text(path, render(store, out))
    return path


def dry_run(config: BenchConfig, out: str | Path | None = None) -> list[str]:
    """One line per cell x seed, saying whether its result is already in `out` (nothing is computed)."""
    done = set()
    if out is not None and (Path(out) / "results.sqlite").is_file():
        done = {r["cell_id"] for r in Store(Path(out) / "results.sqlite").rows() if not r.get("error")}
    return [f"{'done' if c.cell_id(config) in done else 'todo'}  {c.title()}" for c in cells(config)]
