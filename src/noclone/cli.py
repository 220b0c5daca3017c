"""The `noclone` command line: every subcommand maps onto one function of the importable API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from noclone.cli_args import add_model_args as _add_model_args
from noclone.cli_args import load_model
from noclone.cli_args import model_arg as _model_arg
from noclone.cli_args import refuse_existing as _refuse_existing
from noclone.errors import NocloneError

log = logging.getLogger("noclone")


def cmd_personalize(args: argparse.Namespace) -> None:
    from noclone.attacks import METHODS
    from noclone.attacks.base import load_subject_images, preset_config

    config = preset_config(
        args.method, args.preset, class_noun=args.class_noun, token=args.token, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, prior_preservation=False if args.no_prior else None,
        prior_weight=args.prior_weight, num_class_images=args.num_class_images,
        train_text_encoder=args.train_text_encoder or None, lora_rank=args.rank, lora_targets=args.lora_targets,
        checkpoint_every=args.checkpoint_every, progress=not args.quiet, template=args.template,
    )
    attack = METHODS[args.method](config)
    _refuse_existing(args.out, args.overwrite)
    load_subject_images(args.images)  # fail on bad photos before the model loads
    pipe = load_model(args, gradient_checkpointing=args.gradient_checkpointing)
    out = attack.run(pipe, args.images, args.out, overwrite=args.overwrite)
    log.info("personalized model written to %s", out)


def cmd_generate(args: argparse.Namespace) -> None:
    from noclone.generation import GenerationConfig, generate_to_dir
    from noclone.models.pipeline import load_lora

    _refuse_existing(args.out, args.overwrite)
    config = GenerationConfig(n=args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              scheduler=args.scheduler, batch_size=args.batch_size, negative_prompt=args.negative_prompt)
    pipe = load_model(args)
    if args.lora:
        load_lora(pipe, args.lora, allow_pickle=args.allow_pickle)
    generate_to_dir(pipe, args.prompt, args.out, config, overwrite=args.overwrite,
                    extra_manifest={"model": str(args.model), "lora": args.lora}, progress=not args.quiet)
    log.info("%d images written to %s", config.n * len(args.prompt), args.out)


def cmd_sandbox_render(args: argparse.Namespace) -> None:
    from noclone.data.atomic import atomic_output_dir
    from noclone.data.images import save_image
    from noclone.sandbox import render

    if not 1 <= args.n <= 10_000:
        raise NocloneError(f"--n {args.n} must be between 1 and 10000")
    _refuse_existing(args.out, args.overwrite)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        for photo in range(args.first_photo, args.first_photo + args.n):
            image = render.render(args.class_noun, args.identity, photo, size=args.size)
            save_image(image, tmp / f"{args.class_noun}_{args.identity}_{photo:04d}.png")
    log.info("%d renders written to %s", args.n, args.out)


def cmd_sandbox_model(args: argparse.Namespace) -> None:
    import shutil

    from noclone.data.atomic import atomic_output_dir
    from noclone.sandbox.assets import model_dir

    _refuse_existing(args.out, args.overwrite)
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        shutil.copytree(model_dir(), tmp, dirs_exist_ok=True)
    log.info("sandbox model written to %s (load with StableDiffusionPipeline.from_pretrained)", args.out)


def cmd_sandbox_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from noclone.sandbox.train import SandboxTrainConfig, train_sandbox_model

    device = args.device or "cpu"
    config = SandboxTrainConfig.preset(args.preset, seed=args.seed, device=device, render_workers=args.render_workers,
                                       minutes=args.minutes, mixed_precision="bf16" if device.startswith("cuda") else "no")
    if args.quick:
        config = replace(config, identities_per_class=50, photos_per_identity=2, vae_steps=20, unet_steps=20,
                         vae_batch=8, unet_batch=8, identifier_bound=min(config.identifier_bound, 20))
    for name in ("identities_per_class", "vae_steps", "unet_steps", "identifier_steps", "identifier_pool",
                 "identifier_binding", "identifier_prob"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if not 0 < config.identifier_prob <= 1:
        raise NocloneError(f"--identifier-prob {config.identifier_prob} must be in (0, 1]")
    if args.init_from and not config.identifier_steps and config.caption_style != "v2":
        raise NocloneError("--init-from skips stage 1, so it needs --identifier-steps N (N > 0) or --preset v2 "
                           "(which continues the denoiser from it)")
    if args.minutes is not None and args.minutes <= 0:
        raise NocloneError(f"--minutes {args.minutes} must be positive")
    init_from = args.init_from
    if init_from:
        from noclone.sandbox.assets import model_path

        init_from = model_path(init_from)  # a shipped model's name or a path
    _refuse_existing(args.out, args.overwrite)
    train_sandbox_model(args.out, config, init_from=init_from)


def cmd_sandbox_train_evaluator(args: argparse.Namespace) -> None:
    from noclone.sandbox.evaluator import train_evaluator

    _refuse_existing(args.out, args.overwrite)
    train_evaluator(args.out, seed=args.seed)


def cmd_sandbox_validate(args: argparse.Namespace) -> None:
    import json

    from noclone.sandbox.evaluator import load_default_evaluator, validate

    report = validate(load_default_evaluator(), n_identities=args.identities, seed=args.seed)
    print(json.dumps(report, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from noclone.eval.evaluate import evaluate_folders, print_table

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate_folders(args.generated, args.reference, metrics=metrics, backend=args.backend,
                              class_noun=args.class_noun, json_out=args.json, dino_model=args.dino_model,
                              clip_model=args.clip_model, inception=args.inception, allow_pickle=args.allow_pickle,
                              arcface_models=args.arcface_models, identity_threshold=args.identity_threshold)
    print_table(result)


def cmd_demo(args: argparse.Namespace) -> None:
    from noclone.demo import DemoConfig, run_demo

    out = run_demo(DemoConfig(out=Path(args.out), class_noun=args.class_noun, identity=args.identity,
                              other_identity=args.other_identity, seed=args.seed, steps=args.steps,
                              n_generated=args.n, overwrite=args.overwrite, progress=not args.quiet,
                              protect=not args.no_protect, protect_steps=args.protect_steps, workers=args.workers))
    print(f"demo report: {out / 'report.html'}")


DESCRIPTION = ("noclone: protect people's photos and models from being personalized (cloned) by diffusion\n"
               "models, and audit how well a protection holds.")

EPILOG = """\
start here:
  noclone demo              see it all work on the built-in sandbox (about 5 minutes on 2 cores, no downloads)
  noclone protect-images    cloak a person's photos before they are posted
  noclone protect-model     change a model so that it will not learn a person's likeness
  noclone audit             test how well a protection holds against many attacks

