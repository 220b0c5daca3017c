"""Measure the fidelity card of a sandbox model: does it reproduce the field's effects (see `effects.EFFECTS`)?

    noclone sandbox fidelity [--model sandbox] [--seeds 0,1] [--effects E1,E2,...] --out DIR

Every attack, defence, generation and metric runs through the benchmark's cached stages in DIR/bench (one
folder, shared by all effects, so the clean DreamBooth of E1 is the clean column of E4, E5 and E6), so a killed run
resumes where it stopped. Each finished effect is written to DIR/effects/<key>.json, and fidelity.json plus
fidelity.html are rewritten after every effect, so a long run shows its progress.

The subjects are held-out identities the model and the evaluator never saw, fixed here (`IDENTITIES`) and never
used to tune anything in this project. Every method runs with its shipped sandbox preset; the model-level defences
follow one scaling rule, stated in `SCALING_RULE` and on the card.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from noclone.data.atomic import atomic_write_json
from noclone.errors import NocloneError
from noclone.fidelity import effects as fx
from noclone.sandbox.assets import is_shipped

log = logging.getLogger(__name__)

# Indices into the held-out range (noclone.sandbox.splits.held_out): untouched by every tuning run of this project.
IDENTITIES = tuple(range(100, 116))
CLASSES = ("person", "dog", "cat")
PAPER_BUDGET = 0.025  # Anti-DreamBooth's eps 0.05 in [-1, 1], in [0, 1] pixel units (about 6.4/255)
CLOAKS = ("aspl", "fsmg", "advdm", "photoguard")
PURIFICATIONS = ("jpeg:75", "purify:0.1")
IDENTIFIER_TOKENS = ("sks", "xyz", "qzv", "ohwx")
GAP_TIMESTEP = 500
SCALING_RULE = ("model-level defences simulate the attacker they defend against: their inner lrs are the sandbox "
                "DreamBooth preset's, and N_protect equals the attack's length (300 steps), as the APDM paper's "
                "800 outer steps equal its 800-step attack; everything else is the method's quick preset")


@dataclass
class FidelityConfig:
    """What to measure and at what size; the defaults are the card's protocol."""

    model: str = "sandbox"
    out: str = "fidelity"
    seeds: tuple[int, ...] = (0, 1)
    identities: int = 8                   # held-out identities per class (the first N of IDENTITIES)
    classes: tuple[str, ...] = CLASSES
    effects: tuple[str, ...] = fx.EFFECT_KEYS
    clone_attacks: tuple[str, ...] = tuple(fx.CLONE_TARGETS)  # E1's attacks (a subset leaves the rest unmeasured)
    images: int = 32                      # generations per attacked model
    base_images: int = 64                 # generations per class for E2, E3 and the FID of E6
    size: int | None = None               # render size of the subjects' photos (None: the model's resolution)
    attack_settings: dict = field(default_factory=dict)   # {method: {setting: value}} over the presets (tests)
    defence_settings: dict = field(default_factory=dict)  # {method: {setting: value}}
    generation_steps: int = 25
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        unknown = [e for e in self.effects if e not in fx.EFFECT_KEYS]
        if unknown:
            raise NocloneError(f"--effects: unknown effect {unknown[0]!r}; choose from {', '.join(fx.EFFECT_KEYS)}")
        if not 1 <= self.identities <= len(IDENTITIES):
            raise NocloneError(f"--identities {self.identities}: choose 1 to {len(IDENTITIES)}")
        if any(c not in CLASSES for c in self.classes):
            raise NocloneError(f"--classes: sandbox classes are {', '.join(CLASSES)}")
        if not self.seeds:
            raise NocloneError("--seeds: give at least one seed")
        if not self.clone_attacks or any(m not in fx.CLONE_TARGETS for m in self.clone_attacks):
            raise NocloneError(f"--clone-attacks: choose from {', '.join(fx.CLONE_TARGETS)}")
        if self.images < 2 or self.base_images < 2:
            raise NocloneError("--images and --base-images must be at least 2 (FID needs two samples)")
        if not is_shipped(self.model) and not Path(self.model).exists():
            raise NocloneError(f"--model {self.model}: no such model directory")


