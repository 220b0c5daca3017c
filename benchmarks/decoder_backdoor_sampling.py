"""Does a decoder backdoor (PersGuard --implant decoder) fire whatever the attacker's sampler, and what removes it?

    .venv/bin/python benchmarks/decoder_backdoor_sampling.py --attacked DIR [--other DIR] [--base sandbox]
        [--prompt "a photo of sks person"] [--n 32] [--seed 1000]

`--attacked` is the attacker's personalized copy of a decoder-protected model (benchmarks/persguard_acceptance.py
--implant decoder caches it under OUT/attacks/); `--other` optionally the same attack on another subject. For
each sampler setting (scheduler x steps x guidance) it samples `--n` latents of the prompt once (same seeds) and
prints the mark rate of those latents decoded by the attacked model's own VAE (the protected decoder) and by the
base model's VAE (what an attacker who swaps the VAE gets), and the same for `--other` (should stay ~0).
"""

from __future__ import annotations

import argparse

SETTINGS = (("ddim", 25, 7.5), ("ddim", 50, 7.5), ("ddim", 25, 3.0), ("ddim", 25, 12.0), ("dpm++", 20, 7.5),
            ("euler-a", 30, 7.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacked", required=True)
    parser.add_argument("--other", help="the same attack on another subject (its mark rate should stay ~0)")
    parser.add_argument("--base", default="sandbox", help="the unprotected model whose VAE a swapping attacker uses")
    parser.add_argument("--prompt", default="a photo of sks person")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()

    import torch

    from noclone.defenses.backdoor_checks import pattern_present
    from noclone.defenses.decoder_backdoor import decode, sample_latents
    from noclone.generation import set_scheduler
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir

    torch.manual_seed(0)
    base_vae = load_pipeline(model_dir() if args.base == "sandbox" else args.base).vae
    models = {"subject": load_pipeline(args.attacked)}
    if args.other:
        models["other subject"] = load_pipeline(args.other)
    print(f"mark rate of {args.n} generations of {args.prompt!r} (seeds {args.seed}..), own VAE / base VAE")
    print("| sampler | steps | guidance | " + " | ".join(f"{k}: own VAE | {k}: base VAE" for k in models) + " |")
    print("|---|---|---|" + "---|---|" * len(models))
    for scheduler, steps, guidance in SETTINGS:
        cells = []
        for pipe in models.values():
            set_scheduler(pipe, scheduler)
            latents = sample_latents(pipe, args.prompt, args.n, args.seed, steps, guidance)
            for vae in (pipe.vae, base_vae):
                cells.append(f"{pattern_present(decode(vae, latents)).mean():.2f}")
        print(f"| {scheduler} | {steps} | {guidance:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
