"""Reproduce the embedded sandbox model from scratch: render a world, train a VAE, then the UNet + text encoder.

    noclone sandbox train --out DIR [--seed 0] [--identities 3000] [--unet-steps 4000] [--identifier-steps 1500]
    noclone sandbox train --out DIR --init-from MODEL --identifier-steps 1500   # the second stage only
    noclone sandbox train --preset v2-64-zsnr --init-from sandbox-v2-64 --out DIR   # continued at zero terminal SNR

An optional second stage fine-tunes with *identifier captions* ("a photo of vlo dog"): a pool of rare CLIP tokens,
each bound to a few training identities. A text encoder trained from scratch on class templates alone learns to
ignore any word it never saw, so "a photo of sks person" encodes almost exactly as "a photo of a person" and an
identifier cannot carry a subject apart from its class; Stable Diffusion's CLIP, by contrast, gives every rare token
its own direction. The identifiers used by attacks and defences (`RESERVED_IDENTIFIERS`) are never in the pool.
The shipped model is single-stage (v1). Measured (docs/research/sandbox-v1-world.md, "Identifier captions"): 1500
steps of this stage from the shipped model (44 min on 1 thread) leave "sks" as close to the class prompt as before
(relative distance 0.006 vs 0.008), make APDM's protection much stronger (match rate 0.06 vs 0.22) and DreamBooth on
dog and cat slightly stronger, but do not keep generic quality under APDM. With `identifier_binding='one-to-one'`
(100 tokens, one identity each, 1000 steps) the text encoder separates unseen identifiers ("sks" moves 0.141 from
the class prompt) but the UNet still ignores them. With 20 tokens and `identifier_prob=0.5` (1500 steps, about 1200
exposures per token, "id20") the UNet reads them: a bound token draws its identity, and "sks" moves the noise
prediction by up to 25% of ||eps|| (docs/research/persguard.md, "A sandbox variant whose UNet reads identifiers").
The stage stays an option, not the default: no variant makes the model-level defences pass, and switching would
re-run every figure.

Stages are cached in `DIR/work/` (renders, VAE, latents, UNet checkpoints), so a killed run resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from noclone.data.atomic import atomic_write_json
from noclone.errors import NocloneError
from noclone.models.architectures import build_pipeline
from noclone.sandbox import render as world
from noclone.sandbox.splits import GENERATOR_IDENTITIES
from noclone.training.diffusion import encode_prompts, min_snr_weights, noised, prediction_error, sample_latents, step_generator
from noclone.training.loop import LoopConfig, run_training

log = logging.getLogger(__name__)

TEMPLATES = ("a photo of a {}", "a portrait of a {}", "a picture of a {}", "a close-up photo of a {}")
IDENTIFIER_TEMPLATES = ("a photo of {} {}", "a portrait of {} {}", "a picture of {} {}", "a close-up photo of {} {}")
RESERVED_IDENTIFIERS = frozenset({"sks", "ohwx", "xyz", "qzv", "zwx", "pqv", "qlx", "bnha", "hta", "pcr", "krk", "tok", "sts", "olis"})


# v2's captions: compositional, naming what each photo shows (identity traits, expression, gaze, light, background),
# with rare tokens bound one-to-one to 1000 training identities so that the text encoder learns to carry words it
# rarely sees.
V2_CAPTIONS = dict(caption_style="v2", attribute_prob=0.7, uncond_prob=0.1, identifier_bound=1000, identifier_prob=0.5,
                   max_shard_size="15MB")


@dataclass
class SandboxTrainConfig:
    seed: int = 0
    identities_per_class: int = 3000
    photos_per_identity: int = 6
    vae_steps: int = 900
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 4500
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_lr: float = 1e-3
    ema_decay: float = 0.999
    snr_gamma: float | None = 5.0       # min-SNR-gamma loss weights; None: the plain (uniform) loss
    uncond_prob: float = 0.1
    attribute_prob: float = 0.5
    identifier_steps: int = 0           # second stage (identifier captions); 0 = single-stage (sandbox v1)
    identifier_prob: float = 0.3
    identifier_pool: int = 1000
    identifier_binding: str = "modulo"  # 'modulo': token = pool[identity % pool] | 'one-to-one': pool[k] <-> k-th identity
    identifier_unet_lr: float = 2e-4
    identifier_text_lr: float = 5e-4
    architecture: str = "sandbox"       # noclone.models.architectures preset (its resolution is the render size)
    caption_style: str = "v1"           # 'v1': class templates (+ attributes) | 'v2': compositional, see caption_v2
    identifier_bound: int = 0           # v2: the first N training identities each get a rare token of their own
    device: str = "cpu"
    mixed_precision: str = "no"         # 'no' | 'bf16' (autocast; the weights train in fp32)
    minutes: float | None = None        # wall-clock budget of the denoiser stage; stops early, a rerun resumes
    render_workers: int = 1
    max_shard_size: str | None = None   # e.g. "15MB": weight files split below this size

    PRESETS: ClassVar[dict[str, dict]] = {
        "v1": {},
        # Sandbox v2: SD-shaped VAE at 128 px, a larger UNet and text encoder, and v2's captions (V2_CAPTIONS). Its
        # step counts are for a GPU (bf16); on 2 CPU cores use --minutes and rerun to resume.
        "v2": dict(architecture="sandbox-v2", **V2_CAPTIONS, vae_steps=3000, vae_batch=64, unet_steps=30000,
                   unet_batch=128, unet_lr=3e-4, text_lr=5e-4),
        # v2's captions and denoiser in v1's 64 px world at v1's step counts: the v2 world that 2 CPU cores train in
        # one sitting (about 100 min).
        "v2-64": dict(architecture="sandbox-v2-64", **V2_CAPTIONS),
        # v2-64 with v-prediction at zero terminal SNR (architectures.PRESETS["sandbox-v2-64-zsnr"]). Plain v-loss,
        # as SD2 trains: min-SNR weights are 0 at zero SNR, the one step where the model must make the image's
        # colours from the prompt alone.
        "v2-64-zsnr": dict(architecture="sandbox-v2-64-zsnr", **V2_CAPTIONS, snr_gamma=None),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "SandboxTrainConfig":
        if name not in cls.PRESETS:
            raise NocloneError(f"unknown sandbox training preset {name!r}; choose from {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def resolution(self) -> int:
        from noclone.models.architectures import resolution

        return resolution(self.architecture)


def identifier_pool(tokenizer, size: int, seed: int = 0) -> list[str]:
    """`size` rare single-token lowercase words of the CLIP vocabulary (the later BPE merges), never a reserved one."""
    vocab = tokenizer.get_vocab()
    rare = sorted(
        (idx, tok[:-4]) for tok, idx in vocab.items()
        if tok.endswith("</w>") and 3 <= len(tok) - 4 <= 4 and tok[:-4].isascii() and tok[:-4].isalpha()
        and tok[:-4].islower() and idx >= 20000 and tok[:-4] not in RESERVED_IDENTIFIERS
    )
    words = [w for _, w in rare]
    rng = np.random.default_rng(seed)
    return [words[i] for i in sorted(rng.choice(len(words), size=min(size, len(words)), replace=False))]


def caption(class_noun: str, identity: int, rng: np.random.Generator, cfg: SandboxTrainConfig,
            identifiers: list[str] | None = None) -> str:
    """A training caption: a class template, sometimes with attribute words, sometimes empty (for CFG); with an
    identifier pool, sometimes "a photo of <the identity's token> <class>"."""
    if rng.random() < cfg.uncond_prob:
        return ""
    if identifiers and rng.random() < cfg.identifier_prob:
        token = identifiers[identity % len(identifiers)]
        return IDENTIFIER_TEMPLATES[rng.integers(len(IDENTIFIER_TEMPLATES))].format(token, class_noun)
    text = TEMPLATES[rng.integers(len(TEMPLATES))].format(class_noun)
    if rng.random() < cfg.attribute_prob:
        attrs = world.caption_attributes(class_noun, identity)
        chosen = [a for a in attrs if rng.random() < 0.6] or attrs[:1]
        text += " with " + (" and ".join(chosen) if len(chosen) < 3 else ", ".join(chosen[:-1]) + " and " + chosen[-1])
    return text


V2_TEMPLATES = ("a photo of {}", "a portrait of {}", "a picture of {}", "a close-up photo of {}", "a snapshot of {}",
                "an image of {}")


def _listed(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_v2(class_noun: str, identity: int, photo: int, rng: np.random.Generator, cfg: SandboxTrainConfig,
               token: str | None = None) -> str:
    """A compositional caption: a style template, the class (or '<token> <class>' for a bound identity), some of the
    identity's traits and some of what this photo shows; empty with probability uncond_prob (for guidance)."""
    if rng.random() < cfg.uncond_prob:
        return ""
    subject = f"{token} {class_noun}" if token and rng.random() < cfg.identifier_prob else world._a(class_noun)
    text = V2_TEMPLATES[rng.integers(len(V2_TEMPLATES))].format(subject)
    if rng.random() < cfg.attribute_prob:
        attrs = world.caption_attributes(class_noun, identity)
        text += " with " + _listed([a for a in attrs if rng.random() < 0.6] or attrs[:1])
    shown = [a for a in world.photo_attributes(class_noun, identity, photo) if rng.random() < 0.5]
    return text + (", " + ", ".join(shown) if shown else "")


