"""`noclone demo`: the whole story on the embedded sandbox, end to end, with a report.

A held-out subject (never seen by the sandbox model or its evaluator) posts 5 photos; an attacker personalizes the
sandbox model on them with DreamBooth (the sandbox preset) and generates the subject anywhere. Then the protected
half: the model publisher protects the subject with APDM before release (a shortened run of the quick preset, see
DEMO_PROTECT_STEPS), and the same attacker runs the same attack on the protected model. What the protection costs
is measured too: another held-out subject of the class personalized on the protected model against the base model,
and the class prompt's images (the share the detector cannot find a face in) on both models.

Every stage is computed in the run (nothing precomputed ships) through `noclone.sandbox.experiment`, the code path
of every other number in this project. Independent stages run side by side in worker processes (three, sharing
the cores; see `lanes`). Each stage's result and its wall and CPU time are written to
OUT/stages/<stage>.json when it finishes, so a killed demo resumes from what it computed, and the report says which
stages this run computed and which it reused, with the time they took when they were computed.

Writes OUT/report.html (self-contained: images inline) and OUT/summary.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from noclone.errors import NocloneError

log = logging.getLogger(__name__)

MARKER = ".noclone-demo"
STAGE_VERSION = 1

# The demo's protection: the APDM quick preset (100 outer steps) shortened to fit the demo's time budget. The full
# recipe (300 outer steps, the audit's) is measured in docs/audits/README.md: FULL_RECIPE below.
DEMO_PROTECT_STEPS = 40
QUICK_PRESET_STEPS = 100
FULL_RECIPE = {
    "outer_steps": 300, "source": "docs/audits/README.md",
    "text": "the published audit of APDM at its full recipe (quick preset with 300 outer steps, held-out person "
            "120, seed 0) holds against every attacker of the quick battery: worst case 0.12 (3x lr) against 0.56 "
            "unprotected, the preset DreamBooth 0.00 against 0.31; it costs another person 0.25 against 0.62 on the "
            "base model, and the class prompt's detector failures 0.50 against 0.09",
}

# Targets: the audit's verdict threshold for the subject; for the collateral, what a protection of one subject
# should leave alone (another subject of the class, the class prompt), as in docs/research/apdm.md
TARGET_MATCH = 0.2         # the protected subject's identity match rate after the attack: at most this
TARGET_OTHER = 0.10        # another subject's match on the protected model: at most this far under the base's
TARGET_GENERIC = 0.05      # the class prompt's detector failures: at most this far over the base model's


@dataclass
class DemoConfig:
    out: Path = Path("noclone-demo")
    class_noun: str = "person"
    identity: int = 0                  # held-out index of the subject
    other_identity: int | None = None  # held-out index of the collateral subject (default: other_default())
    seed: int = 0
    steps: int | None = None           # attack steps (default: the sandbox DreamBooth preset's, 300)
    n_generated: int = 16
    overwrite: bool = False
    progress: bool = True
    token: str = "sks"
    protect: bool = True
    protect_steps: int | None = None   # APDM outer steps (default DEMO_PROTECT_STEPS)
    workers: int | None = None         # worker processes (default `lanes`: 3 on several cores, 1 on one or a GPU)
    num_class_images: int | None = None  # the attack's prior-preservation images (default: the preset's); tests


# ------------------------------------------------------------------------------------------------ the stages


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    deps: tuple[str, ...]
    keys: tuple[str, ...]   # the settings its result depends on (a record with other values is recomputed)



def plan(config: DemoConfig) -> list[Stage]:
    """The run's stages, most urgent first (the protected half's chain is the longest). A stage on the protected
    model names `protect` among its dependencies: it receives the dependencies' results, the protected model's path
    among them."""
    attack = ("class_noun", "seed", "steps", "token", "num_class_images")
    subject, other = attack + ("identity", "n_generated"), attack + ("other_identity", "n_generated")
    protect = ("class_noun", "identity", "seed", "token", "protect_steps", "num_class_images")
    stages = [Stage("class-images-base", "class images of the base model (the attack's prior)", (), attack)]
    if config.protect:
        stages += [
            Stage("protect", "APDM protection of the subject", ("class-images-base",), protect),
            Stage("class-images-protected", "class images of the protected model (the attack's prior)",
                  ("protect",), attack + protect),
            Stage("protected", "attack on the protected model", ("protect", "class-images-protected"),
                  subject + protect),
            Stage("collateral-protected", "another subject, attacked on the protected model",
                  ("protect", "class-images-protected"), other + protect),
        ]
    stages += [Stage("unprotected", "attack on the base model", ("class-images-base",), subject)]
    if config.protect:
        stages += [Stage("collateral-base", "another subject, attacked on the base model", ("class-images-base",),
                         other),
                   Stage("generic-protected", "class prompt on the protected model", ("protect",),
                         ("class_noun", "seed", "n_generated") + protect)]
    stages += [Stage("base", "the base model, prompted with the identifier", (),
                     ("class_noun", "identity", "seed", "token", "n_generated"))]
    if config.protect:
        stages += [Stage("generic-base", "class prompt on the base model", (), ("class_noun", "seed", "n_generated"))]
    return stages


def other_default(identity: int) -> int:
    """The collateral subject: held-out 4 (5 when the subject is 4), the research log's collateral person, whom the
    preset attack clones on the base model (0.97); held-out 1 is a weak target even unprotected (0.19), so the
    collateral could not show (docs/research/apdm.md)."""
    return 4 if identity != 4 else 5


def _settings(config: DemoConfig) -> dict:
    from noclone.sandbox.splits import held_out

    other = other_default(config.identity) if config.other_identity is None else config.other_identity
    return {"class_noun": config.class_noun, "identity": held_out(config.identity), "other_identity": held_out(other),
            "seed": config.seed, "steps": config.steps, "token": config.token, "n_generated": config.n_generated,
            "protect_steps": config.protect_steps or DEMO_PROTECT_STEPS, "num_class_images": config.num_class_images,
            "version": STAGE_VERSION}


def _attack(ctx: dict):
    from noclone.attacks.base import preset_config

    s = ctx["settings"]
    return preset_config("dreambooth", "sandbox", class_noun=s["class_noun"], token=s["token"], seed=s["seed"],
                         progress=ctx["progress"], steps=s["steps"], num_class_images=s["num_class_images"])


def _run_stage(name: str, ctx: dict, deps: dict) -> dict:
    """Compute one stage (in this process or a worker); returns its result."""
    from noclone.sandbox.experiment import attack_experiment, base_experiment

    s, work, model = ctx["settings"], Path(ctx["work"]), Path(ctx["model"])
    attack, progress, n, seed = _attack(ctx), ctx["progress"], s["n_generated"], s["seed"]
    protected = Path(deps["protect"]["model"]) if "protect" in deps else None
    if name.startswith("class-images"):
        return _class_images(protected or model, attack)
    if name == "protect":
        path, card = protect_subject(model, work, s, progress)
        return {"model": str(path), "protection": card}
    if name in ("unprotected", "protected"):
        return attack_experiment(protected or model, work, s["class_noun"], s["identity"], "dreambooth", attack, n,
                                 seed, progress)
    if name.startswith("collateral"):
        return attack_experiment(protected or model, work, s["class_noun"], s["other_identity"], "dreambooth",
                                 attack, n, seed, progress)
    if name == "base":
        return base_experiment(model, work, s["class_noun"], s["identity"], attack.instance_prompt, n, seed, progress)
    if name.startswith("generic"):
        return base_experiment(protected or model, work, s["class_noun"], s["identity"], attack.class_prompt, n,
                               seed, progress)
    raise NocloneError(f"demo: unknown stage {name!r}")


def _class_images(model: Path, attack) -> dict:
    """The model's prior-preservation images, generated once into the class-image cache before the attacks that
    share them start (two attacks generating them at once would race for the cache entry)."""
    from noclone.class_images import class_images
    from noclone.models.pipeline import load_pipeline

    images = class_images(load_pipeline(model), attack.class_prompt, attack.num_class_images, seed=attack.seed,
                          steps=attack.class_image_steps, progress=attack.progress)
    return {"prompt": attack.class_prompt, "n_images": len(images)}


def protect_subject(model: Path, work: Path, settings: dict, progress: bool = True) -> tuple[Path, dict]:
    """APDM-protect the subject's 5 photos in the sandbox model (cached in work/); returns (model dir, summary)."""
    from noclone.defenses import APDM, APDMConfig, ProtectionSubject
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import TRAIN_PHOTOS, subject_photos

    overrides = {"outer_steps": settings["protect_steps"]}
    if settings.get("num_class_images"):
        overrides["num_class_images"] = settings["num_class_images"]
    apdm = APDMConfig.preset("quick", seed=settings["seed"], progress=progress, **overrides)
    class_noun, identity = settings["class_noun"], settings["identity"]
    photos = subject_photos(work / "subjects" / f"{class_noun}-{identity}", class_noun, identity, TRAIN_PHOTOS)
    out = work / "protected" / f"apdm-{class_noun}-{identity}-{apdm.outer_steps}-{apdm.seed}"
    card_file = out / "protection.json"
    if not card_file.is_file():
        log.info("demo: protecting the subject with APDM (%d outer x %d inner steps)", apdm.outer_steps,
                 apdm.inner_steps)
        started = time.time()
        subject = ProtectionSubject.from_folder(photos, class_noun, settings["token"])
        APDM(apdm).run(load_pipeline(model), [subject], out, overwrite=True)
        card = json.loads(card_file.read_text())
        card.setdefault("metrics", {})["seconds"] = round(time.time() - started, 1)
        card_file.write_text(json.dumps(card, indent=2))
    card = json.loads(card_file.read_text())
    return out, {"method": "apdm", "preset": "quick", "outer_steps": apdm.outer_steps,
                 "quick_preset_outer_steps": QUICK_PRESET_STEPS, "inner_steps": apdm.inner_steps,
                 "seconds": card.get("metrics", {}).get("seconds", 0.0)}