class Card:
    """One fidelity run: the shared bench folder, the effects measured so far, the page."""

    def __init__(self, config: FidelityConfig):
        config.validate()
        if config.size is None:
            config = replace(config, size=model_resolution(config.model))
        self.config = config
        self.out = Path(config.out)
        self.bench = self.out / "bench"
        self.effects_dir = self.out / "effects"
        self.effects_dir.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------- bench plumbing

    def subjects(self, count: int | None = None) -> list[dict]:
        from noclone.sandbox.splits import held_out

        ids = IDENTITIES[: count or self.config.identities]
        return [{"class": c, "identity": held_out(i), "name": f"{c}-{i}", "size": self.config.size}
                for c in self.config.classes for i in ids]

    def attack(self, method: str, **extra) -> dict:
        return {method: {**self.config.attack_settings.get(method, {}), **extra}}

    def defence(self, method: str, **extra) -> dict | str:
        if method == "none":
            return "none"
        return {method: {**extra, **self.config.defence_settings.get(method, {})}}

    def raw(self, name: str, defences: list, attacks: list, subjects: list[dict] | None = None,
            transforms: tuple[str, ...] = ("none",), prompts: tuple[str, ...] = ("a photo of {token} {class_noun}",),
            images: int | None = None, metrics: tuple[str, ...] = ("ism", "identity_match_rate", "fdfr"),
            guidance: float = 7.5) -> dict:
        c = self.config
        return {"name": f"fidelity-{name}", "models": [{"name": "model", "path": c.model}],
                "subjects": subjects or self.subjects(), "defences": defences, "attacks": attacks,
                "transforms": list(transforms), "prompts": list(prompts), "images_per_prompt": images or c.images,
                "seeds": list(c.seeds), "metrics": list(metrics), "device": c.device, "dtype": c.dtype,
                "generation": {"steps": c.generation_steps, "guidance": guidance}, "report": {"images_per_cell": 8}}

    def run_bench(self, raw: dict) -> list[dict]:
        from noclone.bench.config import validate
        from noclone.bench.runner import run_bench

        result = run_bench(validate(raw), self.bench, progress=self.config.progress)
        return [self._row(r) for r in result["rows"] if not r.get("error")]

    def _row(self, row: dict) -> dict:
        keep = ("subject", "class_noun", "defence", "transform", "attack", "seed", "ism", "identity_match_rate",
                "fdfr", "fid", "backdoor_rate", "t_total")
        out = {k: row.get(k) for k in keep}
        out["generated"] = (row.get("artifacts") or {}).get("generated")
        out["photos"] = (row.get("artifacts") or {}).get("photos")
        out["references"] = (row.get("artifacts") or {}).get("references")
        return out

    def stages(self):
        """(cache, runtime, base model ref) for stages run outside a bench config (cross-subject cells)."""
        from noclone.bench import stages
        from noclone.bench.runner import prepare_out

        cache = stages.Cache(prepare_out(self.bench) / "cache")
        return cache, stages.Runtime(self.config.device, self.config.dtype, self.config.progress), \
            stages.model_ref(cache, self.config.model)

    # ----------------------------------------------------------------------------------------------- effects

    def measure_e1(self) -> dict:
        rows = {m: self.run_bench(self.raw(f"e1-{m}", ["none"], [self.attack(m)])) for m in self.config.clone_attacks}
        ceiling = vae_ceiling(self.pipeline(), self.subjects(), self.config.size)
        verdict = fx.judge_e1(rows)
        verdict["note"] = ("the world's ceiling, the match rate of the same identities' photos after the model's VAE "
                           "(encode, decode): " + ", ".join(f"{c} {v['mean']:.2f} (worst {v['worst']:.2f})"
                                                           for c, v in ceiling.items()))
        return {"rows": rows, "vae_ceiling": ceiling, "verdict": verdict}

    def base_generations(self, guidance: float, model_path: str | None = None) -> dict[str, Path]:
        """`base_images` generations of 'a photo of a <class>' per class (seed 0), as image folders."""
        from noclone.bench import stages
        from noclone.bench.config import validate

        cache, runtime, base = self.stages()
        model = stages.model_ref(cache, model_path) if model_path else base
        raw = self.raw("base", ["none"], ["none"], subjects=self.subjects(1), images=self.config.base_images,
                       guidance=guidance)
        config = validate(raw)
        return {c: stages.generated(cache, model, None, [f"a photo of a {c}"], config, 0, runtime).path
                for c in self.config.classes}

    def render_set(self, offset: int) -> list:
        """`base_images` renders of different held-out identities per class, photo 0 (the world's own samples)."""
        from noclone.sandbox.render import render
        from noclone.sandbox.splits import held_out

        n = self.config.base_images
        return {c: [render(c, held_out(offset + k), 0, size=self.config.size) for k in range(n)]
                for c in self.config.classes}

    def generic_scores(self, folders: dict[str, Path]) -> dict[str, dict]:
        from noclone.eval.metrics import fdfr, frechet_distance
        from noclone.sandbox.evaluator import load_default_evaluator
        from noclone.sandbox.experiment import images_in

        evaluator = load_default_evaluator()
        renders = self.render_set(1000)
        out = {}
        for c, folder in folders.items():
            images = images_in(folder)
            out[c] = {"detector_rate": 1 - fdfr(evaluator.detect(images, c)),
                      "fid_to_renders": frechet_distance(evaluator.features(images), evaluator.features(renders[c])),
                      "images": os.path.relpath(folder, self.out)}
        return out

    def measure_e2(self) -> dict:
        from noclone.eval.metrics import frechet_distance
        from noclone.sandbox.evaluator import load_default_evaluator

        per_class = self.generic_scores(self.base_generations(7.5))
        evaluator = load_default_evaluator()
        a, b = self.render_set(1000), self.render_set(2000)
        for c in per_class:  # two disjoint render sets: the FID a perfect model would get at this sample size
            per_class[c]["fid_render_floor"] = frechet_distance(evaluator.features(a[c]), evaluator.features(b[c]))
        return {"per_class": per_class, "verdict": fx.judge_e2(per_class)}

    def measure_e3(self) -> dict:
        text = identifier_geometry(self.pipeline(), self.config.classes)
        guided = self.generic_scores(self.base_generations(7.5))
        unguided = self.generic_scores(self.base_generations(1.0))
        guidance = {c: {"fid_guided": guided[c]["fid_to_renders"], "fid_unguided": unguided[c]["fid_to_renders"],
                        "images_unguided": unguided[c]["images"]} for c in self.config.classes}
        gaps = guidance_gaps(self.pipeline(), self.subjects(), self.config.size)
        for c in guidance:
            guidance[c]["guidance_gap"] = gaps.get(c)
        return {"text": text, "guidance": guidance, "verdict": fx.judge_e3(text, guidance)}

    def measure_e4(self) -> dict:
        defences = ["none"] + [self.defence(m, budget=PAPER_BUDGET) for m in CLOAKS]
        rows = self.run_bench(self.raw("e4", defences, [self.attack("dreambooth")]))
        return {"rows": rows, "verdict": fx.judge_e4(rows)}

    def measure_e5(self) -> dict:
        attack = [self.attack("dreambooth")]  # the purified photos of the cloak only, beside E4's clean cell
        rows = self.run_bench(self.raw("e5-clean", ["none"], attack))
        rows += self.run_bench(self.raw("e5", [self.defence("aspl", budget=PAPER_BUDGET)], attack,
                                        transforms=("none",) + PURIFICATIONS))
        return {"rows": rows, "verdict": fx.judge_e5(rows)}

    def measure_e6(self) -> dict:
        spec = self.defence("apdm", outer_steps=300)
        result = self.protection_pairs(spec, "identity_match_rate")
        fids = []
        for c, protected_dir in result.pop("protected_models").items():
            protected = self.generic_scores(self.base_generations(7.5, protected_dir))[c]["fid_to_renders"]
            base = self.generic_scores(self.base_generations(7.5))[c]["fid_to_renders"]
            fids.append((protected, base))
        fid = (float(np.mean([p for p, _ in fids])), float(np.mean([b for _, b in fids]))) if fids else None
        result["fid_protected_vs_base"] = fid
        result["verdict"] = fx.judge_protection(result["protected"], result["other"], result["other_clean"],
                                                "identity_match_rate", fid)
        result["verdict"]["note"] = ("the naive-loss divergence (Theorem 1) is not measured by the card: "
                                     "docs/research/apdm.md, 'The naive loss and the beta / N_per trends'")
        return result

    def measure_e7(self) -> dict:
        spec = self.defence("persguard", target="pattern", steps=300)
        result = self.protection_pairs(spec, "backdoor_rate")
        result.pop("protected_models")
        result["verdict"] = fx.judge_protection(result["protected"], result["other"], result["other_clean"],
                                                "backdoor_rate")
        return result

    def protection_pairs(self, spec, key: str) -> dict:
        """Per class: protect identity 0, attack it (bench cell) and identity 1 on the protected model (cross
        cell), and identity 1 on the clean model; rows of all three."""
        from noclone.bench import stages
        from noclone.bench.config import validate

        metrics = ("ism", "identity_match_rate", "fdfr") + (("backdoor_rate",) if key == "backdoor_rate" else ())
        pairs = self.subjects(2)
        protected_subjects = pairs[0::2]
        raw = self.raw(f"protect-{next(iter(spec))}", [spec], [self.attack("dreambooth")],
                       subjects=protected_subjects, metrics=metrics)
        protected = self.run_bench(raw)
        clean = self.run_bench(self.raw("protect-clean", ["none"], [self.attack("dreambooth")],
                                        subjects=pairs[1::2], metrics=metrics))
        config = validate(raw)
        defence, attack = config.defences[0], config.attacks[0]
        cache, runtime, base = self.stages()
        other, models = [], {}
        for owner, subject in zip(config.subjects, validate(self.raw("o", ["none"], ["none"],
                                                                      subjects=pairs[1::2])).subjects):
            model = stages.protected_model(cache, base, stages.subject_photos(cache, owner, "train"), owner, defence,
                                           runtime)
            models[owner.class_noun] = str(model.path)
            for seed in config.seeds:
                attacked = stages.personalized(cache, model, stages.subject_photos(cache, subject, "train"), attack,
                                               subject.class_noun, seed, runtime)
                token = attack.personalization(subject.class_noun, seed).token
                images = stages.generated(cache, model, attacked, [f"a photo of {token} {subject.class_noun}"],
                                          config, seed, runtime)
                scores = stages.metrics(cache, images, stages.subject_photos(cache, subject, "references"),
                                        subject.class_noun, config, defence)
                other.append({"subject": subject.name, "class_noun": subject.class_noun, "defence": defence.name,
                              "transform": "none", "attack": attack.name, "seed": seed, **scores.meta["metrics"],
                              "generated": os.path.relpath(images.path, self.bench)})
        return {"protected": protected, "other": other, "other_clean": clean, "protected_models": models,
                "scaling_rule": SCALING_RULE}

    def pipeline(self):
        from noclone.models.pipeline import load_pipeline
        from noclone.sandbox.assets import model_path

        if getattr(self, "_pipe", None) is None:
            self._pipe = load_pipeline(model_path(self.config.model),
                                       device="cpu", dtype="fp32")
        return self._pipe

    # ----------------------------------------------------------------------------------------------- the card

    def run(self, recompute: bool = False) -> dict:
        for key in self.config.effects:
            path = self.effects_dir / f"{key}.json"
            if path.is_file() and not recompute and json.loads(path.read_text()).get("scale") == self.scale(key):
                log.info("fidelity %s: already measured at this scale (%s)", key, path)
                continue
            started = time.time()
            log.info("fidelity %s: measuring %s", key, self.scale(key))
            result = getattr(self, f"measure_{key.lower()}")()
            result["scale"] = self.scale(key)
            result["seconds"] = round(time.time() - started, 1)
            atomic_write_json(path, result)
            log.info("fidelity %s: %s (%.0f s)", key, result["verdict"]["status"], result["seconds"])
            self.write()
        return self.write()

    def scale(self, key: str) -> dict:
        """What an effect's figures were measured on (a stored effect is re-measured when this changes)."""
        c = self.config
        scale = {"model": c.model, "classes": list(c.classes), "seeds": list(c.seeds), "images": c.images}
        if key in ("E2", "E3"):
            return {**scale, "base_images": c.base_images, "seeds": [0],
                    **({"identities": c.identities} if key == "E3" else {})}
        if key in ("E6", "E7"):
            return {**scale, "identities": 2}
        return {**scale, "identities": c.identities, **({"attacks": list(c.clone_attacks)} if key == "E1" else {})}

    def write(self) -> dict:
        """fidelity.json and fidelity.html from whatever effects have been measured in this folder."""
        from noclone.data.atomic import atomic_write_text
        from noclone.fidelity.page import render_page

        measured = {}
        for e in fx.EFFECTS:
            path = self.effects_dir / f"{e.key}.json"
            measured[e.key] = json.loads(path.read_text()) if path.is_file() else None
        card = {"model": self.config.model, "config": asdict(replace(self.config, progress=False)),
                "identities": {"pool": list(IDENTITIES), "classes": list(self.config.classes)},
                "scaling_rule": SCALING_RULE,
                "effects": [{**asdict(e), **(measured[e.key]["verdict"] if measured[e.key] else
                                             {"status": "not measured", "checks": [], "note": ""}),
                             "seconds": (measured[e.key] or {}).get("seconds"),
                             "scale": (measured[e.key] or {}).get("scale")} for e in fx.EFFECTS],
                "measurements": measured}
        card["passed"] = [e["key"] for e in card["effects"] if e["status"] == "pass"]
        atomic_write_json(self.out / "fidelity.json", card)
        atomic_write_text(self.out / "fidelity.html", render_page(card, self.out))
        return card


