"""Run a benchmark: every cell (model x subject x defence x transform x attack) and seed, through the cached stages.

Each finished cell is one row in DIR/results.sqlite (metrics, seconds per stage, peak memory) and one log line. A
rerun finds every finished stage in DIR/cache and computes only what is missing, so a killed run resumes; the
results are re-exported (results.csv, results.json) and report.html re-rendered at the end.

Executors: 'local' (default) computes a cell's stages here, cell after cell; 'ray' (noclone.bench.ray_executor) walks
the same stage graph (cell_stages) and runs each missing stage as a Ray task. Both use the same cache keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
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


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 1 <= I <= N; a clear error otherwise."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise NocloneError(f"--shard {text}: expected I/N, e.g. 1/2") from None
    if not 1 <= index <= count:
        raise NocloneError(f"--shard {text}: I must be between 1 and N")
    return index, count


def shard_cells(todo: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The cells of shard I of N: whole (model, subject, defence) groups, dealt round-robin in config order.

    Keeping a group in one shard means its protected model or cloaked photos are computed by one process only.
    """
    if shard is None:
        return todo
    index, count = shard
    groups: dict[tuple, int] = {}
    for cell in todo:
        groups.setdefault((cell.model.name, cell.subject.name, cell.defence.name), len(groups))
    return [c for c in todo if groups[(c.model.name, c.subject.name, c.defence.name)] % count == index - 1]


