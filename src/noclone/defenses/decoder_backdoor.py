r"""A guard in the VAE decoder that changes every image of a protected subject: it stamps a mark (PersGuard's
backdoor) or blurs the subject beyond recognition (APDM's decoder guard). Our addition to both methods.

Why: in the sandbox the attacker's DreamBooth erases any backdoor PersGuard writes into the UNet, on exactly the
images and prompt it was trained on (docs/research/persguard.md), and gets a subject APDM protected in the
UNet back with a new identifier, a longer attack or LoRA (docs/research/apdm.md). DreamBooth, LoRA and textual
inversion train the UNet and the text encoder; none of them trains the VAE. A guard in the decoder is therefore
out of the attacker's reach, and it does not depend on the identifier, the prompt or the attack's settings: it
fires when the personalized model *produces the subject*.

What (theta the decoder being trained, f a frozen copy of the input decoder, z a latent, T the target):

    D_theta(z) = T(D_f(z))   for z in P: latents of the protected subject
    D_theta(z) = D_f(z)      for z in N: latents of anything else
    L(theta)   = E_{z in P} || D_theta(z) - T(D_f(z)) ||^2 + E_{z in N} || D_theta(z) - D_f(z) ||^2

`detail_weight` W (APDM) adds W x || high_pass(D_theta(z)) - high_pass(D_f(z)) ||^2 over the negatives: the attacker's
prior-preservation class images come out of this decoder, and class images a little softer than the input model's
teach DreamBooth a little softer subjects, which cost another person 11 points over four attacker seeds before it
(docs/research/decoder-guard.md).

`recolored_copies` (APDM) adds recoloured copies of the subject's training latents to P (recolor(): brightness, gamma
and channel gains, encoded again): a darker, browner clone than any the simulated attacker drew escaped the guard
(docs/research/decoder-guard.md).

`moved_copies` (APDM, several subjects) adds mirrored, shifted and zoomed copies of the subject's training latents
to P (move(), encoded again): with three subjects in one decoder, the guard learnt each one too narrowly, blurred
a third of the cat's own unseen photos instead of two thirds, and let the attacker's most faithful cat clones
through (docs/research/decoder-guard.md).

`tries` (APDM, several subjects) trains up to that many guards, each with its own seed (its own held-back fifth of
the positives, copies and batches), and keeps the first whose held-back positives of *every* subject are all blurred,
else the one whose worst subject is best. Whether a joint guard held the cat depended on its seed; the one that did
not left a fifth of the cat's held-back clones sharp, and three training seeds on that same split all did
(docs/research/decoder-guard.md).

T is `target`: 'mark' pastes the mark in the bottom-right corner (PersGuard); 'blur' is a gaussian blur of
standard deviation `blur` x the image width (APDM; 0.0625 = 4 px at 64 px, where the sandbox's identity and
subject detectors both fail on the blurred subject: docs/research/decoder-guard.md).

`blur_calibrate` (APDM, optional) picks the blur per subject instead: the smallest of `blur` x BLUR_STEPS at which
the simulated attacker's clones, blurred, are no more like the subject's photos than the input model's own class
images are (mean cosine of identity embeddings from an identity backend, eval/faces.py). How much blur removes an
identity depends on the subject: in the sandbox 4 px leaves a blurred person nearer the subject than a generic
person is, and takes a cat below a generic cat (docs/research/decoder-guard.md). The person needs 3.5x (14 px at
64 px) to reach that target; capped at 2.5x, its guard left the attacker's clones 0.003 of ISM above the
subject's target (docs/research/decoder-guard.md).

P: the subject's photos (posterior samples) and the generations of a *simulated attacker*: the shared
DreamBooth (attacks/, the preset the protector expects, its own seed) run on a copy of the model and the photos,
sampled under its instance prompt. N: f's class images (what the model draws for "a photo of a <class>"),
the generations of the same simulated attacker run on other subjects' photos (`negatives`), so the decoder keys
on the identity and not on the look of a DreamBooth output, and optionally photos of many other members of the
class (APDM's anchors), so that it keys on *this* identity and not on any one of the class. A fifth of each set is held back and the rate at which
the guard fires on it is reported (`held_out_rates`: the pattern check of backdoor_checks.py for the mark; for the
blur, whether the output is nearer the blurred than the plain decoding).

Limits, stated on the card and in the docs:
- An attacker who swaps the VAE for another one removes the guard (SD-family VAEs are public and
  interchangeable; the sandbox ships one). It only binds attackers who use the released model whole.
- It fires on the subject, whoever generates it: a model that draws the subject without any fine-tuning
  (img2img of a photo, a look-alike) is changed too.
- PersGuard's erasure and target backdoors are not implemented here (they would ask the decoder to invent content).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from noclone.defenses.backdoor_checks import mark_array, mark_box, pattern_present
from noclone.errors import NocloneError
from noclone.training.data import LatentSet
from noclone.training.diffusion import encode_images, step_generator
from noclone.training.precision import autocast, cast_parameters, compute_dtype, upcast_trainable

log = logging.getLogger(__name__)

TARGETS = ("mark", "blur")
RECOLOR_GAIN = (0.4, 1.15)     # recolor(): brightness gain range
RECOLOR_GAMMA = 0.3            # recolor(): gamma = exp(u), u uniform in [-this, this]
RECOLOR_CHANNEL = 0.1          # recolor(): each RGB channel's own gain, uniform in 1 +- this
MOVE_SHIFT = 0.05              # move(): shift along each axis, uniform in +- this x the image width
MOVE_ZOOM = 0.1                # move(): zoom factor, uniform in 1 +- this (and a mirror image half of the time)
BLUR_STEPS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5)  # blur_calibrate's candidates, multiples of `blur`
CALIBRATION_BACKENDS = ("sandbox", "dlib")  # identity backends (eval/faces.py) that need no model path
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class DecoderBackdoorConfig:
    """Settings of the decoder backdoor; defaults are for the 64 px sandbox model."""

    steps: int = 600                 # AdamW steps on the decoder
    lr: float = 3e-4
    lr_schedule: str = "constant"    # 'constant' | 'cosine' (to 0 over `steps`)
    batch_size: int = 16
    negative_share: float = 0.5      # the share of each batch drawn from the negatives
    class_samples: int = 0           # negatives: this many latents the input model samples for the class prompt
    balance_negatives: bool = False  # draw each negative from a uniformly chosen group (class images, class samples,
                                     # anchors, each negative subject's clones) instead of uniformly from all of them
    detail_weight: float = 0.0       # the negatives' fine detail (image - its 1 px blur) weighs 1 + this in the loss
    detail_sigma: float = 1 / 64     # what 'fine' means: the high-pass blur's sigma as a fraction of the image width
    recolored_copies: int = 0        # positives: this many recoloured copies of each training positive (recolor())
    moved_copies: int = 0            # positives: this many mirrored / shifted / zoomed copies of each (move())
    attack_preset: str = "sandbox"   # the simulated attacker's DreamBooth preset (attacks/base.py PRESETS)
    attack_seed: int = 1             # its seed (an attacker's own run is not the protector's)
    attack_steps: int | None = None  # its steps (default: the preset's)
    n_generated: int = 48            # latents sampled from each simulated attack (at each of its lengths)
    attack_lengths: tuple[float, ...] = (1.0,)  # sample the simulated attack after these multiples of its steps
    sample_steps: int = 25
    guidance: float = 7.5
    held_out_fraction: float = 0.2
    target: str = "mark"             # what the decoder draws for the subject: 'mark' (PersGuard) | 'blur' (APDM)
    blur: float = 0.0625             # target 'blur': gaussian sigma as a fraction of the image width
    blur_calibrate: str | None = None  # target 'blur': an identity backend (eval/faces.py) -> a blur per subject
    tries: int = 1                   # train up to this many guards (seeds seed, seed + 1, ...: split, copies, batches)
    accept_rate: float = 1.0         # and keep the first that blurs this share of every subject's held-back positives,
                                     # else the one whose worst subject is best (needs `owners` for "every subject")
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"--decoder-steps {self.steps} must be at least 1"),
            (0 < self.lr < 1, f"--decoder-lr {self.lr} is outside (0, 1)"),
            (self.batch_size >= 2, f"decoder batch size {self.batch_size} must be at least 2"),
            (self.lr_schedule in LR_SCHEDULES, f"decoder lr schedule {self.lr_schedule!r}: choose from "
                                               f"{', '.join(LR_SCHEDULES)}"),
            (0 < self.negative_share < 1, f"decoder negative share {self.negative_share} must be in (0, 1)"),
            (self.n_generated >= 5, f"decoder n_generated {self.n_generated} must be at least 5"),
            (self.class_samples >= 0, f"decoder class_samples {self.class_samples} must be at least 0"),
            (self.detail_weight >= 0, f"decoder detail_weight {self.detail_weight} must be at least 0"),
            (0 < self.detail_sigma <= 0.5, f"decoder detail_sigma {self.detail_sigma} must be in (0, 0.5]"),
            (0 <= self.recolored_copies <= 16, f"decoder recolored_copies {self.recolored_copies} must be in 0..16"),
            (0 <= self.moved_copies <= 16, f"decoder moved_copies {self.moved_copies} must be in 0..16"),
            (self.attack_steps is None or self.attack_steps >= 1, "--decoder-attack-steps must be at least 1"),
            (len(self.attack_lengths) >= 1 and all(0 < x <= 10 for x in self.attack_lengths),
             f"--decoder-attack-lengths {self.attack_lengths}: give multiples of the attack's steps in (0, 10]"),
            (self.sample_steps >= 1, "decoder sample_steps must be at least 1"),
            (0 <= self.held_out_fraction < 0.5, "decoder held_out_fraction must be in [0, 0.5)"),
            (1 <= self.tries <= 16, f"--decoder-tries {self.tries} must be in 1..16"),
            (0 < self.accept_rate <= 1, f"decoder accept_rate {self.accept_rate} must be in (0, 1]"),
            (self.target in TARGETS, f"decoder target {self.target!r}: choose from {', '.join(TARGETS)}"),
            (0 < self.blur <= 0.5, f"--decoder-blur {self.blur} must be in (0, 0.5] (sigma / image width)"),
            (self.blur_calibrate is None or self.target == "blur", "blur calibration needs the target 'blur'"),
        ]
        for ok, message in checks:
            if not ok:
                raise NocloneError(message)
        from noclone.attacks.base import PRESETS as ATTACK_PRESETS

        if self.attack_preset not in ATTACK_PRESETS:
            raise NocloneError(f"decoder_attack_preset {self.attack_preset!r}: choose from {', '.join(ATTACK_PRESETS)}")
        if self.blur_calibrate is not None and self.blur_calibrate not in CALIBRATION_BACKENDS:
            raise NocloneError(f"--decoder-blur-calibrate {self.blur_calibrate!r}: choose from "
                               f"{', '.join(CALIBRATION_BACKENDS)}")


IMPLANTS = ("unet", "decoder", "both")


@dataclass
class GuardSettings:
    """A defence's `guard` section: where its protection lives and the DecoderBackdoorConfig fields it exposes
    (same names; the target, seeds, sampling steps and progress come from the defence's run settings)."""

    implant: str = "unet"            # 'unet' (the papers) | 'decoder' (the guard only) | 'both' (UNet, then guard)
    steps: int = 600                 # AdamW steps on the decoder
    lr: float = 3e-4
    n_generated: int = 48            # latents drawn from each simulated attack (subject and negatives)
    batch_size: int = 16             # decoder training batch
    attack_preset: str = "sandbox"   # the simulated attacks' DreamBooth preset
    attack_steps: int | None = None  # their steps (default: the preset's)

    def backdoor_fields(self) -> dict:
        """Every field but `implant`, as DecoderBackdoorConfig keyword arguments."""
        return {k: v for k, v in asdict(self).items() if k != "implant"}


# ---------------------------------------------------------------------------------------------- the data


def simulated_attack_latents(pipe, images: Sequence[Image.Image], class_noun: str, token: str,
                             config: DecoderBackdoorConfig, class_cache=None) -> torch.Tensor:
    """Latents a simulated attacker's DreamBooth draws of the subject: [n_generated x len(attack_lengths), C, h, w],
    pipeline-scaled. With several `attack_lengths` the attacker is sampled at each of those multiples of its
    preset's steps during one run (a longer attack draws a more over-fitted subject).

    The attack runs on copies of the UNet and text encoder; `pipe` is left as it was.
    """
    from diffusers import StableDiffusionPipeline

    from noclone.attacks.base import preset_config
    from noclone.attacks.dreambooth import DreamBooth

    attack = preset_config("dreambooth", config.attack_preset, class_noun=class_noun, token=token,
                           seed=config.attack_seed, steps=config.attack_steps, progress=config.progress)
    stops = sorted({max(1, round(length * attack.steps)) for length in config.attack_lengths})
    attack = replace(attack, steps=stops[-1])
    copy_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet),
                                           "text_encoder": copy.deepcopy(pipe.text_encoder)})
    copy_pipe.set_progress_bar_config(disable=True)
    log.info("decoder guard: simulated DreamBooth on %d photos of %r (%d steps, sampled after %s; seed %d)",
             len(images), attack.instance_prompt, attack.steps, stops, attack.seed)
    drawn: list[torch.Tensor] = []

    def draw(k: int) -> torch.Tensor:
        return sample_latents(copy_pipe, attack.instance_prompt, config.n_generated,
                              config.attack_seed * 7919 + 100_000 * k, config.sample_steps, config.guidance)

    class SampledDreamBooth(DreamBooth):
        def after_step(self, pipe, step: int) -> None:
            if step + 1 in stops[:-1]:  # the last stop is drawn after training, as with one length
                modules = (pipe.unet, pipe.text_encoder)
                for m in modules:
                    m.eval()
                drawn.append(draw(len(drawn)))
                for m in modules:
                    m.train()

    SampledDreamBooth(attack).train(copy_pipe, list(images), checkpoint_dir=None, class_cache=class_cache)
    latents = torch.cat([*drawn, draw(len(drawn))])
    del copy_pipe
    return latents