def model_resolution(model: str) -> int:
    """The image size a diffusers directory works at, from its UNet and VAE configs (no weights loaded)."""
    from noclone.sandbox.assets import model_path

    root = model_path(model)
    try:
        unet = json.loads((root / "unet" / "config.json").read_text())
        vae = json.loads((root / "vae" / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise NocloneError(f"--model {model}: cannot read its unet/vae configs ({exc})") from None
    size = unet["sample_size"]
    return int((size if isinstance(size, int) else size[0]) * 2 ** (len(vae["block_out_channels"]) - 1))


def identifier_geometry(pipe, classes) -> dict:
    """How far rare identifiers move the prompt encoding, against the distance between classes (all 77 positions)."""
    import torch

    from noclone.training.diffusion import encode_prompts

    with torch.no_grad():
        def enc(prompts):
            return encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts).flatten(1).float()

        displacements, sizes = [], []
        for c in classes:
            reference = enc([f"a photo of a {c}"])
            moved = enc([f"a photo of {t} {c}" for t in IDENTIFIER_TOKENS]) - reference
            displacements.append(moved)
            sizes += [float(v) for v in moved.norm(dim=1)]
        every = enc([f"a photo of a {c}" for c in CLASSES])
        class_distance = float(np.mean([float((every[i] - every[j]).norm()) for i in range(3) for j in range(i + 1, 3)]))
        cosines = []
        for moved in displacements:
            unit = torch.nn.functional.normalize(moved, dim=1)
            sim = unit @ unit.T
            cosines += [float(sim[i, j]) for i in range(len(unit)) for j in range(i + 1, len(unit))]
    return {"tokens": list(IDENTIFIER_TOKENS), "mean_displacement": float(np.mean(sizes)),
            "class_distance": class_distance, "identifier_to_class_ratio": float(np.mean(sizes)) / class_distance,
            "max_pairwise_cosine": max(cosines), "mean_pairwise_cosine": float(np.mean(cosines))}


def vae_ceiling(pipe, subjects: list[dict], size: int, photos: int = 16) -> dict[str, dict]:
    """Per class: the identity match rate of each subject's photos after encode + decode by the model's VAE, against
    its references. No personalization can clone what the VAE cannot carry, so this bounds E1 from above."""
    import torch

    from noclone.data.images import images_to_tensor
    from noclone.eval.metrics import identity_match_rate
    from noclone.sandbox.evaluator import load_default_evaluator
    from noclone.sandbox.experiment import REFERENCE_PHOTOS
    from noclone.sandbox.render import render
    from noclone.training.data import pipeline_resolution

    evaluator = load_default_evaluator()
    rates: dict[str, list[float]] = {}
    with torch.no_grad():
        for s in subjects:
            shots = [render(s["class"], s["identity"], p, size=size) for p in range(photos)]
            x = images_to_tensor(shots, pipeline_resolution(pipe)).to(pipe.vae.device, pipe.vae.dtype)
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
            recon = ((y.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
            refs = [render(s["class"], s["identity"], p, size=size) for p in REFERENCE_PHOTOS]
            rates.setdefault(s["class"], []).append(identity_match_rate(
                evaluator.embed_images(recon), evaluator.embed_images(refs), evaluator.threshold))
    return {c: {"mean": float(np.mean(v)), "worst": float(np.min(v))} for c, v in rates.items()}


def guidance_gaps(pipe, subjects: list[dict], size: int, timestep: int = GAP_TIMESTEP) -> dict[str, float]:
    """Per class: ||eps(z_t, 'a photo of a <class>') - eps(z_t, '')|| / ||eps|| on the subjects' photos (a
    v-prediction model's outputs are converted to eps, so both kinds are measured in the same units)."""
    import torch

    from noclone.sandbox.render import render
    from noclone.training.data import LatentSet, pipeline_resolution
    from noclone.training.diffusion import encode_prompts, predicted_noise, step_generator, training_scheduler

    scheduler = training_scheduler(pipe)
    out = {}
    with torch.no_grad():
        for c in sorted({s["class"] for s in subjects}):
            photos = [render(c, s["identity"], p, size=size) for s in subjects if s["class"] == c for p in range(5)]
            latents = LatentSet.from_images(pipe.vae, photos, "", pipeline_resolution(pipe)).mean
            noise = torch.randn(latents.shape, generator=step_generator(0, timestep, "fidelity-gap"))
            ts = torch.full((len(latents),), timestep)
            noisy = scheduler.add_noise(latents, noise, ts)
            cond, uncond = (encode_prompts(pipe.text_encoder, pipe.tokenizer, [p] * len(noisy))
                            for p in (f"a photo of a {c}", ""))
            gap = (predicted_noise(scheduler, pipe.unet(noisy, ts, cond).sample, noisy, ts)
                   - predicted_noise(scheduler, pipe.unet(noisy, ts, uncond).sample, noisy, ts))
            out[c] = float(gap.norm() / noise.norm())
    return out
