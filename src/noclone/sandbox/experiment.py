"""One attack experiment in the sandbox: subject photos -> personalize -> generate -> measure (cached on disk).

Shared by `noclone demo`, the acceptance benchmarks and the defence evaluations, so that every number in this
project comes from the same code path.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from noclone.attacks import METHODS, PersonalizationConfig
from noclone.attacks.base import preset_config
from noclone.data.atomic import atomic_output_dir
from noclone.data.images import load_image_folder, save_image
from noclone.generation import GenerationConfig, generate_to_dir

log = logging.getLogger(__name__)

TRAIN_PHOTOS = range(0, 5)
REFERENCE_PHOTOS = range(100, 108)


def model_tag(model: Path) -> str:
    """A short cache tag of a model directory: its name plus a hash of its resolved path and weight files' sizes and
    times (attacks on different or rewritten models must never share a cache entry)."""
    import hashlib

    path = Path(model).resolve()
    stamp = [str(path)] + [f"{f.relative_to(path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                           for f in sorted(path.glob("*/*.safetensors"))]
    return f"{path.name}-{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:8]}"


def subject_photos(folder: Path, class_noun: str, identity: int, photos) -> Path:
    """Render the identity's photos into `folder` once (atomically); returns the folder."""
    from noclone.sandbox.render import render

    if not (folder / ".complete").is_file():
        with atomic_output_dir(folder, overwrite=True) as tmp:
            for photo in photos:
                save_image(render(class_noun, identity, photo), tmp / f"{photo:04d}.png")
            (tmp / ".complete").write_text("")
    return folder


def images_in(folder: Path) -> list:
    return [im for _, im in load_image_folder(folder)]


def reference_photos(work: Path, class_noun: str, identity: int) -> list:
    """The identity's held-back reference photos (rendered once into work/references), as images."""
    return images_in(subject_photos(work / "references" / f"{class_noun}-{identity}", class_noun, identity,
                                    REFERENCE_PHOTOS))


def generate_cached(load_pipe, folder: Path, prompt: str, n: int, seed: int, lora: Path | None = None,
                    progress: bool = True, guidance: float = 7.5) -> list:
    """Generate `n` images of `prompt` into `folder` unless already there; returns the images."""
    if not (folder / "manifest.json").is_file():
        pipe = load_pipe()
        if lora is not None:
            from noclone.models.pipeline import load_lora

            load_lora(pipe, str(lora))
        generate_to_dir(pipe, [prompt], folder, GenerationConfig(n=n, seed=seed, guidance=guidance), overwrite=True,
                        progress=progress)
    return images_in(folder)


def personalize_cached(model: Path, photos: Path, out: Path, method: str, config: PersonalizationConfig) -> tuple[Path, float]:
    """Run the attack once; the result (pipeline dir or LoRA dir) is reused on later calls. Returns (path, seconds)."""
    from noclone.models.pipeline import load_pipeline

    done = out / "personalization.json"
    if done.is_file():
        return out, json.loads(done.read_text()).get("seconds", 0.0)
    started = time.time()
    METHODS[method](config).run(load_pipeline(model), photos, out, overwrite=True)
    seconds = time.time() - started
    card = json.loads(done.read_text())
    card["seconds"] = round(seconds, 1)
    done.write_text(json.dumps(card, indent=2))
    return out, seconds


def attack_experiment(model: Path, work: Path, class_noun: str, identity: int, method: str = "dreambooth",
                      config: PersonalizationConfig | None = None, n: int = 32, seed: int = 0,
                      progress: bool = True, guidance: float = 7.5) -> dict:
    """Personalize `model` on 5 photos of `identity`, generate `n` images, measure against 8 reference photos."""
    from noclone.eval.evaluate import sandbox_scores
    from noclone.models.pipeline import load_pipeline

    config = config or preset_config(method, "sandbox", class_noun=class_noun, seed=seed, progress=progress)
    key = f"{model_tag(model)}-{class_noun}-{identity}-{method}-{config.fingerprint()}-{config.steps}"
    photos = subject_photos(work / "subjects" / f"{class_noun}-{identity}", class_noun, identity, TRAIN_PHOTOS)
    refs = reference_photos(work, class_noun, identity)
    started = time.time()
    attacked, train_seconds = personalize_cached(model, photos, work / "attacks" / key, method, config)
    folder = work / "generated" / (key + _guidance_tag(guidance))
    source, lora = (model, attacked) if method == "lora" else (attacked, None)  # a LoRA loads onto the base model
    generated = generate_cached(lambda: load_pipeline(source), folder, config.instance_prompt, n, seed + 1000,
                                lora=lora, progress=progress, guidance=guidance)
    scores = sandbox_scores(generated, refs, class_noun, ("ism", "fdfr"))
    return {"class_noun": class_noun, "identity": identity, "method": method, "config": asdict(config),
            "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - started, 1), **scores,
            "guidance": guidance, "generated_dir": str(folder), "attacked_dir": str(attacked)}


def _guidance_tag(guidance: float) -> str:
    """Cache-folder suffix: none at the default 7.5, so earlier caches stay valid."""
    return "" if guidance == 7.5 else f"-g{guidance:g}"


def base_experiment(model: Path, work: Path, class_noun: str, identity: int, prompt: str, n: int = 32,
                    seed: int = 0, progress: bool = True, guidance: float = 7.5) -> dict:
    """The un-personalized model's scores for a prompt against the identity's references."""
    from noclone.eval.evaluate import sandbox_scores
    from noclone.models.pipeline import load_pipeline

    refs = reference_photos(work, class_noun, identity)
    folder = work / "generated" / f"base-{model_tag(model)}-{prompt.replace(' ', '_')}-{n}-{seed}{_guidance_tag(guidance)}"
    generated = generate_cached(lambda: load_pipeline(model), folder, prompt, n, seed + 1000, progress=progress,
                                guidance=guidance)
    return {"class_noun": class_noun, "identity": identity, "prompt": prompt,
            **sandbox_scores(generated, refs, class_noun, ("ism", "fdfr")), "guidance": guidance,
            "generated_dir": str(folder)}