def bound_identifiers(tokenizer, labels, cfg: SandboxTrainConfig) -> dict[tuple[str, int], str]:
    """v2: the first `identifier_bound` distinct training identities, each with its own rare token."""
    if not cfg.identifier_bound:
        return {}
    subjects = list(dict.fromkeys(labels))[: cfg.identifier_bound]
    return dict(zip(subjects, identifier_pool(tokenizer, len(subjects), cfg.seed)))


def _render_subject(args) -> np.ndarray:
    class_noun, identity, photos, size = args
    return world.render_array(class_noun, [identity] * photos, list(range(photos)), size)


def render_dataset(work: Path, cfg: SandboxTrainConfig) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """uint8 [N,R,R,3] renders (R: the architecture's resolution) and their (class, identity), cached in work/;
    photo p of a subject is row subject * photos_per_identity + p."""
    size = cfg.resolution
    cache = work / ("renders.npz" if size == 64 else f"renders-{size}.npz")
    if cache.is_file():
        data = np.load(cache)
        return data["images"], [(str(c), int(i)) for c, i in zip(data["classes"], data["identities"])]
    rng = np.random.default_rng(cfg.seed)
    subjects = []
    for class_noun in world.CLASSES:
        ids = rng.choice(len(GENERATOR_IDENTITIES), size=cfg.identities_per_class, replace=False)
        subjects += [(class_noun, int(GENERATOR_IDENTITIES.start + i)) for i in ids]
    per = cfg.photos_per_identity
    images = np.zeros((len(subjects) * per, size, size, 3), np.uint8)
    labels = [subject for subject in subjects for _ in range(per)]
    jobs = [(c, i, per, size) for c, i in subjects]
    if cfg.render_workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(cfg.render_workers) as pool:
            arrays = pool.imap(_render_subject, jobs, chunksize=64)
            for n, array in enumerate(tqdm(arrays, total=len(jobs), desc="rendering", leave=False)):
                images[n * per : (n + 1) * per] = array
    else:
        for n, job in enumerate(tqdm(jobs, desc="rendering", leave=False)):
            images[n * per : (n + 1) * per] = _render_subject(job)
    np.savez(cache, images=images, classes=np.array([c for c, _ in labels]), identities=np.array([i for _, i in labels]))
    return images, labels


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def train_vae(pipe, images: np.ndarray, work: Path, cfg: SandboxTrainConfig) -> None:
    vae = pipe.vae
    path = work / "vae"
    if (path / "config.json").is_file():
        pipe.vae = type(vae).from_pretrained(str(path))
        return
    vae.to(cfg.device).train()
    with torch.no_grad():  # start with a near-deterministic posterior so reconstruction learns fast
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    # 5 % warm-up; at least 2 steps, since OneCycleLR divides by zero when its warm-up ends at step 0
    warmup = max(0.05, 2.0 / cfg.vae_steps) if cfg.vae_steps >= 4 else 0.3
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=warmup)

    def step(i: int) -> dict[str, torch.Tensor]:
        g = step_generator(cfg.seed, i, "vae")
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = to_pixels(images[idx.numpy()]).to(cfg.device)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(cfg.device)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = dist.kl().mean() / x[0].numel()
        return {"loss": rec + 1e-6 * kl, "rec": rec}

    for _ in range(_completed_steps(work / "vae-ckpt")):
        sched.step()
    run_training(vae.named_parameters(), opt, step, LoopConfig(cfg.vae_steps, work / "vae-ckpt", 100, "VAE",
                                                               autocast=_autocast_dtype(cfg)),
                 after_step=lambda i: sched.step())
    vae.eval()
    with torch.no_grad():
        z = vae.encode(to_pixels(images[:512]).to(cfg.device)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(str(path))


def _autocast_dtype(cfg: SandboxTrainConfig) -> torch.dtype | None:
    if cfg.mixed_precision not in ("no", "bf16"):
        raise NocloneError(f"mixed_precision {cfg.mixed_precision!r}: choose no or bf16")
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else None


def train_denoiser(pipe, images: np.ndarray, labels, work: Path, cfg: SandboxTrainConfig, stage: str = "unet",
                   identifiers: list[str] | None = None, deadline: float | None = None) -> bool:
    """Train UNet + text encoder on the renders (EMA of the UNet kept); checkpoints under work/<stage>-ckpt.
    Returns whether every step ran (False: `deadline` stopped it; a rerun resumes)."""
    from noclone.training.diffusion import encode_images

    latent_cache = work / "latents.pt"
    if latent_cache.is_file():
        mean, std = torch.load(latent_cache, weights_only=True)
    else:
        mean, std = encode_images(pipe.vae, to_pixels(images), batch_size=256)
        torch.save((mean, std), latent_cache)
    pipe.vae.to("cpu")  # only its latents are needed from here on
    unet, text_encoder = pipe.unet.to(cfg.device), pipe.text_encoder.to(cfg.device)
    unet.train()
    text_encoder.train()
    bound = bound_identifiers(pipe.tokenizer, labels, cfg) if cfg.caption_style == "v2" else {}
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = [("unet." + n, p) for n, p in unet.named_parameters()] + [("text." + n, p) for n, p in text_encoder.named_parameters()]
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": cfg.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": cfg.text_lr},
    ], weight_decay=1e-2)
    warmup = 200
    lr_lambda = lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.unet_steps))) * 0.9 + 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ema_path = work / ("ema.safetensors" if stage == "unet" else f"{stage}-ema.safetensors")
    bound_photos = _bound_photos(labels, len(identifiers)) if identifiers and cfg.identifier_binding == "one-to-one" else []

    def step(i: int) -> dict[str, torch.Tensor]:
        g = step_generator(cfg.seed, i, stage)
        idx = torch.randint(0, len(images), (cfg.unet_batch,), generator=g).tolist()
        rng = np.random.default_rng([cfg.seed, i] if stage == "unet" else [cfg.seed, i, 1])
        if cfg.caption_style == "v2":
            per = cfg.photos_per_identity
            prompts = [caption_v2(*labels[j], j % per, rng, cfg, bound.get(labels[j])) for j in idx]
        elif identifiers and cfg.identifier_binding == "one-to-one":
            idx, prompts = _one_to_one_batch(idx, labels, rng, cfg, identifiers, bound_photos)
        else:
            prompts = [caption(labels[j][0], labels[j][1], rng, cfg, identifiers) for j in idx]
        latents = sample_latents(mean[idx], std[idx], g)
        cond = encode_prompts(text_encoder, pipe.tokenizer, prompts)
        noisy, t, target = noised(pipe.scheduler, latents, g)
        err = prediction_error(unet, noisy, t, cond, target, reduction="per-sample")
        if cfg.snr_gamma is None:
            return {"loss": err.mean(), "mse": err.mean()}
        weights = min_snr_weights(pipe.scheduler, t, cfg.snr_gamma).to(err.device)
        return {"loss": (err * weights).mean(), "mse": err.mean()}

    def after(i: int) -> None:
        sched.step()
        decay = min(cfg.ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if (i + 1) % 200 == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, str(ema_path))

    ckpt = work / f"{stage}-ckpt"
    if ema_path.is_file() and (ckpt / "state.json").is_file():
        from safetensors.torch import load_file

        ema.load_state_dict(load_file(str(ema_path)))
        for _ in range(_completed_steps(ckpt)):
            sched.step()
    run_training(params, opt, step, LoopConfig(cfg.unet_steps, ckpt, 200, f"{stage}: UNet+text",
                                               max_grad_norm=1.0, autocast=_autocast_dtype(cfg),
                                               deadline=deadline), after_step=after)
    done = _completed_steps(ckpt) >= cfg.unet_steps
    if not done:  # stopped by the deadline: keep the EMA of the steps so far, so the written model is usable
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, str(ema_path))
    log.info("%s: %d of %d steps done", stage, _completed_steps(ckpt), cfg.unet_steps)
    pipe.unet = ema
    pipe.unet.eval()
    text_encoder.eval()
    return done


