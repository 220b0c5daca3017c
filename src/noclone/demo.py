"""`noclone demo`: the whole story on the embedded sandbox, end to end, with a report.

A held-out subject (never seen by the sandbox model or its evaluator) posts 5 photos; an attacker personalizes the
sandbox model on them with DreamBooth and generates the subject anywhere. The demo measures how much the generated
images look like the subject (identity match rate, ISM, detection failures) against the base model, and writes
`report.html` and `summary.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from noclone.errors import NocloneError

log = logging.getLogger(__name__)

TRAIN_PHOTOS = range(0, 5)
REFERENCE_PHOTOS = range(100, 108)
MARKER = ".noclone-demo"


@dataclass
class DemoConfig:
    out: Path = Path("noclone-demo")
    class_noun: str = "person"
    identity: int = 0
    seed: int = 0
    steps: int | None = None
    n_generated: int = 32
    overwrite: bool = False
    progress: bool = True
    token: str = "sks"
    arms: list[str] = field(default_factory=lambda: ["base", "dreambooth"])


def _prepare_out(config: DemoConfig) -> Path:
    out = Path(config.out)
    if out.is_file():
        raise NocloneError(f"{out}: exists and is a file, expected an output directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not config.overwrite:
        raise NocloneError(f"{out}/: exists, is not empty and is not a demo folder (pass --overwrite or another --out)")
    if config.overwrite and out.is_dir():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(asdict(config), default=str))
    return out


def _write_photos(folder: Path, class_noun: str, identity: int, photos) -> list:
    from noclone.data.atomic import atomic_output_dir
    from noclone.data.images import save_image
    from noclone.sandbox.render import render

    if not (folder / "done").is_file():
        with atomic_output_dir(folder, overwrite=True) as tmp:
            for photo in photos:
                save_image(render(class_noun, identity, photo), tmp / f"{photo:04d}.png")
            (tmp / "done").write_text("")
    from noclone.data.images import load_image_folder

    return [im for _, im in load_image_folder(folder)]


def _generated(pipe_factory, out: Path, prompt: str, config: DemoConfig) -> list:
    from noclone.data.images import load_image_folder
    from noclone.generation import GenerationConfig, generate_to_dir

    if not (out / "manifest.json").is_file():
        generate_to_dir(pipe_factory(), [prompt], out, GenerationConfig(n=config.n_generated, seed=config.seed + 1000),
                        overwrite=True, progress=config.progress)
    return [im for _, im in load_image_folder(out)]


def run_demo(config: DemoConfig) -> Path:
    """Run (or resume) the demo into `config.out`; returns the folder holding report.html and summary.json."""
    from noclone.attacks import DreamBooth, PersonalizationConfig
    from noclone.data.atomic import atomic_write_json, atomic_write_text
    from noclone.eval.evaluate import sandbox_scores
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.splits import held_out

    started = time.time()
    out = _prepare_out(config)
    identity = held_out(config.identity)
    log.info("demo: held-out %s identity %d -> %s", config.class_noun, identity, out)
    train = _write_photos(out / "subject_photos", config.class_noun, identity, TRAIN_PHOTOS)
    references = _write_photos(out / "reference_photos", config.class_noun, identity, REFERENCE_PHOTOS)
    attack = PersonalizationConfig(class_noun=config.class_noun, token=config.token, seed=config.seed,
                                   progress=config.progress)
    if config.steps:
        attack.steps = config.steps
    prompt = attack.instance_prompt
    results, images, timings = {}, {}, {}

    t0 = time.time()
    images["base"] = _generated(lambda: load_pipeline(model_dir()), out / "generated" / "base", prompt, config)
    timings["base"] = time.time() - t0

    t0 = time.time()
    attacked_dir = out / "models" / "dreambooth"
    if not (attacked_dir / "model_index.json").is_file():
        DreamBooth(attack).run(load_pipeline(model_dir()), out / "subject_photos", attacked_dir, overwrite=True)
    images["dreambooth"] = _generated(lambda: load_pipeline(attacked_dir), out / "generated" / "dreambooth", prompt, config)
    timings["dreambooth"] = time.time() - t0

    for arm, generated in images.items():
        results[arm] = sandbox_scores(generated, references, config.class_noun, ("ism", "fdfr", "fid"))
        log.info("demo: %-10s match rate %.2f  ISM %.3f  FDFR %.2f", arm, results[arm]["identity_match_rate"],
                 results[arm]["ism"], results[arm]["fdfr"])
    summary = {
        "subject": {"class_noun": config.class_noun, "identity": identity, "train_photos": list(TRAIN_PHOTOS),
                    "reference_photos": list(REFERENCE_PHOTOS)},
        "prompt": prompt, "attack": asdict(attack), "results": results,
        "seconds": {**{k: round(v, 1) for k, v in timings.items()}, "total": round(time.time() - started, 1)},
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.html", render_report(summary, train, references, images))
    return out


ARM_TITLES = {"base": "Base sandbox model (no personalization)", "dreambooth": "Unprotected: attacker's DreamBooth"}


def render_report(summary: dict, train, references, images: dict) -> str:
    from noclone.report import image_grid, img_tag, page, table

    rows = [[ARM_TITLES.get(arm, arm), r["identity_match_rate"], r["ism"], r["fdfr"], r.get("fid", float("nan"))]
            for arm, r in summary["results"].items()]
    threshold = next(iter(summary["results"].values()))["threshold"]
    sections = [
        f"<p>Sandbox subject: {summary['subject']['class_noun']} #{summary['subject']['identity']} (held out from "
        f"the model's and the evaluator's training). Prompt: <code>{summary['prompt']}</code>. "
        f"Identity match = cosine to the mean reference embedding &ge; {threshold:.3f} (1% false-accept rate).</p>",
        "<h2>Results</h2>",
        table(["model", "identity match rate", "ISM", "FDFR", "sandbox-FID"], rows),
        "<h2>The subject</h2><div class='row'><div>" + img_tag(image_grid(train, 5, 3), "training photos")
        + "<p class='cap'>photos the attacker trains on</p></div><div>" + img_tag(image_grid(references, 8, 3), "references")
        + "<p class='cap'>held-back reference photos (identity is measured against these)</p></div></div>",
    ]
    for arm, generated in images.items():
        sections.append(f"<h2>{ARM_TITLES.get(arm, arm)}</h2>" + img_tag(image_grid(generated, 8, 3), arm))
    sections.append(f"<h2>Timing</h2>{table(['stage', 'seconds'], list(summary['seconds'].items()))}")
    return page("noclone demo: can this subject be cloned?", sections)
