"""Peak memory of one APDM outer step with SD1.5-shaped random weights, on this machine's CPU (RSS) or GPU.

    .venv/bin/python benchmarks/apdm_memory.py [--params attention|lora|full] [--resolution 64] [--inner-steps 1]
                                               [--reference-dtype same|bf16] [--device cpu|cuda] [--threads 1]

Prints the plan (how many UNet-sized tensor sets each mode holds, in GB for SD1.5 fp32 weights) and the measured
peak: resident memory sampled every 5 ms during the step on CPU (`torch.cuda.max_memory_allocated` on CUDA), and
the baseline after the pipeline is built. Subject and class latents are random (no VAE, no class images), so
only the protection step itself is measured. params=full needs ~31 GB + activations in fp32: on a machine with
less memory run it only on a GPU that has it, or pass --reference-dtype bf16 to see the saving.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakSampler:
    """The highest resident set size seen while the block runs (sampled, plus the final reading)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def plan(unet_params: int, trainable: int, params: str, reference_bytes_per: int) -> list[tuple[str, float]]:
    """(tensor set, GB) for one outer step: what APDM keeps besides activations."""
    gb = 1e9
    rows = [("UNet weights (live, fp32)", unet_params * 4 / gb),
            ("outer AdamW state (2 x trainable)", trainable * 8 / gb),
            ("outer gradient accumulator", trainable * 4 / gb),
            ("inner gradients", trainable * 4 / gb),
            ("inner snapshot (the attacker's copy)", trainable * 4 / gb),
            ("inner AdamW state (2 x trainable)", trainable * 8 / gb)]
    if params == "full":
        rows.append(("reference phi (frozen copy)", unet_params * reference_bytes_per / gb))
    else:
        rows.append(("reference phi (original trainable values only)", trainable * 4 / gb))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="sd15-shapes")
    parser.add_argument("--params", default="attention", choices=("full", "attention", "lora"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reference-dtype", default="same")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from noclone.defenses.apdm import APDM, APDMConfig
    from noclone.defenses.base import select_parameters
    from noclone.models.architectures import build_pipeline
    from noclone.models.pipeline import use_sdpa
    from noclone.training.data import LatentSet, SubjectData

    t0 = time.perf_counter()
    base_rss = rss_bytes()
    pipe = build_pipeline(args.preset)
    use_sdpa(pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    if args.params == "lora":  # rank 4 on the attention projections, counted without attaching it
        trainable = sum(4 * (m.in_features + m.out_features) for n, m in pipe.unet.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
                        and ".attn" in n)
    else:
        trainable = sum(p.numel() for p in select_parameters(pipe.unet, args.params).values())
        pipe.unet.requires_grad_(False)
    built = time.perf_counter() - t0

    latent = args.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)

    def latents(prompt: str, n: int) -> LatentSet:
        return LatentSet(torch.randn(n, 4, latent, latent, generator=g), torch.full((n, 4, latent, latent), 0.05), prompt)

    data = SubjectData(latents("a photo of sks person", 4), latents("a photo of a person", 4))
    config = APDMConfig(outer_steps=1, inner_steps=args.inner_steps, batch_size=args.batch_size, params=args.params,
                        reference_dtype=args.reference_dtype, progress=False)
    ref_bytes = {"same": 4, "fp32": 4, "bf16": 2, "fp16": 2}[args.reference_dtype]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, preset {args.preset}, "
          f"{args.resolution} px (latent {latent}x{latent}), batch {args.batch_size}, N_per {args.inner_steps}, "
          f"params {args.params}, reference {args.reference_dtype}")
    print(f"UNet parameters: {unet_params / 1e6:.1f} M; trainable ({args.params}): {trainable / 1e6:.2f} M")
    rows = plan(unet_params, trainable, args.params, ref_bytes)
    for name, size in rows:
        print(f"  plan  {name:<48} {size:7.2f} GB")
    print(f"  plan  {'total besides activations and VAE/text encoder':<48} {sum(s for _, s in rows):7.2f} GB")
    attention = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".attn2." in n)
    for mode, count in (("full", unet_params), ("attention", attention)):
        mode_rows = plan(unet_params, count, mode, 4)
        print(f"  plan  params={mode} (fp32 reference) would hold {sum(s for _, s in mode_rows):.2f} GB")

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    pipeline_rss = rss_bytes()
    t1 = time.perf_counter()
    with PeakSampler() as sampler:
        history = APDM(config).train(pipe, [data])
    step = time.perf_counter() - t1
    print(f"pipeline built in {built:.1f} s; one outer step in {step:.1f} s; loss {history[0]['loss']:.4f}")
    print(f"RSS: process start {base_rss / 1e9:.2f} GB, after building the pipeline {pipeline_rss / 1e9:.2f} GB, "
          f"peak during the outer step {sampler.peak / 1e9:.2f} GB (+{(sampler.peak - pipeline_rss) / 1e9:.2f} GB)")
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        print(f"CUDA: allocated before {before / 1e9:.2f} GB, peak {peak / 1e9:.2f} GB (+{(peak - before) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
