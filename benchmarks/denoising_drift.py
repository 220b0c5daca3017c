"""How far a protected model's denoising moved from its base model's, on renders of subjects it never saw.

    .venv/bin/python benchmarks/denoising_drift.py --protected DIR [DIR ...] [--model sandbox] [--class-noun person]
        [--prompt "a photo of a person"] [--n 16] [--timesteps 100,500,900] [--first-identity 600]

For `--n` renders (photo 1) of held-out identities starting at `--first-identity` (not the protected subject, who is
held-out identity 0), noised at each timestep with fixed noise, prints the noise-prediction error of the base model
and of each protected model under `--prompt`, and their squared distance. A protection aimed at one subject should
leave these near the base model's; an error above 1 is worse than predicting zero noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protected", nargs="+", required=True)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--prompt", default=None, help="default: 'a photo of a <class>'")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--timesteps", default="100,500,900")
    parser.add_argument("--first-identity", type=int, default=600)
    args = parser.parse_args()

    from diffusers import DDPMScheduler

    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out
    from noclone.training.data import LatentSet, pipeline_resolution
    from noclone.training.diffusion import encode_prompts

    torch.manual_seed(0)
    prompt = args.prompt or f"a photo of a {args.class_noun}"
    base = load_pipeline(model_dir() if args.model == "sandbox" else Path(args.model))
    renders = [render(args.class_noun, held_out(args.first_identity + i), 1) for i in range(args.n)]
    latents = LatentSet.from_images(base.vae, renders, prompt, pipeline_resolution(base)).mean
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = [int(t) for t in args.timesteps.split(",")]

    @torch.no_grad()
    def predictions(pipe) -> dict[int, torch.Tensor]:
        cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt]).expand(len(latents), -1, -1)
        out = {}
        for t in timesteps:
            steps = torch.full((len(latents),), t)
            out[t] = pipe.unet(scheduler.add_noise(latents, noise, steps), steps, cond).sample.float()
        return out

    reference = predictions(base)
    print(f"prompt {prompt!r}, {args.n} renders of held-out {args.class_noun}s {args.first_identity}..")
    print("| model | timestep | error | base error | squared distance to base |")
    print("|---|---|---|---|---|")
    for path in args.protected:
        for t, pred in predictions(load_pipeline(Path(path))).items():
            print(f"| {Path(path).name} | {t} | {(pred - noise).pow(2).mean():.3f} | "
                  f"{(reference[t] - noise).pow(2).mean():.3f} | {(pred - reference[t]).pow(2).mean():.3f} |")


if __name__ == "__main__":
    main()
