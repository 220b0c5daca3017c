"""Seconds per training step of the sandbox worlds' VAE and UNet on this machine (batch 32, random data): why v2's
128 px VAE needs a GPU and v2-64 does not.

    python benchmarks/sandbox_step_time.py [--threads 2] [--architectures sandbox,sandbox-v2,sandbox-v2-64]
"""

from __future__ import annotations

import argparse
import time

import torch

from noclone.models.architectures import build_unet, build_vae, resolution


def step_seconds(model: torch.nn.Module, loss_fn, repeats: int = 2) -> float:
    """Mean wall time of forward + backward + AdamW step, after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters())
    times = []
    for i in range(repeats + 1):
        started = time.time()
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.time() - started)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--architectures", default="sandbox,sandbox-v2,sandbox-v2-64")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print("| architecture | resolution | VAE step (s) | UNet step (s) |\n|---|---|---|---|")
    for name in args.architectures.split(","):
        vae, unet = build_vae(name), build_unet(name)
        x = torch.randn(args.batch, 3, resolution(name), resolution(name))
        vae_s = step_seconds(vae, lambda: (vae.decode(vae.encode(x).latent_dist.sample()).sample - x).pow(2).mean())
        size = unet.config.sample_size
        latents = torch.randn(args.batch, unet.config.in_channels, size, size)
        text = torch.randn(args.batch, 77, unet.config.cross_attention_dim)
        t = torch.randint(0, 1000, (args.batch,))
        unet_s = step_seconds(unet, lambda: unet(latents, t, text).sample.pow(2).mean())
        print(f"| {name} | {resolution(name)} | {vae_s:.2f} | {unet_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
