"""`noclone demo`: the whole story on the embedded sandbox, end to end, with a report.

A held-out subject (never seen by the sandbox model or its evaluator) posts 5 photos; an attacker personalizes the
sandbox model on them with DreamBooth and generates the subject anywhere. Then the protected half: the model
publisher protects the subject with APDM (quick preset) before release, and the same attacker runs the same attack
on the protected model. The demo measures how much the generated images look like the subject (identity match rate,
ISM, detection failures) against the base model, and writes `report.html` (both halves side by side) and
`summary.json`. A killed demo resumes from what it already computed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from noclone.errors import NocloneError

log = logging.getLogger(__name__)

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
    protect: bool = True
    protect_steps: int | None = None


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
    from noclone.attacks.base import preset_config
    from noclone.data.atomic import atomic_write_json, atomic_write_text
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import (REFERENCE_PHOTOS, TRAIN_PHOTOS, attack_experiment, base_experiment,
                                            images_in)
    from noclone.sandbox.splits import held_out

    started = time.time()
    out = _prepare_out(config)
    work = out / "work"
    identity = held_out(config.identity)
    model = model_dir()
    attack = preset_config("dreambooth", "sandbox", class_noun=config.class_noun, token=config.token, seed=config.seed,
                           progress=config.progress, steps=config.steps)
    log.info("demo: held-out %s identity %d; attacker: DreamBooth %d steps", config.class_noun, identity, attack.steps)
    results = {
        "base": base_experiment(model, work, config.class_noun, identity, attack.instance_prompt, config.n_generated,
                                config.seed, config.progress),
        "dreambooth": attack_experiment(model, work, config.class_noun, identity, "dreambooth", attack,
                                        config.n_generated, config.seed, config.progress),
    }
    protection = None
    if config.protect:
        protected, protection = protect_subject(model, work, config, identity)
        results["protected"] = attack_experiment(protected, work, config.class_noun, identity, "dreambooth", attack,
                                                 config.n_generated, config.seed, config.progress)
    for arm, r in results.items():
        log.info("demo: %-10s identity match rate %.2f  ISM %.3f  FDFR %.2f", arm, r["identity_match_rate"], r["ism"], r["fdfr"])
    summary = {
        "subject": {"class_noun": config.class_noun, "identity": identity, "train_photos": list(TRAIN_PHOTOS),
                    "reference_photos": list(REFERENCE_PHOTOS)},
        "prompt": attack.instance_prompt, "attack": asdict(attack), "protection": protection, "results": results,
        "seconds_total": round(time.time() - started, 1),
    }
    atomic_write_json(out / "summary.json", summary)
    subject = work / "subjects" / f"{config.class_noun}-{identity}"
    references = work / "references" / f"{config.class_noun}-{identity}"
    images = {arm: images_in(Path(r["generated_dir"])) for arm, r in results.items()}
    atomic_write_text(out / "report.html", render_report(summary, images_in(subject), images_in(references), images))
    return out


def protect_subject(model: Path, work: Path, config: DemoConfig, identity: int) -> tuple[Path, dict]:
    """APDM-protect the subject's 5 photos in the sandbox model (cached in work/); returns (model dir, summary)."""
    from noclone.defenses import APDM, APDMConfig, ProtectionSubject
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import TRAIN_PHOTOS, subject_photos

    settings = APDMConfig.preset("quick", seed=config.seed, progress=config.progress,
                                 **({"outer_steps": config.protect_steps} if config.protect_steps else {}))
    photos = subject_photos(work / "subjects" / f"{config.class_noun}-{identity}", config.class_noun, identity,
                            TRAIN_PHOTOS)
    out = work / "protected" / f"apdm-{config.class_noun}-{identity}-{settings.outer_steps}-{settings.seed}"
    card_file = out / "protection.json"
    if not card_file.is_file():
        log.info("demo: protecting the subject with APDM (%d outer x %d inner steps)", settings.outer_steps,
                 settings.inner_steps)
        started = time.time()
        subject = ProtectionSubject.from_folder(photos, config.class_noun, config.token)
        APDM(settings).run(load_pipeline(model), [subject], out, overwrite=True)
        card = json.loads(card_file.read_text())
        card.setdefault("metrics", {})["seconds"] = round(time.time() - started, 1)
        card_file.write_text(json.dumps(card, indent=2))
    card = json.loads(card_file.read_text())
    return out, {"method": "apdm", "preset": "quick", "outer_steps": settings.outer_steps,
                 "inner_steps": settings.inner_steps, "seconds": card.get("metrics", {}).get("seconds", 0.0)}


ARM_TITLES = {"base": "Base sandbox model (no personalization)", "dreambooth": "Unprotected: the attacker's DreamBooth",
              "protected": "Protected (APDM) model: the same attacker's DreamBooth"}


def render_report(summary: dict, train, references, images: dict) -> str:
    from noclone.report import image_grid, img_tag, page, table

    results = summary["results"]
    rows = [[ARM_TITLES.get(arm, arm), r["identity_match_rate"], r["ism"], r["fdfr"]] for arm, r in results.items()]
    threshold = next(iter(results.values()))["threshold"]
    sections = [
        f"<p>Sandbox subject: {summary['subject']['class_noun']} #{summary['subject']['identity']} (held out from "
        f"the model's and the evaluator's training). Prompt: <code>{summary['prompt']}</code>. "
        f"An image matches the identity when its cosine to the mean reference embedding is &ge; {threshold:.3f} "
        f"(the evaluator's 1% false-accept threshold).</p>",
        "<h2>Results</h2>",
        table(["model", "identity match rate", "ISM", "FDFR"], rows),
        "<h2>The subject</h2><div class='row'><div>" + img_tag(image_grid(train, 5, 3), "training photos")
        + "<p class='cap'>the 5 photos the attacker trains on</p></div><div>"
        + img_tag(image_grid(references, 8, 3), "references")
        + "<p class='cap'>held-back reference photos (identity is measured against these)</p></div></div>",
    ]
    side_by_side = [arm for arm in ("dreambooth", "protected") if arm in images]
    for arm, generated in images.items():
        if arm not in side_by_side:
            sections.append(f"<h2>{ARM_TITLES.get(arm, arm)}</h2>" + img_tag(image_grid(generated, 8, 3), arm))
    if side_by_side:
        cells = "".join(f"<div><h3>{ARM_TITLES[arm]}</h3>" + img_tag(image_grid(images[arm], 4, 3), arm)
                        + f"<p class='cap'>identity match rate {results[arm]['identity_match_rate']:.2f}, "
                        f"ISM {results[arm]['ism']:.3f}</p></div>" for arm in side_by_side)
        sections.append(f"<h2>Prompt <code>{summary['prompt']}</code> after the attack</h2><div class='row'>{cells}</div>")
    timing = [[arm, r.get("train_seconds", 0.0), r.get("seconds", 0.0)] for arm, r in results.items()]
    if summary.get("protection"):
        timing.append(["APDM protection", summary["protection"]["seconds"], summary["protection"]["seconds"]])
    sections.append("<h2>Timing (seconds)</h2>" + table(["arm", "personalization", "total"], timing)
                    + f"<p class='cap'>whole demo: {summary['seconds_total']} s</p>")
    return page("noclone demo: can this subject be cloned?", sections)
