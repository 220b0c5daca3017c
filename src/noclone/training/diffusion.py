"""The diffusion-training pieces every attack and defence shares: prompt encoding, latents, noising, the loss."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def step_generator(seed: int, step: int, stream: str = "") -> torch.Generator:
    """A generator seeded from (seed, step, stream): a step's randomness does not depend on what ran before it."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states [N, 77, D] (gradients flow if the encoder requires them)."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def prompt_condition(text_encoder, tokenizer, prompt: str, cache: dict | None = None,
                     grad: bool = True) -> torch.Tensor:
    """The encoded prompt [1, 77, D]. Cached while the text encoder is frozen; while it trains (a personalization,
    real or simulated) it is re-encoded every call, with a graph only if `grad` and some of its weights learn."""
    if cache is not None and not text_encoder.training and prompt in cache:
        return cache[prompt]
    with torch.set_grad_enabled(grad and any(p.requires_grad for p in text_encoder.parameters())):
        hidden = encode_prompts(text_encoder, tokenizer, [prompt])
    if cache is not None and not text_encoder.training and not hidden.requires_grad:
        cache[prompt] = hidden
    return hidden


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of [-1, 1] images, already multiplied by the VAE scaling factor (training data:
    never part of a graph)."""
    means, stds = [], []
    scale = vae.config.scaling_factor
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float().cpu() * scale)
        stds.append(dist.std.float().cpu() * scale)
    return torch.cat(means), torch.cat(stds)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return mean + std * torch.randn(mean.shape, generator=generator)


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule: what training adds noise with, whatever samples."""
    from diffusers import DDPMScheduler

    cached = getattr(pipe, "_noclone_training_scheduler", None)
    if cached is None or cached.config.num_train_timesteps != pipe.scheduler.config.num_train_timesteps:
        cached = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe._noclone_training_scheduler = cached
    return cached


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction, SD2.x 768)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predicted_noise(scheduler, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The UNet's output as a noise (epsilon) prediction: converted from v for v-prediction models, so that
    measurements in units of ||eps|| mean the same for both kinds."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        abar = scheduler.alphas_cumprod.to(z_t.device)[t.to(z_t.device)].float().view(-1, 1, 1, 1)
        return abar.sqrt() * output + (1 - abar).sqrt() * z_t
    raise ValueError(f"unsupported prediction_type {kind!r}")


def noised(scheduler, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None):
    """(noisy latents, timesteps, target) with t ~ U{0..T-1} and fresh Gaussian noise from `generator`."""
    noise = torch.randn(latents.shape, generator=generator)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return noisy, timesteps, diffusion_target(scheduler, latents, noise, timesteps)


def prediction_error(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, target: torch.Tensor,
                     reduction: str = "mean") -> torch.Tensor:
    """Squared error of the UNet prediction: 'mean' scalar, 'per-sample' [N], or 'none' (elementwise)."""
    device, dtype = unet.device, unet.dtype
    pred = unet(noisy.to(device, dtype), timesteps.to(device), cond.to(device, dtype)).sample.float()
    err = F.mse_loss(pred, target.to(device).float(), reduction="none")
    if reduction == "none":
        return err
    if reduction == "per-sample":
        return err.flatten(1).mean(1)
    return err.mean()


def _sharded(shard: Callable[[torch.Tensor], torch.Tensor] | None, batch: int, *tensors: torch.Tensor):
    """`tensors` cut to this process's slice of a global batch of `batch` (a tensor of another length, e.g. one
    prompt condition for all, is left whole); unchanged without `shard`."""
    if shard is None:
        return tensors
    return tuple(shard(t) if len(t) == batch else t for t in tensors)


def distillation_loss(unet, teacher, scheduler, latents: torch.Tensor, cond: torch.Tensor,
                      generator: torch.Generator, timesteps: torch.Tensor | None = None,
                      shard: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """E||eps_theta(z_t(x), t, c) - eps_teacher(z_t(x), t, c)||^2: keep the UNet's prediction the frozen teacher's.
    `shard` (noclone.training.distributed): `latents` are the global batch, the randomness is drawn for all of it
    and only this process's slice goes through the UNets."""
    noisy, timesteps, _ = noised(scheduler, latents, generator, timesteps)
    cond = cond.expand(len(latents), -1, -1)
    noisy, timesteps, cond = _sharded(shard, len(latents), noisy, timesteps, cond)
    with torch.no_grad():
        target = teacher(noisy.to(teacher.device, teacher.dtype), timesteps.to(teacher.device),
                         cond.to(teacher.device, teacher.dtype)).sample.float()
    return prediction_error(unet, noisy, timesteps, cond, target)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (Hang et al. 2023): faster convergence than uniform weighting."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, generator: torch.Generator,
                   reduction: str = "mean",
                   shard: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The standard denoising loss E||eps_theta(z_t, t, c) - target||^2. With `shard`
    (noclone.training.distributed.Distributed.shard) `latents` are the step's global batch: noise and timesteps are
    drawn for all of it, as one process would, and only this process's slice goes through the UNet."""
    noisy, timesteps, target = noised(scheduler, latents, generator)
    noisy, timesteps, target, cond = _sharded(shard, len(latents), noisy, timesteps, target, cond)
    return prediction_error(unet, noisy, timesteps, cond, target, reduction)
