"""How much does a UNet condition on text, and does an attack move its unconditional branch with the conditional one?

    .venv/bin/python benchmarks/guidance_gap.py [--model sandbox|DIR] [--attacked DIR] [--images DIR | --identity K]
        [--class-noun person] [--token sks] [--timesteps 100,300,500,700,900] [--seed 0]

On the subject's photos (a folder, or the sandbox's held-out identity K, the attacker's training photos), noised at each
timestep with fixed noise, prints for the model:
  - err: the noise-prediction error ||eps(z_t, c) - eps|| relative to ||eps||, for c = "" (the unconditional branch);
  - gap: ||eps(z_t, c) - eps(z_t, "")|| / ||eps||, how far the prompt moves the prediction from the unconditional one,
    for the instance prompt ("a photo of <token> <class>") and the class prompt ("a photo of a <class>").
With `--attacked` (the same model after a DreamBooth that trained the instance prompt), each model under its own
text encoder, also:
  - d_cond, d_uncond: how far the attack moved the instance-prompt and the unconditional predictions (/ ||eps||);
  - cos: the cosine between those two moves. Near 1 with d_uncond ~ d_cond means the unconditional branch follows
    the attack, so nothing can hide in the classifier-free-guidance difference (measured for the sandbox in
    docs/research/persguard.md, "Can a backdoor hide in the guidance difference?").
Works on any diffusers SD-style pipeline directory (SD1.5 at 512 px included; slow on CPU).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sandbox", help="pipeline directory, or a shipped sandbox model's name ('sandbox', 'sandbox-v2-64', ...)")
    parser.add_argument("--attacked", help="the model after the attacker's fine-tuning (pipeline directory)")
    parser.add_argument("--images", help="folder of the subject's photos (default: sandbox renders of --identity)")
    parser.add_argument("--identity", type=int, default=0, help="sandbox held-out identity (without --images)")
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--timesteps", default="100,300,500,700,900")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from noclone.errors import NocloneError
    from noclone.models.pipeline import load_pipeline
    from noclone.training.data import LatentSet, pipeline_resolution
    from noclone.training.diffusion import encode_prompts, predicted_noise, step_generator, training_scheduler

    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        raise SystemExit(f"error: --timesteps {args.timesteps!r}: give integers separated by commas") from None
    torch.set_grad_enabled(False)
    try:
        from noclone.sandbox.assets import model_path

        model = load_pipeline(model_path(args.model))
        attacked = load_pipeline(args.attacked) if args.attacked else None
        if args.images:
            from noclone.attacks.base import load_subject_images

            _, photos = load_subject_images(args.images, min_count=1)
        else:
            from noclone.sandbox.experiment import TRAIN_PHOTOS
            from noclone.sandbox.render import render
            from noclone.sandbox.splits import held_out

            photos = [render(args.class_noun, held_out(args.identity), p) for p in TRAIN_PHOTOS]
    except NocloneError as e:
        raise SystemExit(f"error: {e}") from None
    latents = LatentSet.from_images(model.vae, photos, "", pipeline_resolution(model)).mean
    scheduler = training_scheduler(model)
    instance, klass = f"a photo of {args.token} {args.class_noun}", f"a photo of a {args.class_noun}"

    def predict(pipe, noisy, t, prompt):
        cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt] * len(noisy))
        return predicted_noise(scheduler, pipe.unet(noisy, t, cond).sample.float(), noisy, t)  # v converted to eps

    print(f"{len(photos)} photos; instance prompt {instance!r}; all norms relative to ||eps||")
    header = "t     err('')  gap(instance)  gap(class)"
    print(header + ("  d_cond  d_uncond  cos" if attacked else ""))
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=step_generator(args.seed, t, "guidance-gap"))
        ts = torch.full((len(latents),), t)
        noisy = scheduler.add_noise(latents, noise, ts)
        size = float(noise.norm())
        uncond = predict(model, noisy, ts, "")
        cond = predict(model, noisy, ts, instance)
        line = (f"{t:<5} {float((uncond - noise).norm()) / size:7.3f}  {float((cond - uncond).norm()) / size:13.3f}"
                f"  {float((predict(model, noisy, ts, klass) - uncond).norm()) / size:10.3f}")
        if attacked is not None:
            moved_cond = predict(attacked, noisy, ts, instance) - cond
            moved_uncond = predict(attacked, noisy, ts, "") - uncond
            cos = torch.nn.functional.cosine_similarity(moved_cond.flatten(), moved_uncond.flatten(), dim=0)
            line += f"  {float(moved_cond.norm()) / size:6.3f}  {float(moved_uncond.norm()) / size:8.3f}  {float(cos):4.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