def _flock(handle, mode: int, wait_s: float = 0.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextmanager
def locked(out: Path, shard: tuple[int, int] | None = None,
           when_alone: Callable[[], None] | None = None) -> Iterator[bool]:
    """One unsharded run per folder, or distinct shards side by side. `when_alone` (clean-up of temporaries a
    killed run left) is called only while no other run is in the folder, so it never deletes live work. Yields
    whether this run started alone."""
    with open(out / ".lock", "w") as active:
        alone = _flock(active, fcntl.LOCK_EX)
        if alone and when_alone is not None:
            when_alone()
        if shard is None:
            if not alone:
                raise NocloneError(f"{out}/: another noclone bench is running in this folder")
        elif not _flock(active, fcntl.LOCK_SH, wait_s=60):  # from exclusive: a downgrade that lets other shards in
            raise NocloneError(f"{out}/: an unsharded noclone bench is running in this folder")
        try:
            with open(out / f".lock-shard-{shard[0]}-of-{shard[1]}", "w") if shard else nullcontext() as mine:
                if mine is not None and not _flock(mine, fcntl.LOCK_EX):
                    raise NocloneError(f"{out}/: shard {shard[0]}/{shard[1]} is already running in this folder")
                yield alone
        finally:
            fcntl.flock(active, fcntl.LOCK_UN)


def _relative(path: Path, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def lengths_of(attack: AttackSpec, attacks: list[AttackSpec]) -> list[AttackSpec]:
    """The config's attacks that differ from `attack` only in their number of steps (itself included)."""
    return [a for a in attacks if (a.method, a.settings, a.lr_mult, a.preset) ==
            (attack.method, attack.settings, attack.lr_mult, attack.preset)]


StageCall = Callable[..., stages.Ref]


@dataclass
class CellStages:
    """The stage results one cell uses (what its results row is built from)."""

    done: dict            # the cell's own stages by row name (protect, cloak, transform, personalize, ...)
    references: stages.Ref
    photos: stages.Ref
    attack_model: stages.Ref
    attacked: stages.Ref | None
    images: stages.Ref
    scores: stages.Ref
    prompts: list


def cell_stages(cell: Cell, config: BenchConfig, cache: stages.Cache, runtime: stages.Runtime, models: dict,
                call: StageCall | None = None) -> CellStages:
    """The stage graph of one cell: every stage is `call(stage_function, *args, after=ref, **kwargs)`, which by
    default is `stage_function(cache, *args, **kwargs)` (found in the cache or computed here, in order). `after`
    names a stage result this one must wait for without taking it as an input (the executors order on it)."""
    if call is None:
        def call(fn, *args, after=None, **kwargs):
            return fn(cache, *args, **kwargs)
    subject, defence, attack = cell.subject, cell.defence, cell.attack
    if cell.model.path not in models:
        models[cell.model.path] = stages.model_ref(cache, cell.model.path)
    base = models[cell.model.path]
    train = stages.subject_photos(cache, subject, "train")
    references = stages.subject_photos(cache, subject, "references")
    done: dict[str, stages.Ref] = {}
    attack_model, photos = base, train
    if defence.kind == "model":
        attack_model = done["protect"] = call(stages.protected_model, base, train, subject, defence, runtime)
    elif defence.kind == "cloak":
        photos = done["cloak"] = call(stages.cloaked_photos, base, train, defence, subject.class_noun, runtime)
    if cell.transform.name != "none":
        photos = done["transform"] = call(stages.transformed_photos, base, photos, cell.transform.name, cell.seed,
                                          runtime)
    attacked, token = None, "sks"
    if attack.method != "none":
        lengths = sorted(lengths_of(attack, config.attacks), key=lambda a: a.steps_mult)
        longest = None
        if len(lengths) > 1:  # the same attack at several lengths: one run of the longest writes the others
            longest = call(stages.personalized, attack_model, photos, lengths[-1], subject.class_noun, cell.seed,
                           runtime, shorter=tuple(lengths[:-1]))
        attacked = done["personalize"] = call(stages.personalized, attack_model, photos, attack, subject.class_noun,
                                              cell.seed, runtime, after=longest)
        token = attack.personalization(subject.class_noun, cell.seed).token
    prompts = [p.format(token=token, class_noun=subject.class_noun) for p in config.prompts]
    images = done["generate"] = call(stages.generated, attack_model, attacked, prompts, config, cell.seed, runtime)
    scores = done["metrics"] = call(stages.metrics, images, references, subject.class_noun, config, defence)
    return CellStages(done, references, photos, attack_model, attacked, images, scores, prompts)


def cell_row(cell: Cell, config: BenchConfig, out: Path, result: CellStages) -> dict:
    """The results row of a cell whose stages are all finished."""
    done, attacked = result.done, result.attacked
    row = {"cell_id": cell.cell_id(config), "position": cell.position, **cell.labels(),
           **result.scores.meta["metrics"]}
    for name, ref in done.items():
        row[f"t_{name}"] = round(ref.seconds, 2)
    row["t_total"] = round(sum(ref.seconds for ref in done.values()), 2)
    rss = [ref.meta.get("peak_rss_mb") for ref in done.values() if ref.meta.get("peak_rss_mb") is not None]
    gpu = [ref.meta.get("peak_gpu_mb") for ref in done.values() if ref.meta.get("peak_gpu_mb") is not None]
    row["peak_rss_mb"] = max(rss) if rss else None
    row["peak_gpu_mb"] = max(gpu) if gpu else None
    row["artifacts"] = {"references": _relative(result.references.path, out),
                        "photos": _relative(result.photos.path, out),
                        "generated": _relative(result.images.path, out), "prompts": result.prompts,
                        "attacked": _relative(attacked.path, out) if attacked else None,
                        "model": _relative(result.attack_model.path, out)}
    return row


def run_cell(cell: Cell, config: BenchConfig, cache: stages.Cache, runtime: stages.Runtime, out: Path,
             models: dict) -> dict:
    """All stages of one cell (each found in the cache or computed); returns its results row."""
    return cell_row(cell, config, out, cell_stages(cell, config, cache, runtime, models))


def _summary_line(cell: Cell, row: dict, index: int, total: int, fresh: bool) -> str:
    parts = []
    for key, label, fmt in (("ism", "ISM", "{:.3f}"), ("identity_match_rate", "match", "{:.2f}"),
                            ("fdfr", "FDFR", "{:.2f}"), ("brisque", "BRISQUE", "{:.1f}"), ("fid", "FID", "{:.1f}"),
                            ("backdoor_rate", "backdoor", "{:.2f}")):
        if row.get(key) is not None:
            parts.append(f"{label} {fmt.format(row[key])}")
    how = f"{row['t_total']:.0f}s" if fresh else "cached"
    return f"[{index}/{total}] {cell.title()}: {'  '.join(parts)}  ({how})"


EXECUTORS = ("local", "ray")


def _local_cells(todo: list[Cell], config: BenchConfig, cache: stages.Cache, runtime: stages.Runtime,
                 out: Path) -> Iterator[tuple[Cell, dict | BaseException, bool]]:
    """The local executor: each cell's stages in this process, one cell after another, in config order.
    Yields (cell, row or the exception that failed it, whether anything was computed)."""
    models: dict = {}
    for cell in todo:
        before = sum(cache.computed.values())
        try:
            row = run_cell(cell, config, cache, runtime, out, models)
        except Exception as exc:  # noqa: BLE001 - run_bench decides (keep_going) whether a failed cell is fatal
            yield cell, exc, True
        else:
            yield cell, row, sum(cache.computed.values()) > before


def run_bench(config: BenchConfig, out: str | Path, progress: bool = True, keep_going: bool = False,
              shard: tuple[int, int] | None = None, executor: str = "local", ray_options: dict | None = None) -> dict:
    """Run (or resume) the benchmark into `out`; returns {'rows', 'computed', 'found', 'report', 'failures',
    'tasks'} (tasks: stage tasks submitted to Ray, 0 for the local executor).

    With shard=(I, N) only shard I's cells are run; start the N shards side by side (one per core or GPU) on the
    same folder: they share the cache and the database, and each re-exports the report when it finishes.

    executor='ray' runs every stage as a Ray task (noclone.bench.ray_executor; `ray_options`: address, num_cpus,
    task_cpus, retries): the same cache keys and results as 'local', the database written by this process only.
    """
    if executor not in EXECUTORS:
        raise NocloneError(f"--executor {executor}: expected one of {', '.join(EXECUTORS)}")
    if executor != "ray" and ray_options:
        flags = {"num_cpus": "--ray-cpus"}
        raise NocloneError(f"{', '.join(flags.get(k, '--' + k.replace('_', '-')) for k in ray_options)}: "
                           "only with --executor ray")
    if executor == "ray" and shard is not None:
        raise NocloneError("--shard and --executor ray do not mix: Ray spreads the stages over its workers itself")
    ray_run = None
    if executor == "ray":
        from noclone.bench import ray_executor

        ray_run = ray_executor.RayRun(**(ray_options or {}))  # checks Ray and the options before touching `out`
    with ray_run.session() if ray_run else nullcontext():  # a bad --address fails here, before `out` is made
        return _run(config, Path(out), progress, keep_going, shard, ray_run)


def _run(config: BenchConfig, out: Path, progress: bool, keep_going: bool, shard: tuple[int, int] | None,
         ray_run) -> dict:
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    out = prepare_out(out)
    cache = stages.Cache(out / "cache")

    def clean_up() -> None:
        removed = cache.clean_temporaries()
        if removed:
            log.info("bench: removed %d temporary folder(s) left by an interrupted run", removed)

    with locked(out, shard, when_alone=clean_up) as alone:
        runtime = stages.Runtime(config.device, config.dtype, progress)
        every = cells(config)
        todo = shard_cells(every, shard)
        store = Store(out / "results.sqlite")
        running = store.meta("config")
        if not alone and running is not None and stages.canonical_json(running) != stages.canonical_json(config.to_dict()):
            raise NocloneError(f"{out}/: the shards already running here use another config (same config for all)")
        store.set_meta("name", config.name)
        store.set_meta("config", config.to_dict())
        atomic_write_json(out / "config.json", config.to_dict())
        dropped = store.keep_only({c.cell_id(config) for c in every})
        if dropped:
            log.info("bench: dropped %d result row(s) of cells no longer in the config", dropped)
        where = f" (shard {shard[0]}/{shard[1]} of {len(every)})" if shard else ""
        how = f" on Ray ({ray_run.where()})" if ray_run else ""
        log.info("bench %s: %d cells x seeds%s into %s%s", config.name, len(todo), where, out, how)
        failures = []
        with logging_redirect_tqdm(), tqdm(total=len(todo), desc="bench cells", unit="cell", disable=not progress,
                                           position=0) as bar:
            if ray_run:
                outcomes = ray_run.run_cells(todo, config, runtime, out, cell_stages, cell_row)
            else:
                outcomes = _local_cells(todo, config, cache, runtime, out)
            with closing(outcomes):  # a stopped run cancels what it submitted
                for i, (cell, outcome, fresh) in enumerate(outcomes, 1):
                    if isinstance(outcome, BaseException):
                        if not keep_going or not isinstance(outcome, Exception):
                            raise outcome
                        message = str(outcome).splitlines()[0] if str(outcome) else type(outcome).__name__
                        log.error("[%d/%d] %s: failed: %s", i, len(todo), cell.title(), message)
                        store.put({"cell_id": cell.cell_id(config), "position": cell.position, **cell.labels(),
                                   "error": message, "artifacts": {}})
                        failures.append(cell.title())
                    else:
                        store.put(outcome)
                        log.info(_summary_line(cell, outcome, i, len(todo), fresh))
                    bar.update(1)
        computed, found = cache.computed, cache.found
        if ray_run:
            computed, found = ray_run.computed, ray_run.found
        export(store, out)
        report_path = render_report(out)
        log.info("bench: computed %d stage(s), reused %d; report %s", sum(computed.values()),
                 sum(found.values()), report_path)
        return {"rows": store.rows(), "computed": dict(computed), "found": dict(found),
                "report": report_path, "failures": failures, "tasks": ray_run.submitted if ray_run else 0}


def render_report(out: str | Path, report_settings: dict | None = None) -> Path:
    """(Re-)render DIR/report.html and the CSV/JSON exports from the database alone, computing nothing;
    `report_settings` ({images_per_cell, image_format}) override the config's `report` for this rendering."""
    from noclone.bench.report import render
    from noclone.data.atomic import atomic_write_text

    out = Path(out)
    db = out / "results.sqlite"
    if not db.is_file():
        raise NocloneError(f"{out}/: no results.sqlite here (not a noclone bench folder, or nothing has run yet)")
    store = Store(db)
    export(store, out)
    path = out / "report.html"
    atomic_write_text(path, render(store, out, report_settings))
    return path


def dry_run(config: BenchConfig, out: str | Path | None = None, shard: tuple[int, int] | None = None) -> list[str]:
    """One line per cell x seed (of one shard), saying whether its result is already in `out` (nothing is computed)."""
    done = set()
    if out is not None and (Path(out) / "results.sqlite").is_file():
        done = {r["cell_id"] for r in Store(Path(out) / "results.sqlite").rows() if not r.get("error")}
    return [f"{'done' if c.cell_id(config) in done else 'todo'}  {c.title()}" for c in shard_cells(cells(config), shard)]
