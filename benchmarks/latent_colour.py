"""Who decides a generated image's colours: the prompt, or the starting noise?

    .venv/bin/python benchmarks/latent_colour.py [--model sandbox|NAME|DIR] [--images 32] [--guidance 7.5] [--seed 0]
        [--personalized DIR:CLASS:K ...]

The colours of large areas live in the latent's lowest frequencies; the lowest of all is its DC, the mean of each
latent channel over the image. For the model, per class ("a photo of a <class>", `--images` generations from fixed
starting noise) against as many renders of held-out identities, prints:
  - dc_error: ||mean generated DC - mean rendered DC|| (latent units, the scaled latents the UNet sees);
  - class_spread: how far the classes' mean generated DCs lie apart, as a share of how far the renders' lie apart
    (1: the prompt moves the colours as the world does; 0: the prompt does not move them at all);
  - noise_corr: the correlation, over images and channels, between a generation's DC and its starting noise's DC
    (high: the noise, not the prompt, sets the colours).
With `--personalized DIR:CLASS:K` (a model after a DreamBooth on the sandbox's held-out identity K of CLASS, photos
0-4, e.g. from `noclone personalize`), also the identity match of its generations for "a photo of sks <class>", as
generated and with each generation's DC replaced by the mean DC of the subject's photos (the rest unchanged): when
the second is far above the first, what the clone misses is the subject's colours, not its shapes.
Works on any diffusers SD-style pipeline directory; the renders and the evaluator are the sandbox's.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sandbox", help="a shipped sandbox model's name or a pipeline directory")
    parser.add_argument("--images", type=int, default=32, help="generations (and renders) per class")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--personalized", nargs="*", default=[], help="DIR:CLASS:K, a DreamBooth of held-out identity K")
    args = parser.parse_args()

    import numpy as np
    import torch

    from noclone.data.images import images_to_tensor, tensor_to_images
    from noclone.eval.metrics import identity_match_rate
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_path
    from noclone.sandbox.evaluator import load_default_evaluator
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out
    from noclone.training.diffusion import encode_images

    def encode(pipe, images) -> torch.Tensor:
        """Scaled latent means, as the UNet sees them."""
        return encode_images(pipe.vae, images_to_tensor(images, size), batch_size=64)[0]

    def generate(pipe, prompt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, their starting noise) for `n` generations of `prompt`."""
        c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
        noise = torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            out = pipe([prompt] * n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       latents=noise.clone().to(pipe.unet.dtype), output_type="latent").images.float()
        return out, noise

    def decode(pipe, latents: torch.Tensor) -> list:
        with torch.no_grad():
            return tensor_to_images(pipe.vae.decode((latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)).sample)

    torch.manual_seed(args.seed)
    pipe = load_pipeline(str(model_path(args.model)), dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    classes = ("person", "dog", "cat")
    real, gen, corr = {}, {}, []
    for c in classes:
        renders = [render(c, held_out(1000 + k), 0, size=size) for k in range(args.images)]
        real[c] = encode(pipe, renders).mean((2, 3))
        latents, noise = generate(pipe, f"a photo of a {c}", args.images)
        gen[c] = latents.mean((2, 3))
        corr.append((gen[c].flatten(), noise.mean((2, 3)).flatten()))
    print(f"model {args.model}, guidance {args.guidance}, {args.images} images per class")
    for c in classes:
        err = float((gen[c].mean(0) - real[c].mean(0)).norm())
        print(f"  {c:6s} dc_error {err:.3f}  (rendered DC spread per image {float(real[c].std(0).norm()):.3f})")
    pairs = [(a, b) for i, a in enumerate(classes) for b in classes[i + 1:]]
    spread = [float((gen[a].mean(0) - gen[b].mean(0)).norm() / (real[a].mean(0) - real[b].mean(0)).norm())
              for a, b in pairs]
    g, n = torch.cat([x for x, _ in corr]), torch.cat([y for _, y in corr])
    print(f"  class_spread {np.mean(spread):.2f} (per pair: " + ", ".join(f"{a}-{b} {s:.2f}" for (a, b), s in
                                                                        zip(pairs, spread)) + ")")
    print(f"  noise_corr {float(torch.corrcoef(torch.stack([g, n]))[0, 1]):.2f}")

    if args.personalized:
        evaluator = load_default_evaluator()
    for spec in args.personalized:
        folder, c, k = spec.rsplit(":", 2)
        attacked = load_pipeline(folder, dtype="fp32")
        attacked.set_progress_bar_config(disable=True)
        identity = held_out(int(k))
        photos = [render(c, identity, i, size=size) for i in range(5)]
        references = evaluator.embed_images([render(c, identity, i, size=size) for i in range(100, 108)])
        latents, _ = generate(attacked, f"a photo of sks {c}", args.images)
        photo_dc = encode(attacked, photos).mean((0, 2, 3), keepdim=True)
        swapped = latents - latents.mean((2, 3), keepdim=True) + photo_dc
        rates = [identity_match_rate(evaluator.embed_images(decode(attacked, z)), references, evaluator.threshold)
                 for z in (latents, swapped)]
        print(f"  {c}-{k} match as generated {rates[0]:.2f}, with the photos' DC {rates[1]:.2f}; "
              f"DC error {float((latents.mean((0, 2, 3)) - photo_dc.flatten()).norm()):.3f}")


if __name__ == "__main__":
    main()