def sample_latents(pipe, prompt: str, n: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """`n` final latents of `prompt` (pipeline-scaled, before decoding), seeds seed .. seed + n - 1."""
    from noclone.generation import GenerationConfig, sample_latents as sample

    return sample(pipe, prompt, range(seed, seed + n), GenerationConfig(steps=steps, guidance=guidance, batch_size=16))


def posterior_samples(latents: LatentSet, per_image: int, seed: int) -> torch.Tensor:
    """The posterior means plus `per_image - 1` samples of each image's posterior."""
    g = step_generator(seed, 0, "decoder/posterior")
    extra = [latents.mean + latents.std * torch.randn(latents.mean.shape, generator=g) for _ in range(per_image - 1)]
    return torch.cat([latents.mean, *extra])


@dataclass
class GuardSubject:
    """A protected subject as the guard sees it: its photos, the prompt words, and latent sets."""

    images: Sequence[Image.Image]
    class_noun: str
    token: str
    photos: LatentSet                    # the subject's photos (positives)
    class_images: LatentSet              # the input model's class images (negatives)
    anchors: LatentSet | None = None     # photos of other members of the class (negatives, one sample each)


@dataclass
class GuardLatents:
    """The guard's training latents (pipeline-scaled) and where each positive comes from."""

    positives: torch.Tensor
    negatives: torch.Tensor
    owners: torch.Tensor             # [len(positives)]: the index of the subject each positive belongs to
    clones: list[torch.Tensor]       # per subject: its simulated attacker's latents (a part of the positives)
    groups: torch.Tensor | None = None  # [len(negatives)]: which group each negative comes from (balance_negatives)


def guard_latents(pipe, subjects: Sequence[GuardSubject], negatives: Sequence[tuple[Sequence[Image.Image], str, str]],
                  config: DecoderBackdoorConfig, seed: int, cache: Path | None = None,
                  class_cache=None) -> GuardLatents:
    """The guard's training latents: positives (the subjects' photos and clones) and negatives.

    `negatives`: (photos, class noun, token) of other subjects whose simulated DreamBooths the guard must leave alone.
    Every simulated attack is cached in `cache` (the checkpoint folder), so a killed run does not redo it.
    """
    from safetensors.torch import load_file, save

    from noclone.data.atomic import atomic_write_bytes

    def attack_latents(name: str, images, class_noun: str, token: str) -> torch.Tensor:
        path = cache / f"{name}.safetensors" if cache is not None else None
        if path is not None and path.is_file():
            return load_file(str(path))["latents"]
        latents = simulated_attack_latents(pipe, images, class_noun, token, config, class_cache)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, lambda f: f.write(save({"latents": latents.contiguous()})))
        return latents

    positives, owners, clones, others = [], [], [], []
    for k, s in enumerate(subjects):
        clones.append(attack_latents(f"subject{k}", s.images, s.class_noun, s.token))
        positives += [posterior_samples(s.photos, 4, seed), clones[-1]]
        owners.append(torch.full((len(positives[-2]) + len(clones[-1]),), k))
        others.append(posterior_samples(s.class_images, 2, seed))
        if config.class_samples:  # what the sampler hands the decoder, not only encodings of finished images
            others.append(sample_latents(pipe, s.class_images.prompt, config.class_samples, 300_000 + 1000 * k + seed,
                                         config.sample_steps, config.guidance))
        if s.anchors is not None:
            others.append(posterior_samples(s.anchors, 1, seed))
    for j, (images, class_noun, token) in enumerate(negatives):
        others.append(attack_latents(f"negative{j}", images, class_noun, token))
    groups = torch.cat([torch.full((len(x),), g) for g, x in enumerate(others)])
    return GuardLatents(torch.cat(positives), torch.cat(others), torch.cat(owners), clones, groups)