def _bound_photos(labels, count: int) -> list[list[int]]:
    """Photo indices of `count` identities spread evenly over the dataset (so over every class), one per token."""
    photos: dict[tuple[str, int], list[int]] = {}
    for n, label in enumerate(labels):
        photos.setdefault(label, []).append(n)
    identities = list(photos.values())
    stride = max(1, len(identities) // count)
    return identities[::stride][:count]


def _one_to_one_batch(idx: list[int], labels, rng: np.random.Generator, cfg: SandboxTrainConfig,
                      identifiers: list[str], bound: list[list[int]]) -> tuple[list[int], list[str]]:
    """With probability identifier_prob a batch slot becomes a photo of bound identity k captioned with token k."""
    out_idx, prompts = [], []
    for j in idx:
        if rng.random() < cfg.identifier_prob:
            k = int(rng.integers(len(bound)))
            j = bound[k][int(rng.integers(len(bound[k])))]
            template = IDENTIFIER_TEMPLATES[rng.integers(len(IDENTIFIER_TEMPLATES))]
            prompts.append(template.format(identifiers[k], labels[j][0]))
        else:
            prompts.append(caption(labels[j][0], labels[j][1], rng, cfg))  # no pool: a plain caption
        out_idx.append(j)
    return out_idx, prompts


def _completed_steps(checkpoint_dir: Path) -> int:
    state = checkpoint_dir / "state.json"
    return int(json.loads(state.read_text())["step"]) if state.is_file() else 0


def train_identifier_stage(pipe, images: np.ndarray, labels, work: Path, cfg: SandboxTrainConfig) -> list[str]:
    """Stage 2: fine-tune UNet + text encoder with identifier captions mixed into the class captions."""
    if cfg.identifier_binding not in ("modulo", "one-to-one"):
        raise NocloneError(f"identifier_binding {cfg.identifier_binding!r}: choose modulo or one-to-one")
    identifiers = identifier_pool(pipe.tokenizer, cfg.identifier_pool, cfg.seed)
    stage_cfg = replace(cfg, unet_steps=cfg.identifier_steps, unet_lr=cfg.identifier_unet_lr, text_lr=cfg.identifier_text_lr)
    train_denoiser(pipe, images, labels, work, stage_cfg, stage="identifiers", identifiers=identifiers)
    return identifiers


def train_sandbox_model(out: str | Path, cfg: SandboxTrainConfig | None = None, work: str | Path | None = None,
                        init_from: str | Path | None = None) -> Path:
    """Train the sandbox pipeline and write it as a diffusers directory at `out` (UNet and VAE fp16, text encoder fp32).

    With `init_from` (a sandbox pipeline directory) its VAE, UNet and text encoder are the start: with identifier
    steps only the identifier stage runs; with v2 captions the denoiser stage continues from it (training in pieces,
    e.g. one GPU session after another). With `cfg.minutes` the denoiser stops when the budget is spent and the model
    is written from the steps done so far (`sandbox_training.json` says how many); a rerun resumes.
    """
    from noclone.models.pipeline import load_pipeline, save_pipeline

    cfg = cfg or SandboxTrainConfig()
    out = Path(out)
    work = Path(work) if work else out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    started = time.time()
    deadline = started + cfg.minutes * 60 - 30 if cfg.minutes else None  # 30 s kept for writing the model
    images, labels = render_dataset(work, cfg)
    log.info("rendered %d images (%.0f s)", len(images), time.time() - started)
    complete = True
    if init_from is None:
        pipe = build_pipeline(cfg.architecture, seed=cfg.seed)
        train_vae(pipe, images, work, cfg)
        log.info("VAE ready (%.0f s)", time.time() - started)
        complete = train_denoiser(pipe, images, labels, work, cfg, deadline=deadline)
    else:
        from noclone.models.architectures import build_scheduler

        pipe = load_pipeline(init_from, dtype="fp32")
        # the preset's noise schedule and prediction type, which may differ from the starting model's
        pipe.scheduler = build_scheduler(cfg.architecture)
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(True)
        log.info("starting from %s", init_from)
        if cfg.caption_style == "v2" and cfg.identifier_steps == 0:
            complete = train_denoiser(pipe, images, labels, work, cfg, stage="continued", deadline=deadline)
    if cfg.identifier_steps > 0:
        train_identifier_stage(pipe, images, labels, work, cfg)
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # good images in ~25 steps
    pipe.to("cpu", torch.float16)
    stage = "unet" if init_from is None else "continued"
    card = {**asdict(cfg), "init_from": str(init_from) if init_from else None, "complete": complete,
            "denoiser_steps_done": _completed_steps(work / f"{stage}-ckpt"), "seconds": round(time.time() - started)}
    save_pipeline(pipe, out, overwrite=True, max_shard_size=cfg.max_shard_size,
                  extra_files={"sandbox_training.json": json.dumps(card, indent=2)})
    log.info("sandbox model written to %s (%.0f s%s)", out, time.time() - started,
             "" if complete else "; stopped by the time budget, rerun to resume")
    return out