# ------------------------------------------------------------------------------------------- the scheduler


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def lanes(workers: int | None) -> tuple[int, int]:
    """(worker processes, torch threads each). Default on several cores: 3 single-thread processes sharing the
    cores (threads: cores // 3); 1 (in this process, with every core's threads) on one core or a GPU.

    The demo has at most three independent stages ready at once, most of them attacks of about 100 s CPU. With one
    process per core on 2 cores, one core idles while the other finishes the last attack (about 320 s, estimated
    from the stages' CPU times); three processes sharing the 2 cores measured 291-304 s in three runs. Two
    processes per half, the unprotected half's at a lower priority so that the protected chain gets the cores
    first, measured 302 s with more CPU spent (docs/demo.md)."""
    import torch

    cores = available_cores()
    if workers is None:
        workers = 1 if torch.cuda.is_available() or cores == 1 else 3
    workers = max(1, workers)
    return workers, cores if workers == 1 else max(1, cores // workers)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A worker whose demo process is gone (killed: no chance to stop its workers) exits instead of idling on."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="noclone-demo-parent-watch", daemon=True).start()


def _worker_init(threads: int, level: int) -> None:
    import torch

    from noclone.quiet import quiet_third_party

    _exit_with_parent(os.getppid())
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()


def _timed_stage(name: str, ctx: dict, deps: dict) -> dict:
    import torch

    wall, cpu = time.time(), time.process_time()
    result = _run_stage(name, ctx, deps)
    return {"result": result, "seconds": round(time.time() - wall, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1), "threads": torch.get_num_threads(),
            "pid": os.getpid()}


def _record_file(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


def _read_record(out: Path, stage: Stage, settings: dict) -> dict | None:
    path = _record_file(out, stage.name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    return record if record.get("key") == {k: settings[k] for k in stage.keys} else None


def run_stages(stages: list[Stage], ctx: dict, out: Path, run_id: str, workers: int, threads: int) -> dict:
    """Every stage's record: reused when OUT/stages holds one for the same settings, else computed (side by side
    in `workers` processes when more than one, the first ready in plan order first) and written as soon as it
    finishes."""
    from noclone.data.atomic import atomic_write_json

    settings = ctx["settings"]
    records: dict[str, dict] = {}
    for stage in stages:
        record = _read_record(out, stage, settings)
        if record is not None:
            records[stage.name] = record
    todo = [s for s in stages if s.name not in records]
    if todo:
        log.info("demo: %d stage(s) to compute (%s), %d reused; %d worker process(es) x %d thread(s)", len(todo),
                 ", ".join(s.name for s in todo), len(records), workers, threads)

    def finish(stage: Stage, timed: dict) -> None:
        record = {"stage": stage.name, "key": {k: settings[k] for k in stage.keys}, "run": run_id,
                  "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **timed}
        atomic_write_json(_record_file(out, stage.name), record)
        records[stage.name] = record
        log.info("demo: %-22s done in %6.1f s (%.1f s CPU)", stage.name, timed["seconds"], timed["cpu_seconds"])

    def ready() -> list[Stage]:
        return [s for s in todo if all(d in records for d in s.deps)]

    if workers <= 1 or len(todo) <= 1:
        import torch

        torch.set_num_threads(threads)
        while todo:
            stage = ready()[0]
            finish(stage, _timed_stage(stage.name, ctx, {d: records[d]["result"] for d in stage.deps}))
            todo.remove(stage)
        return records

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    worker_ctx = {**ctx, "progress": False}  # several progress bars at once would only garble the terminal
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(threads, logging.getLogger().getEffectiveLevel()))
    running: dict = {}
    try:
        while todo or running:
            for stage in ready():
                if len(running) >= workers:
                    break
                deps = {d: records[d]["result"] for d in stage.deps}
                running[pool.submit(_timed_stage, stage.name, worker_ctx, deps)] = stage
                todo.remove(stage)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finish(running.pop(future), future.result())
    except BaseException:
        # a failed or interrupted stage: stop the others now (what they finished is cached; a rerun resumes)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return records


# ------------------------------------------------------------------------------------------------- the run


def _prepare_out(config: DemoConfig) -> Path:
    out = Path(config.out)
    if out.is_file():
        raise NocloneError(f"{out}: exists and is a file, expected an output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not config.overwrite:
        raise NocloneError(f"{out}/: exists, is not empty and is not a demo folder (pass --overwrite or another --out)")
    if config.overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(asdict(config), default=str))
    return out


def run_demo(config: DemoConfig) -> Path:
    """Run (or resume) the demo into `config.out`; returns the folder holding report.html and summary.json."""
    from noclone.data.atomic import atomic_write_json, atomic_write_text
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import (REFERENCE_PHOTOS, TRAIN_PHOTOS, images_in, reference_photos,
                                            subject_photos)

    started = time.time()
    for flag, value in (("--n", config.n_generated), ("--protect-steps", config.protect_steps),
                        ("--workers", config.workers), ("--steps", config.steps)):
        if value is not None and value < 1:
            raise NocloneError(f"{flag} {value}: must be at least 1")
    out = _prepare_out(config)
    work = out / "work"
    settings = _settings(config)
    if settings["other_identity"] == settings["identity"]:
        raise NocloneError("--other-identity must differ from --identity (the collateral is another subject)")
    model = model_dir()
    ctx = {"settings": settings, "work": str(work), "model": str(model), "progress": config.progress}
    attack = _attack(ctx)
    workers, threads = lanes(config.workers)
    log.info("demo: held-out %s %d (collateral: %d); attacker: DreamBooth %d steps; protection: APDM %s",
             config.class_noun, settings["identity"], settings["other_identity"], attack.steps,
             f"{settings['protect_steps']} outer steps" if config.protect else "off")
    # the photos first, here: the stages running side by side read them
    for who in (settings["identity"], settings["other_identity"]):
        subject_photos(work / "subjects" / f"{config.class_noun}-{who}", config.class_noun, who, TRAIN_PHOTOS)
        reference_photos(work, config.class_noun, who)
    run_id = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records = run_stages(plan(config), ctx, out, run_id, workers, threads)
    results = {name: records[name]["result"] for name in ("base", "unprotected", "protected")
               if name in records}
    collateral = {}
    for name, key in (("collateral-protected", "protected"), ("collateral-base", "unprotected"),
                      ("generic-protected", "generic_protected"), ("generic-base", "generic_base")):
        if name in records:
            collateral[key] = records[name]["result"]
    protection = records["protect"]["result"]["protection"] if "protect" in records else None
    measured = [name for name in ARM_TITLES if name in records]  # the stages that generated images
    for name in measured:
        r = records[name]["result"]
        log.info("demo: %-20s identity match rate %.2f  ISM %.3f  FDFR %.2f", name, r["identity_match_rate"],
                 r["ism"], r["fdfr"])
    summary = {
        "subject": {"class_noun": config.class_noun, "identity": settings["identity"],
                    "other_identity": settings["other_identity"], "train_photos": list(TRAIN_PHOTOS),
                    "reference_photos": list(REFERENCE_PHOTOS)},
        "prompt": attack.instance_prompt, "class_prompt": attack.class_prompt, "attack": asdict(attack),
        "protection": protection, "full_recipe": FULL_RECIPE if config.protect else None,
        "results": results, "collateral": collateral,
    }
    summary["verdict"] = verdict(summary)
    images = {name: images_in(Path(records[name]["result"]["generated_dir"])) for name in measured}
    pictures = {kind: images_in(work / folder / f"{config.class_noun}-{settings['identity']}")
                for kind, folder in (("train", "subjects"), ("references", "references"))}
    summary["timing"] = timing(records, run_id, workers, threads, time.time() - started)
    report = render_report(summary, pictures, images)
    summary["timing"]["this_run_seconds"] = round(time.time() - started, 1)  # with the report (the page: without)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.html", report)
    log.info("demo: %s (this run %.0f s)", summary["verdict"]["sentence"], summary["timing"]["this_run_seconds"])
    return out


# ------------------------------------------------------------------------------------- verdict and timing


def _count(r: dict) -> str:
    n = int(r["n_images"])
    return f"{round(r['identity_match_rate'] * n)}/{n}"


def verdict(summary: dict) -> dict:
    """The report's opening sentence and the targets the run met or missed."""
    results, c = summary["results"], summary.get("collateral") or {}
    unprotected, protected = results.get("unprotected"), results.get("protected")
    targets = []
    if protected is None:
        held = None
        sentence = (f"No protection in this run (--no-protect): after the attack, {_count(unprotected)} of the "
                    f"generated images match the subject (the base model, without the attack: "
                    f"{_count(results['base'])}).")
    else:
        p, u = protected["identity_match_rate"], unprotected["identity_match_rate"]
        held = p <= TARGET_MATCH
        if u <= TARGET_MATCH:
            sentence = (f"Inconclusive: the attack failed even without the protection ({_count(unprotected)} of the "
                        f"unprotected model's images match the subject, {_count(protected)} of the protected "
                        f"model's), so this run cannot show what the protection does; target <= {TARGET_MATCH:g}.")
            held = None
        else:
            sentence = (f"Protection {'held' if held else 'did not hold'}: after the attack, {_count(protected)} of "
                        f"the protected model's images match the subject, against {_count(unprotected)} "
                        f"unprotected; target <= {TARGET_MATCH:g}.")
        targets.append({"what": "the subject, attacked on the protected model: identity match rate",
                        "target": f"≤ {TARGET_MATCH:g}", "value": p, "reference": u, "met": p <= TARGET_MATCH})
        if "protected" in c and "unprotected" in c:
            a, b = c["protected"]["identity_match_rate"], c["unprotected"]["identity_match_rate"]
            targets.append({"what": "another subject, attacked the same way: identity match rate, protected model "
                                    "(base model)", "target": f"≥ base − {TARGET_OTHER:g}", "value": a,
                            "reference": b, "met": a >= b - TARGET_OTHER - 1e-9})
        if "generic_protected" in c and "generic_base" in c:
            a, b = c["generic_protected"]["fdfr"], c["generic_base"]["fdfr"]
            targets.append({"what": f"the class prompt '{summary['class_prompt']}': images the detector finds no "
                                    f"{summary['subject']['class_noun']} in, protected model (base model)",
                            "target": f"≤ base + {TARGET_GENERIC:g}", "value": a, "reference": b,
                            "met": a <= b + TARGET_GENERIC + 1e-9})
    missed = [t for t in targets[1:] if not t["met"]]
    if held and missed:
        # the subject's target alone would read as a success where the class paid for it
        sentence = sentence.replace("Protection held:", "Protection held for the subject, at the class's cost:", 1)
        sentence += (f" The collateral missed {len(missed)} of {len(targets) - 1} targets "
                     "(another subject, the class prompt: below).")
    return {"held": held, "sentence": sentence, "target": TARGET_MATCH, "targets": targets,
            "collateral_ok": not missed if targets[1:] else None}


def timing(records: dict, run_id: str, workers: int, threads: int, seconds: float) -> dict:
    stages = {name: {"seconds": r["seconds"], "cpu_seconds": r.get("cpu_seconds"), "threads": r.get("threads"),
                     "computed_at": r.get("computed_at"), "this_run": r.get("run") == run_id}
              for name, r in records.items()}
    return {"run": run_id, "workers": workers, "threads_per_worker": threads, "cores": available_cores(),
            "this_run_seconds": round(seconds, 1),
            "computed_this_run": sorted(n for n, s in stages.items() if s["this_run"]),
            "reused": sorted(n for n, s in stages.items() if not s["this_run"]),
            "stage_seconds_sum": round(sum(s["seconds"] for s in stages.values()), 1), "stages": stages}


# -------------------------------------------------------------------------------------------------- report

ARM_TITLES = {"base": "Base model, no personalization", "unprotected": "Unprotected model, after the attack",
              "protected": "Protected (APDM) model, after the same attack",
              "collateral-base": "Another subject on the base model", "collateral-protected":
              "Another subject on the protected model", "generic-base": "Class prompt, base model",
              "generic-protected": "Class prompt, protected model"}


def _pct(value: float) -> str:
    return f"{value:.2f}"


def _figure(images: list, columns: int, scale: int, title: str, caption: str) -> str:
    from noclone.report import image_grid, img_tag

    return (f"<figure><figcaption><b>{title}</b></figcaption>{img_tag(image_grid(images, columns, scale), title)}"
            f"<figcaption class='cap'>{caption}</figcaption></figure>")


def _arm_caption(r: dict, class_noun: str) -> str:
    n = int(r["n_images"])
    broken = round(r["fdfr"] * n)
    return (f"{_count(r)} match the subject (identity match rate {_pct(r['identity_match_rate'])}, ISM "
            f"{r['ism']:.3f}); {broken}/{n} broken: no {class_noun} found by the detector (FDFR {_pct(r['fdfr'])})")


def render_report(summary: dict, pictures: dict, images: dict) -> str:
    import html

    from noclone.audit.page import cost_lines
    from noclone.report import page, pair, table

    results, c, v = summary["results"], summary.get("collateral") or {}, summary["verdict"]
    class_noun, prompt = summary["subject"]["class_noun"], html.escape(summary["prompt"])
    threshold, n = results["unprotected"]["threshold"], int(results["unprotected"]["n_images"])
    columns = 4
    mood = ("bad" if v["held"] is False else "" if v["held"] is None
            else "good" if v.get("collateral_ok", True) is not False else "mixed")
    cost = cost_lines(c)
    second = ""
    if v["targets"]:
        met = sum(t["met"] for t in v["targets"])
        second = (f"<p class='verdict-cost'>{met} of {len(v['targets'])} targets met."
                  + (f" What it costs: {html.escape('; '.join(cost))}." if cost else "") + "</p>")
    sections = [f"<div class='verdict {mood}'><p>{html.escape(v['sentence'])}</p>{second}</div>"]
    arms = [a for a in ("unprotected", "protected") if a in results]
    sections.append(f"<h2>The same attack, prompt <code>{prompt}</code></h2>" + pair(
        [_figure(images[a], columns, 1, ARM_TITLES[a], _arm_caption(results[a], class_noun)) for a in arms]))
    protection = summary.get("protection")
    if protection:
        rows = [[t["what"], t["target"], _pct(t["value"]), _pct(t["reference"]),
                 f"<span class='{'good' if t['met'] else 'bad'}'>{'met' if t['met'] else 'missed'}</span>"]
                for t in v["targets"]]
        sections += [
            "<h2>Targets and what the protection costs</h2>",
            "<div class='targets'>" + table(["what", "target", "this run", "reference (unprotected / base)", ""],
                                            rows) + "</div>",
            f"<p>Broken images (the detector finds no {class_noun} in them): the attack's images of the subject "
            f"{_pct(results['protected']['fdfr'])} on the protected model against "
            f"{_pct(results['unprotected']['fdfr'])} on the base model"
            + (f"; the class prompt's images {_pct(c['generic_protected']['fdfr'])} against "
               f"{_pct(c['generic_base']['fdfr'])}" if "generic_protected" in c and "generic_base" in c else "")
            + ".</p>",
            f"<p class='note'><b>A shortened protection.</b> This run protects with APDM's quick preset cut to "
            f"{protection['outer_steps']} outer steps (x {protection['inner_steps']} simulated attack steps; the quick "
            f"preset runs {protection['quick_preset_outer_steps']}, the full recipe {FULL_RECIPE['outer_steps']}) so "
            f"that the whole demo runs in minutes on two CPU cores. It is one attack seed with {n} images a model: "
            f"one image moves a rate by {1 / n:.2f}, and another seed can move it much more. For comparison, "
            f"{html.escape(FULL_RECIPE['text'])} ({FULL_RECIPE['source']}).</p>",
        ]
        collateral = [(k, a) for k, a in (("unprotected", "collateral-base"), ("protected", "collateral-protected"))
                      if k in c]
        if collateral:
            sections.append(f"<h2>Collateral: another {class_noun} (held-out #{summary['subject']['other_identity']}),"
                            f" the same attack</h2>" + pair(
                [_figure(images[a], columns, 1, ARM_TITLES[a], _arm_caption(c[k], class_noun))
                 for k, a in collateral]))
        generic = [(k, a) for k, a in (("generic_base", "generic-base"), ("generic_protected", "generic-protected"))
                   if k in c]
        if generic:
            sections.append(f"<h2>Collateral: the class prompt <code>{html.escape(summary['class_prompt'])}</code>, "
                            f"no attack</h2>" + pair(
                [_figure(images[a], columns, 1, ARM_TITLES[a],
                         f"{round(c[k]['fdfr'] * c[k]['n_images'])}/{c[k]['n_images']} with no {class_noun} found "
                         f"by the detector (FDFR {_pct(c[k]['fdfr'])})") for k, a in generic]))
    rows = [[ARM_TITLES[a], results[a]["identity_match_rate"], results[a]["ism"], results[a]["fdfr"]]
            for a in ("base", "unprotected", "protected") if a in results]
    rows += [[ARM_TITLES[a], c[k]["identity_match_rate"], c[k]["ism"], c[k]["fdfr"]]
             for k, a in (("unprotected", "collateral-base"), ("protected", "collateral-protected")) if k in c]
    rows += [[ARM_TITLES[a], "–", "–", c[k]["fdfr"]]
             for k, a in (("generic_base", "generic-base"), ("generic_protected", "generic-protected")) if k in c]
    sections += [
        "<h2>All figures</h2>",
        table(["images", "identity match rate", "ISM", "FDFR (broken images)"], rows),
        f"<p class='cap'>Subject: sandbox {class_noun} #{summary['subject']['identity']}, held out from the model's "
        f"and the evaluator's training. An image matches the subject when its embedding's cosine to the mean of the "
        f"subject's reference photos is &ge; {threshold:.3f} (the evaluator's 1% false-accept threshold); ISM is the "
        f"mean cosine; FDFR is the share of images in which the detector finds no {class_noun}. The attacker: "
        f"DreamBooth, sandbox preset, {summary['attack']['steps']} steps, seed {summary['attack']['seed']}; "
        f"{results['unprotected']['n_images']} images per model.</p>",
        "<h2>The subject</h2>" + pair([
            _figure(pictures["train"], 5, 1, "the 5 photos the attacker trains on", "posted photos"),
            _figure(pictures["references"], 4, 1, "held-back reference photos", "identity is measured against these"),
        ]),
    ]
    if "base" in results:
        sections.append(f"<h2>The base model, prompt <code>{prompt}</code>, no attack</h2>"
                        + _figure(images["base"], 8, 2, ARM_TITLES["base"], _arm_caption(results["base"], class_noun)))
    sections.append(_timing_section(summary["timing"]))
    return page("noclone demo: can this subject be cloned?", sections)


STAGE_TITLES = {s.name: s.title for s in plan(DemoConfig())}
STAGE_ORDER = ("base", "generic-base", "class-images-base", "unprotected", "collateral-base", "protect",
               "class-images-protected", "generic-protected", "protected", "collateral-protected")  # the page's


def _when(stamp: str | None) -> str:
    try:
        return datetime.fromisoformat(stamp).strftime("%Y-%m-%d %H:%M UTC") if stamp else "an earlier run"
    except ValueError:
        return str(stamp)


def _timing_section(t: dict) -> str:
    from noclone.report import table

    rows = []
    order = [name for name in STAGE_ORDER if name in t["stages"]]
    for name in order + [n for n in t["stages"] if n not in STAGE_ORDER]:
        s = t["stages"][name]
        status = ("computed in this run" if s["this_run"]
                  else f"reused from an earlier run ({_when(s.get('computed_at'))})")
        cpu = s.get("cpu_seconds")
        rows.append([STAGE_TITLES.get(name, name), status, f"{s['seconds']:.1f}",
                     "–" if cpu is None else f"{cpu:.1f}", s.get("threads") or "–"])
    reused = [t["stages"][n] for n in t["reused"]]
    note = (f"This run: {t['this_run_seconds']} s wall on {t['cores']} core(s), {t['workers']} worker process(es) x "
            f"{t['threads_per_worker']} thread(s): stages that do not depend on each other run side by side and "
            f"share the cores, so a stage's wall time can exceed its CPU time. ")
    if reused:
        note += (f"{len(reused)} stage(s) were reused from an earlier run; they took "
                 f"{round(sum(s['seconds'] for s in reused), 1)} s (wall, as listed) when computed.")
    else:
        note += "Every stage was computed in this run."
    return ("<h2>Timing</h2><div class='timing'>" + table(["stage", "", "wall s", "CPU s", "threads"], rows)
            + f"</div><p class='cap'>{note} Stage times are those of the stage itself; stages overlap, so their sum "
              f"exceeds the run's wall time.</p>")