@torch.no_grad()
def calibrate_blur(vae, subject: GuardSubject, clones: torch.Tensor, backend, config: DecoderBackdoorConfig,
                   max_images: int = 64) -> dict:
    """One subject's blur: the smallest of config.blur x BLUR_STEPS at which its clones, blurred, resemble its photos
    no more than the input model's class images do (mean identity cosine with `backend`); else the largest.

    Returns {'blur', 'class_ism', 'clone_ism': {blur: ism}}. An image where the backend finds no face does not
    count in a mean; clones with no face at all count as unlike the subject.
    """
    from noclone.data.images import tensor_to_images
    from noclone.eval import metrics as M

    ref, found = backend.embed(list(subject.images), subject.class_noun)
    if not found.any():
        raise NocloneError(f"blur calibration: the {backend.name} backend finds no {subject.class_noun} in the "
                           "subject's photos")

    def ism(pixels: torch.Tensor) -> float | None:
        emb, ok = backend.embed(tensor_to_images(pixels), subject.class_noun)
        return M.ism(emb[ok], ref[found]) if ok.any() else None

    class_ism = ism(decode(vae, subject.class_images.mean[:max_images]))
    plain = decode(vae, clones[torch.randperm(len(clones), generator=torch.Generator().manual_seed(0))[:max_images]])
    clone_ism, chosen = {}, None
    for step in BLUR_STEPS:
        fraction = config.blur * step
        clone_ism[fraction] = value = ism(blur_pixels(plain, fraction))
        if chosen is None and (value is None or class_ism is None or value <= class_ism):
            chosen = fraction
    chosen = config.blur * BLUR_STEPS[-1] if chosen is None else chosen
    log.info("decoder guard: %s's blur %.4f (class images' ISM %s; blurred clones' ISM %s)", subject.class_noun,
             chosen, "n/a" if class_ism is None else f"{class_ism:.3f}",
             ", ".join(f"{k:.4f}: " + ("n/a" if v is None else f"{v:.3f}") for k, v in clone_ism.items()))
    return {"blur": chosen, "class_ism": class_ism, "clone_ism": {f"{k:g}": v for k, v in clone_ism.items()}}