Run `noclone COMMAND --help` for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    from noclone import __version__

    # the module docstring is for developers; --help opens with what a user can do, and keeps the epilog's layout
    parser = argparse.ArgumentParser(prog="noclone", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"noclone {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole story on the embedded sandbox: personalize a subject, measure, report")
    p.add_argument("--out", default="noclone-demo")
    p.add_argument("--class-noun", default="person", choices=("person", "dog", "cat"))
    p.add_argument("--identity", type=int, default=0, help="index of the held-out sandbox identity")
    p.add_argument("--other-identity", type=int, default=None,
                   help="held-out index of the collateral subject (default 4, or 5 when --identity is 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="attack training steps (default: the preset's, 300)")
    p.add_argument("--n", type=int, default=16, help="images generated per model (default 16)")
    p.add_argument("--no-protect", action="store_true", help="skip the protected half (APDM) of the story")
    p.add_argument("--protect-steps", type=int,
                   help="APDM outer steps (default 40: the quick preset's 100, shortened to fit the demo)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes computing independent stages side by side (default 3, sharing the "
                        "cores; 1 on one core or a GPU)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("personalize", help="fine-tune a model on a subject's photos (DreamBooth, LoRA, textual inversion)")
    _add_model_args(p)
    p.add_argument("--images", required=True, help="folder of the subject's photos")
    p.add_argument("--class-noun", required=True)
    p.add_argument("--method", required=True, choices=("dreambooth", "lora", "ti"))
    p.add_argument("--token", default="sks")
    p.add_argument("--template", help="instance prompt template, default 'a photo of {token} {class_noun}'")
    p.add_argument("--preset", default="sandbox", choices=("sandbox", "sd15"),
                   help="default settings: sandbox (64 px embedded model) or sd15 (the papers' 512 px protocol)")
    p.add_argument("--steps", type=int, help="training steps (preset default)")
    p.add_argument("--lr", type=float, help="learning rate (preset default)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prior", action="store_true", help="disable prior preservation")
    p.add_argument("--prior-weight", type=float)
    p.add_argument("--num-class-images", type=int)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--lora-targets", help="UNet layers a LoRA adapts: attention (default) or all (+ convs, feed-forward)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_personalize)

    p = sub.add_parser("generate", help="generate images for prompts with fixed seeds, plus manifest.json")
    _add_model_args(p)
    p.add_argument("--lora", help="LoRA weights (directory or .safetensors) to load")
    p.add_argument("--prompt", action="append", required=True, help="may be repeated")
    p.add_argument("--negative-prompt")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", help="ddim, dpm++, euler, euler-a, pndm, ddpm, lms, unipc (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="identity and quality metrics of generated images against references")
    p.add_argument("--generated", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--metrics", default="ism,fdfr", help="comma-separated: ism,fdfr,brisque,dino,clip_i,fid,kid")
    p.add_argument("--backend", default="sandbox", choices=("sandbox", "dlib", "arcface"))
    p.add_argument("--class-noun", default="person", help="subject class (sandbox backend detector)")
    p.add_argument("--dino-model", help="local HF directory of a DINO ViT (facebook/dino-vits16 layout)")
    p.add_argument("--clip-model", help="local HF directory of a CLIP model (for clip_i)")
    p.add_argument("--inception", help="Inception-v3 weights for fid/kid: .safetensors, or .pth with --allow-pickle")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading a pickle .pth Inception file")
    p.add_argument("--arcface-models", help="insightface model folder (SCRFD detector + ArcFace recogniser .onnx)")
    p.add_argument("--identity-threshold", type=float, help="override the backend's cosine match threshold")
    p.add_argument("--json")
    p.set_defaults(func=cmd_evaluate)

    from noclone.defenses.cli_protect import add_protect_model_parser

    add_protect_model_parser(sub)
    from noclone.cloak.cli import add_protect_images_parser, add_rid_parser

    add_protect_images_parser(sub)
    add_rid_parser(sub)
    from noclone.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from noclone.audit.cli import add_audit_parser

    add_audit_parser(sub)
    from noclone.serve.cli import add_serve_parser

    add_serve_parser(sub)

    sandbox = sub.add_parser("sandbox", help="the embedded world: renders, model, evaluator").add_subparsers(dest="sandbox_command", required=True)
    p = sandbox.add_parser("render", help="render photos of one sandbox identity")
    p.add_argument("--class-noun", required=True, choices=("person", "dog", "cat"))
    p.add_argument("--identity", type=int, required=True)
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--first-photo", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sandbox_render)
    p = sandbox.add_parser("model", help="write the embedded sandbox model as a standalone diffusers directory")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sandbox_model)
    p = sandbox.add_parser("train", help="reproduce the sandbox model from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="v1", choices=("v1", "v2", "v2-64", "v2-64-zsnr"),
                   help="v1: the shipped model's recipe; v2: the 128 px SD-shaped world (GPU-sized); v2-64: v2's "
                        "captions, identifiers and denoiser at 64 px (2 CPU cores, ~100 min); v2-64-zsnr: v2-64 with "
                        "v-prediction at zero terminal SNR; see docs/fidelity.md")
    p.add_argument("--device", help="cpu (default) or cuda; on cuda the forward passes run in bf16 autocast")
    p.add_argument("--minutes", type=float, help="time budget: stop, write the model so far, rerun to resume")
    p.add_argument("--render-workers", type=int, default=1, help="processes rendering the training set")
    p.add_argument("--quick", action="store_true", help="a tiny smoke-test run (minutes), not a usable model")
    p.add_argument("--identities-per-class", type=int)
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--unet-steps", type=int)
    p.add_argument("--identifier-steps", type=int, help="steps of the identifier-caption stage (0 = none)")
    p.add_argument("--identifier-pool", type=int, help="number of identifier tokens (default 1000)")
    p.add_argument("--identifier-binding", choices=("modulo", "one-to-one"),
                   help="modulo: each token names every identity sharing its index modulo the pool (default); "
                        "one-to-one: token k names the k-th identity only, which is oversampled")
    p.add_argument("--identifier-prob", type=float,
                   help="share of the identifier stage's captions that name an identifier (default 0.3)")
    p.add_argument("--init-from", type=_model_arg, help="skip stage 1: start from this sandbox model (a path or a shipped "
                   "name such as 'sandbox-v2-64'): the identifier stage, or a v2 preset's denoiser continued")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sandbox_train)
    p = sandbox.add_parser("train-evaluator", help="reproduce the sandbox identity evaluator")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sandbox_train_evaluator)
    p = sandbox.add_parser("validate", help="measure the shipped evaluator's validity on held-out identities")
    p.add_argument("--identities", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_sandbox_validate)
    from noclone.fidelity.cli import add_fidelity_parser

    add_fidelity_parser(sandbox)
    return parser


def main(argv: list[str] | None = None) -> int:
    from noclone.quiet import quiet_third_party

    args = build_parser().parse_args(argv)  # before the Hugging Face imports, so that --help stays instant
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    from noclone.training.distributed import init_if_launched

    init_if_launched()  # under `accelerate launch` each process takes its own GPU before any model is placed
    try:
        args.func(args)
    except NocloneError as exc:
        print(f"noclone: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noclone: interrupted (rerun the same command to resume where supported)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
