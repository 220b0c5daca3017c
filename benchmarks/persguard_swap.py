"""Where does the attacker's DreamBooth erase a PersGuard backdoor: in the UNet or in the text encoder?

    .venv/bin/python benchmarks/persguard_swap.py --protected DIR --attacked DIR [--kind pattern]
        [--prompt "a photo of sks person"] [--n 32] [--seed 0] [--base sandbox]

`--protected` is a PersGuard-protected pipeline, `--attacked` the attacker's DreamBooth of it (UNet and text encoder
fine-tuned; benchmarks/persguard_acceptance.py caches both). Generates `--n` images of the trigger prompt (same
seeds) with the four combinations of {protected, attacked} UNet x {protected, attacked} text encoder and prints the
backdoor rate of each: if the mark survives with the attacked text encoder and the protected UNet, the UNet's
fine-tuning is what erases it. With `--base`, it first prints how far each step moved the UNet's weights (relative
L2 norm of the difference, and the largest absolute change): the protection from the base, the attack from the
protected model.
"""

from __future__ import annotations

import argparse


def unet_displacement(before, after) -> tuple[float, float]:
    """Relative L2 norm of the UNet weight change (over all parameters) and its largest absolute entry."""
    after_params = dict(after.named_parameters())
    diff_sq = norm_sq = 0.0
    largest = 0.0
    for name, weight in before.named_parameters():
        delta = after_params[name].detach().float() - weight.detach().float()
        diff_sq += float(delta.pow(2).sum())
        norm_sq += float(weight.detach().float().pow(2).sum())
        largest = max(largest, float(delta.abs().max()))
    return (diff_sq / norm_sq) ** 0.5, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protected", required=True)
    parser.add_argument("--attacked", required=True)
    parser.add_argument("--kind", default="pattern", choices=("pattern", "erasure"))
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--prompt", default=None, help="default: 'a photo of sks <class-noun>'")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", help="the unprotected model (a path or 'sandbox'): also print the weight displacements")
    args = parser.parse_args()

    from noclone.defenses.backdoor_checks import backdoor_rate
    from noclone.generation import GenerationConfig, sample
    from noclone.models.pipeline import load_pipeline

    prompt = args.prompt or f"a photo of sks {args.class_noun}"
    protected, attacked = load_pipeline(args.protected), load_pipeline(args.attacked)
    if args.base:
        from noclone.sandbox.assets import model_dir

        base = load_pipeline(model_dir() if args.base == "sandbox" else args.base)
        for step, before, after in (("protection", base, protected), ("attack", protected, attacked)):
            relative, largest = unet_displacement(before.unet, after.unet)
            print(f"UNet moved by the {step}: relative L2 {relative:.3f}, largest absolute change {largest:.4f}")
    seeds = list(range(args.seed, args.seed + args.n))
    print(f"backdoor ({args.kind}) rate of {args.n} images of {prompt!r}:")
    for unet_name, unet in (("protected", protected.unet), ("attacked", attacked.unet)):
        for text_name, text in (("protected", protected.text_encoder), ("attacked", attacked.text_encoder)):
            pipe = load_pipeline(args.protected)
            pipe.unet, pipe.text_encoder = unet, text
            images = sample(pipe, prompt, seeds, GenerationConfig(n=args.n, seed=args.seed))
            rate = backdoor_rate(args.kind, images, class_noun=args.class_noun)
            print(f"  {unet_name} UNet + {text_name} text encoder: {rate:.2f}", flush=True)


if __name__ == "__main__":
    main()