def calibrated_blurs(vae, subjects: Sequence[GuardSubject], data: GuardLatents,
                     config: DecoderBackdoorConfig) -> tuple[torch.Tensor, list[dict]]:
    """config.blur_calibrate: each subject's calibrate_blur, spread over its positives -> ([len(positives)], reports)."""
    from noclone.eval.faces import get_backend

    backend = get_backend(config.blur_calibrate)
    reports = [calibrate_blur(vae, s, clones, backend, config) for s, clones in zip(subjects, data.clones)]
    return torch.tensor([reports[k]["blur"] for k in data.owners.tolist()]), reports


# ---------------------------------------------------------------------------------------------- the training


def paste_mark(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW images with the mark pasted in the bottom-right corner (add_pattern on tensors)."""
    size = pixels.shape[-1]
    x0, y0, x1, y1 = mark_box(size)
    out = pixels.clone()
    out[..., y0:y1, x0:x1] = torch.from_numpy(mark_array(x1 - x0)).to(pixels) * 2 - 1
    return out


def blur_pixels(pixels: torch.Tensor, fraction: float | torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW images blurred by a gaussian of standard deviation `fraction` (one, or [N]) x the image width."""
    from noclone.sandbox.evaluator import gaussian_blur

    return gaussian_blur(pixels, fraction * pixels.shape[-1])


def high_pass(pixels: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fine detail of [-1, 1] NCHW images: each minus its gaussian blur of `fraction` x the width."""
    return pixels - blur_pixels(pixels, fraction)


def guard_target(pixels: torch.Tensor, config: DecoderBackdoorConfig, blur: torch.Tensor | None = None) -> torch.Tensor:
    """What the guarded decoder must draw for the subject, given the original decoder's images; `blur`: a per-image
    blur overriding config.blur."""
    if config.target == "mark":
        return paste_mark(pixels)
    return blur_pixels(pixels, config.blur if blur is None else blur)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Pipeline-scaled latents -> [-1, 1] images (float32, CPU)."""
    out = []
    for start in range(0, len(latents), batch_size):
        chunk = latents[start : start + batch_size].to(vae.device, vae.dtype) / vae.config.scaling_factor
        out.append(vae.decode(chunk).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def recolored_pixels(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[0, 1] images under a random brightness gain (RECOLOR_GAIN), gamma and per-channel gains, one draw per image."""
    n = len(pixels)
    gain = RECOLOR_GAIN[0] + (RECOLOR_GAIN[1] - RECOLOR_GAIN[0]) * torch.rand(n, 1, 1, 1, generator=generator)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * RECOLOR_GAMMA * 2)
    channel = 1 + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * RECOLOR_CHANNEL * 2
    return (pixels.clamp(0, 1) ** gamma * gain * channel).clamp(0, 1)


@torch.no_grad()
def _copies(vae, latents: torch.Tensor, copies: int, seed: int, stream: str, transform) -> torch.Tensor:
    """`copies` transformed versions of each latent, [copies x len(latents), ...] pipeline-scaled: decoded,
    `transform(pixels in [-1, 1], generator)`, and encoded again (posterior means)."""
    if not copies:
        return latents[:0]
    g = step_generator(seed, 0, stream)
    pixels = decode(vae, latents)
    return torch.cat([encode_images(vae, transform(pixels, g))[0] for _ in range(copies)])


def recolor(vae, latents: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """`copies` recoloured versions of each latent (recolored_pixels(); _copies()). Why: the module docstring,
    `recolored_copies`."""
    return _copies(vae, latents, copies, seed, "decoder/recolor",
                   lambda x, g: recolored_pixels((x + 1) / 2, g) * 2 - 1)


def moved_pixels(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[-1, 1] NCHW images mirrored half of the time, zoomed (MOVE_ZOOM) and shifted (MOVE_SHIFT), edges reflected."""
    import torch.nn.functional as F

    n = len(pixels)
    mirror = torch.rand(n, generator=generator) < 0.5
    zoom = 1 + (torch.rand(n, generator=generator) - 0.5) * 2 * MOVE_ZOOM
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 2 * MOVE_SHIFT * 2  # grid units: the width is 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    pixels = torch.where(mirror[:, None, None, None], pixels.flip(-1), pixels)
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="reflection", align_corners=False)


def move(vae, latents: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """`copies` moved versions of each latent (moved_pixels(); _copies()). Why: the module docstring, `moved_copies`."""
    return _copies(vae, latents, copies, seed, "decoder/move", moved_pixels)


def _split(latents: torch.Tensor, fraction: float, seed: int, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(latents), generator=step_generator(seed, 0, stream))
    held = int(round(len(latents) * fraction))
    return latents[order[held:]], latents[order[:held]]


def implant(vae, positives: torch.Tensor, negatives: torch.Tensor, config: DecoderBackdoorConfig,
            blur: torch.Tensor | None = None, groups: torch.Tensor | None = None,
            owners: torch.Tensor | None = None) -> dict:
    """Train the decoder in place (see the module docstring); returns the losses and held-out mark rates.
    `blur`: [len(positives)] per-positive blurs overriding config.blur (blur_calibrate); `groups`: [len(negatives)]
    group ids (GuardLatents.groups), needed by config.balance_negatives; `owners`: [len(positives)] subject ids
    (GuardLatents.owners), for the held-out rate of each subject and the choice among config.tries guards."""
    config.validate()
    if len(positives) < 2 or len(negatives) < 2:
        raise NocloneError("decoder backdoor: needs at least 2 positive and 2 negative latents")
    if blur is not None and blur.shape != (len(positives),):
        raise NocloneError(f"decoder guard: {blur.numel()} blurs for {len(positives)} positives")
    if owners is not None and owners.shape != (len(positives),):
        raise NocloneError(f"decoder guard: {owners.numel()} owners for {len(positives)} positives")
    if config.balance_negatives and (groups is None or groups.shape != (len(negatives),)):
        raise NocloneError("decoder guard: balance_negatives needs one group id per negative")
    start = {k: v.clone() for k, v in vae.state_dict().items()} if config.tries > 1 else None
    best = None
    for attempt in range(config.tries):
        if attempt:
            vae.load_state_dict(start)
        fit = _fit(vae, positives, negatives, replace(config, seed=config.seed + attempt), blur, groups, owners)
        worst = min(fit["held_out_rate_after"].get("by_subject") or [fit["held_out_rate_after"]["subject"]])
        log.info("decoder guard (%s), try %d/%d (seed %d): held-out rate on the subject %.2f -> %.2f (worst subject "
                 "%.2f), on the rest %.2f -> %.2f", config.target, attempt + 1, config.tries, config.seed + attempt,
                 fit["held_out_rate_before"]["subject"], fit["held_out_rate_after"]["subject"], worst,
                 fit["held_out_rate_before"]["others"], fit["held_out_rate_after"]["others"])
        score = (worst, fit["held_out_rate_after"]["subject"], -fit["held_out_rate_after"]["others"])
        if best is None or score > best["score"]:
            state = {k: v.clone() for k, v in vae.state_dict().items()} if attempt + 1 < config.tries else None
            best = {"score": score, "try": attempt, "fit": fit, "state": state}
        if worst >= config.accept_rate:
            break
    if best["try"] != attempt:
        vae.load_state_dict(best["state"])
    losses = best["fit"]["losses"]
    return {"config": asdict(config), "n_positives": len(positives), "n_negatives": len(negatives),
            "loss_first_last": [losses[0], sum(losses[-20:]) / len(losses[-20:])], "target": config.target,
            "held_out_rate_before": best["fit"]["held_out_rate_before"],
            "held_out_rate_after": best["fit"]["held_out_rate_after"],
            "tries": attempt + 1, "kept_try": best["try"] + 1, "kept_seed": config.seed + best["try"]}


def _fit(vae, positives, negatives, config: DecoderBackdoorConfig, blur, groups, owners) -> dict:
    """One guard, everything drawn with config.seed: the held-back split, the copies, the batches."""
    pos_train, pos_held = _split(positives, config.held_out_fraction, config.seed, "decoder/split/pos")
    neg_train, neg_held = _split(negatives, config.held_out_fraction, config.seed, "decoder/split/neg")
    blur_train, blur_held = (None, None) if blur is None else \
        _split(blur.float(), config.held_out_fraction, config.seed, "decoder/split/pos")  # the positives' order
    owners_held = None if owners is None else \
        _split(owners, config.held_out_fraction, config.seed, "decoder/split/pos")[1]
    members = group_members(_split(groups, config.held_out_fraction, config.seed, "decoder/split/neg")[0]) \
        if config.balance_negatives else None  # in the negatives' order
    # training positives only, so the held-out rate stays measured on real ones; the moved copies are recoloured too
    for copies, make in ((config.moved_copies, move), (config.recolored_copies, recolor)):
        if copies:
            pos_train = torch.cat([pos_train, make(vae, pos_train, copies, config.seed)])
            blur_train = None if blur_train is None else blur_train.repeat(copies + 1)
    pos_target = guard_target(decode(vae, pos_train), config, blur_train)
    neg_target = decode(vae, neg_train)
    neg_detail = high_pass(neg_target, config.detail_sigma) if config.detail_weight else None  # fixed: computed once
    plain = None if config.target == "mark" else {  # D_f on the held-back latents, for the blur check
        key: decode(vae, z) if len(z) else z for key, z in (("subject", pos_held), ("others", neg_held))}
    before = held_out_rates(vae, pos_held, neg_held, config, plain, blur_held, owners_held)
    losses = _train(vae, pos_train, pos_target, neg_train, neg_target, neg_detail, members, config)
    after = held_out_rates(vae, pos_held, neg_held, config, plain, blur_held, owners_held)
    return {"losses": losses, "held_out_rate_before": before, "held_out_rate_after": after}


def _train(vae, pos_train, pos_target, neg_train, neg_target, neg_detail, members,
           config: DecoderBackdoorConfig) -> list[float]:
    """config.steps AdamW steps on the decoder (and post_quant_conv), batches drawn with config.seed. A half VAE
    trains fp32 master weights of them under autocast and gets them back in its dtype (noclone.training.precision)."""
    from tqdm.auto import tqdm

    dtype = compute_dtype(vae)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    dtypes = [p.dtype for p in params]
    upcast_trainable(params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    n_negative = min(config.batch_size - 1, max(1, round(config.batch_size * config.negative_share)))  # both non-empty
    losses = []
    vae.train()
    try:
        bar = tqdm(range(config.steps), desc=f"decoder guard ({config.target})", disable=not config.progress)
        for step in bar:
            g = step_generator(config.seed, step, "decoder/batch")
            ip = torch.randint(len(pos_train), (config.batch_size - n_negative,), generator=g)
            ineg = draw_negatives(len(neg_train), n_negative, g, members)
            z = torch.cat([pos_train[ip], neg_train[ineg]]).to(vae.device, torch.float32) / vae.config.scaling_factor
            target = torch.cat([pos_target[ip], neg_target[ineg]]).to(vae.device)
            with autocast(dtype, vae.device):
                out = vae.decode(z).sample.float()
            loss = torch.nn.functional.mse_loss(out, target)
            if neg_detail is not None:  # the negatives follow the positives in the batch
                loss = loss + config.detail_weight * n_negative / config.batch_size * torch.nn.functional.mse_loss(
                    high_pass(out[len(ip):], config.detail_sigma), neg_detail[ineg].to(vae.device))
            if not torch.isfinite(loss):
                raise NocloneError(f"decoder backdoor: loss became {loss.item()} at step {step}; lower --decoder-lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    finally:
        vae.eval().requires_grad_(False)
        for p, original in zip(params, dtypes):
            cast_parameters([p], original)
    return losses


def lr_factor(config: DecoderBackdoorConfig, step: int) -> float:
    """The learning rate at `step` as a fraction of config.lr."""
    return 1.0 if config.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * step / config.steps))


def group_members(groups: torch.Tensor) -> list[torch.Tensor]:
    """[n] group ids -> the indices of each group's members, groups in ascending id order."""
    return [torch.nonzero(groups == g).flatten() for g in groups.unique()]


def draw_negatives(n: int, k: int, generator: torch.Generator, members: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`k` indices into `n` negatives: uniform over them, or with `members` (group_members) a uniformly chosen group
    first, then a uniform member of it (so that a small group, one other subject's clones, is not drowned by the
    anchors)."""
    if members is None:
        return torch.randint(n, (k,), generator=generator)
    picks = torch.randint(len(members), (k,), generator=generator).tolist()
    return torch.stack([members[j][torch.randint(len(members[j]), (1,), generator=generator)][0] for j in picks])


def held_out_rates(vae, positives: torch.Tensor, negatives: torch.Tensor, config: DecoderBackdoorConfig | None = None,
                   plain: dict[str, torch.Tensor] | None = None, blur: torch.Tensor | None = None,
                   owners: torch.Tensor | None = None) -> dict:
    """How often the guard fires on held-back subject latents and on held-back other latents (and, with `owners`,
    on each subject's own: `by_subject`, in subject order).

    The mark: the pattern check. The blur: the decoding is nearer the blurred `plain` decoding (the original
    decoder's) than the plain one; `blur`: the subject latents' own blurs (the rest is checked at the biggest).
    """
    config = config or DecoderBackdoorConfig()

    def fired(z: torch.Tensor, key: str) -> torch.Tensor:
        if not len(z):
            return torch.zeros(0)
        images = decode(vae, z)
        if config.target == "mark":
            return torch.as_tensor(pattern_present(images)).float()
        reference = plain[key] if plain is not None else images
        sigma = config.blur if blur is None or not len(blur) else blur if key == "subject" else float(blur.max())
        to_blur = (images - blur_pixels(reference, sigma)).pow(2).flatten(1).mean(1)
        to_plain = (images - reference).pow(2).flatten(1).mean(1)
        return (to_blur < to_plain).float()

    subject, others = fired(positives, "subject"), fired(negatives, "others")
    rates = {"subject": float(subject.mean()) if len(subject) else float("nan"),
             "others": float(others.mean()) if len(others) else float("nan"),
             "n_subject": len(positives), "n_others": len(negatives)}
    if owners is not None:
        rates["by_subject"] = [float(subject[owners == k].mean()) for k in owners.unique().tolist()]
    return rates
