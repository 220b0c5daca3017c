"""`noclone protect-images` (cloak a folder of photos) and `noclone rid train` (train a RID generator).

    noclone protect-images --method rid|aspl|fsmg|advdm|photoguard [--model M] [--budget 8/255] [--steps N]
                           [--seed S] [--generator DIR] [--preset sandbox|paper|paper-sd21|official|official-sd21]
                           [--clean-images DIR] [--max-grad-norm none|F] --images DIR --out DIR [--overwrite]
    noclone protect-images --method rid|aspl --preset NAME --show
    noclone rid train --models M1[,M2,...] [--images DIR ... | --sandbox-identities N] --out DIR [--steps N]
                      [--preset NAME] [--arch conv|dit|dit-paper] [--budget 8/255] [--regression-subjects N]
                      [--weight-decay W] [--warmup-steps N] [--max-grad-norm none|F]
    noclone rid train --preset NAME --show

`--show` prints the preset's settings table (setting, value, the default preset's value, * where different) and
exits without needing the other arguments.

Budgets and step sizes are L_inf values in [0, 1] pixel units, written as a fraction (8/255) or a number (0.03).
Wire into the main parser with `add_protect_images_parser(sub)` and `add_rid_parser(sub)`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from noclone.errors import NocloneError

log = logging.getLogger("noclone")

METHODS = ("rid", "aspl", "fsmg", "advdm", "photoguard")


def _require(args: argparse.Namespace, *flags: str) -> None:
    """The flags argparse no longer requires (so that --show needs none): exit 2 as argparse would."""
    missing = [flag for flag in flags if getattr(args, flag[2:].replace("-", "_"), None) in (None, [])]
    if not missing:
        return
    if getattr(args, "parser", None) is not None:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")
    raise NocloneError(f"the following arguments are required: {', '.join(missing)}")


def show_cloak_preset(method: str, preset: str) -> str:
    """The --show table of a protect-images preset (rid: the generator's training recipe)."""
    from noclone.cloak.registry import cloak_methods

    if method == "rid":
        from noclone.cloak.rid import RIDRecipe

        if preset not in RIDRecipe.PRESETS:
            raise NocloneError(f"unknown RID preset {preset!r}; choose from {', '.join(RIDRecipe.PRESETS)}")
        return RIDRecipe.show(preset) + ("\nnote: protect-images runs a trained generator once per photo; the "
                                         "preset is how that generator is trained (noclone rid train --preset)")
    return cloak_methods()[method].show(preset)


def cmd_protect_images(args: argparse.Namespace) -> Path | None:
    from noclone.attacks.base import load_subject_images
    from noclone.cli_args import load_model
    from noclone.cloak.base import check_output_dir, parse_budget, parse_step_size
    from noclone.cloak.registry import protect_folder
    from noclone.presets import parse_max_grad_norm

    if args.method is None:  # not argparse's required=True: its error is two lines, ours one, like every bad input
        raise NocloneError(f"--method is required: choose one of {', '.join(METHODS)}")
    if args.method not in METHODS:
        raise NocloneError(f"unknown --method {args.method!r}; choose from {', '.join(METHODS)}")
    if getattr(args, "show", False):
        print(show_cloak_preset(args.method, args.preset))
        return None
    _require(args, "--images", "--out")
    if args.clean_images is not None and args.method != "aspl":
        raise NocloneError("--clean-images only applies to --method aspl")
    budget = parse_budget(args.budget) if args.budget is not None else None
    step_size = parse_step_size(args.step_size)
    if args.steps is not None and args.steps < 1:
        raise NocloneError(f"--steps {args.steps} must be at least 1")
    if args.method != "rid" and args.model is None:
        raise NocloneError(f"--method {args.method} needs --model (a diffusers directory, a .safetensors file, or sandbox)")
    if args.method != "rid" and args.generator is not None:
        raise NocloneError("--generator only applies to --method rid")
    check_output_dir(args.images, args.out, args.overwrite)
    load_subject_images(args.images, min_count=1)  # bad photos fail before any model loads
    settings = dict(budget=budget, seed=args.seed, class_noun=args.class_noun, token=args.token,
                    progress=not getattr(args, "quiet", False))
    if args.method == "rid":
        if args.model is not None:
            log.info("--model is not used by rid (the generator was trained against its own models)")
        model = None
        settings.update(generator=args.generator, steps=args.steps, step_size=step_size, preset=args.preset)
    else:
        from noclone.cloak.registry import cloak_methods

        settings.update(preset=args.preset, steps=args.steps, step_size=step_size)
        if args.max_grad_norm is not None:
            settings["max_grad_norm"] = parse_max_grad_norm(args.max_grad_norm)
        if args.train_text_encoder is not None:
            settings["train_text_encoder"] = args.train_text_encoder
        if args.clean_images is not None:
            load_subject_images(args.clean_images)  # bad photos fail before any model loads
            settings["clean_images"] = args.clean_images
        checked = {k: v for k, v in settings.items() if k not in ("clean_images",)}
        config = cloak_methods()[args.method].preset_config(**checked)  # settings fail before the model loads
        wanted = getattr(config, "dtype", "auto")
        if wanted != "auto" and args.dtype == "auto":
            args.dtype = wanted
        elif wanted != "auto" and args.dtype != wanted:
            log.warning("preset %s runs in %s; --dtype %s given instead", args.preset, wanted, args.dtype)
        if hasattr(config, "dtype") and args.dtype != "auto":
            settings["dtype"] = args.dtype
        if getattr(config, "clean_set", False) and args.clean_images is None:
            raise NocloneError(f"--preset {args.preset} fine-tunes the surrogate on a separate clean set of the "
                               "subject (the official script's set A): give --clean-images DIR")
        model = load_model(args)
    out = protect_folder(args.method, args.images, args.out, model, overwrite=args.overwrite, **settings)
    log.info("protected photos written to %s (manifest: %s/cloak.json)", out, out)
    return out


def add_protect_images_parser(subparsers) -> argparse.ArgumentParser:
    """Register `protect-images` on the main parser's subparsers."""
    from noclone.cli_args import add_model_args as _add_model_args

    p = subparsers.add_parser("protect-images", help="cloak a subject's photos before posting (RID, ASPL, FSMG, AdvDM, PhotoGuard)")
    _add_model_args(p)
    p.set_defaults(model=None)  # required by the optimization methods, unused by rid
    _set_help(p, "model", "diffusers directory, .safetensors file, or 'sandbox' (required by every method but rid)")
    p.add_argument("--method", default=None, help=f"one of {', '.join(METHODS)} (required)")
    p.add_argument("--images", help="folder of the subject's photos (never modified; required)")
    p.add_argument("--out", help="output folder: protected PNGs + cloak.json (required)")
    p.add_argument("--budget", help="L_inf budget in [0, 1] pixels, e.g. 8/255 or 0.03 (default: the preset's)")
    p.add_argument("--step-size", help="PGD step in [0, 1] pixels, e.g. 1/255 (default: the preset's)")
    p.add_argument("--steps", type=int, help="PGD steps (aspl: outer rounds) (default: the preset's)")
    p.add_argument("--preset", default="sandbox",
                   help="sandbox (64 px, seconds per photo, default), paper (SD1.5 at 512 px), official (rid, aspl: "
                        "the released code's quirks), paper-sd21, official-sd21")
    p.add_argument("--show", action="store_true", help="print the preset's settings table and exit")
    p.add_argument("--clean-images",
                   help="aspl: a folder of other clean photos of the same subject (set A): the surrogate fine-tunes "
                        "on them while PGD perturbs --images, as the official script (default: --images)")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="aspl: the surrogate also fine-tunes the text encoder (default: the preset's; official: on)")
    p.add_argument("--max-grad-norm", metavar="none|FLOAT",
                   help="aspl, fsmg: gradient clipping of the surrogate's DreamBooth steps (default 1.0; none: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", help="rid: a generator directory (default: the shipped sandbox generator)")
    p.add_argument("--class-noun", default="person", help="the attacker's class noun in the instance prompt")
    p.add_argument("--token", default="sks", help="the attacker's identifier token in the instance prompt")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_protect_images, parser=p)
    return p


def cmd_rid_train(args: argparse.Namespace) -> Path | None:
    from noclone.cli_args import load_model, refuse_existing as _refuse_existing
    from noclone.cloak.base import parse_budget
    from noclone.cloak.rid import RIDRecipe, train_rid_generator
    from noclone.cloak.rid_nets import ARCHS
    from noclone.presets import parse_max_grad_norm

    if args.preset not in RIDRecipe.PRESETS:
        raise NocloneError(f"unknown RID preset {args.preset!r}; choose from {', '.join(RIDRecipe.PRESETS)}")
    if getattr(args, "show", False):
        print(RIDRecipe.show(args.preset))
        return None
    _require(args, "--out")
    if args.arch is not None and args.arch not in ARCHS:
        raise NocloneError(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    budget = parse_budget(args.budget) if args.budget is not None else None
    names = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if not names:
        raise NocloneError("--models needs at least one model (sandbox, a diffusers directory or a .safetensors file)")
    if not args.images and not args.sandbox_identities:
        raise NocloneError("no training images: give --images DIR or --sandbox-identities N")
    if args.sandbox_identities is not None and args.sandbox_identities < 0:
        raise NocloneError("--sandbox-identities must be >= 0")
    overrides = {k: v for k, v in dict(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint_every=args.checkpoint_every,
        max_seconds=None if args.max_minutes is None else args.max_minutes * 60, arch=args.arch, budget=budget,
        resolution=args.resolution, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        progress=not getattr(args, "quiet", False)).items() if v is not None}
    if args.max_grad_norm is not None:
        overrides["max_grad_norm"] = parse_max_grad_norm(args.max_grad_norm)
    if args.dtype != "auto":
        overrides["dtype"] = args.dtype
    recipe = RIDRecipe.preset(args.preset, **overrides)
    recipe.validate()
    if recipe.dtype != "auto":
        args.dtype = recipe.dtype  # the frozen models load in the preset's dtype (official: fp32)
    train = recipe.train_config()
    _refuse_existing(args.out, args.overwrite)
    if args.images:
        from noclone.data.images import load_image_folder

        for folder in args.images:
            load_image_folder(folder, min_count=1)
    pipes = []
    for name in names:
        args.model = name
        pipes.append(load_model(args))
    out = train_rid_generator(args.out, pipes, folders=args.images or (), sandbox_identities=args.sandbox_identities or 0,
                              photos_per_identity=args.photos_per_identity, arch=recipe.arch, budget=recipe.budget,
                              resolution=recipe.resolution, train=train, regression_subjects=args.regression_subjects,
                              overwrite=args.overwrite, recipe=recipe)
    log.info("RID generator written to %s", out)
    return out


def add_rid_parser(subparsers) -> argparse.ArgumentParser:
    """Register `rid train` on the main parser's subparsers."""
    from noclone.cli_args import add_model_args as _add_model_args

    rid = subparsers.add_parser("rid", help="RID: train a real-time protective-perturbation generator")
    sub = rid.add_subparsers(dest="rid_command", required=True)
    p = sub.add_parser("train", help="train a RID generator against one or more frozen diffusion models")
    _add_model_args(p)  # --device/--dtype/--allow-pickle/--config apply to every model
    _set_help(p, "model", argparse.SUPPRESS)  # --models instead
    p.add_argument("--models", default="sandbox", help="comma-separated: sandbox, diffusers directories, .safetensors files")
    p.add_argument("--images", action="append", help="folder of training photos (repeatable)")
    p.add_argument("--sandbox-identities", type=int, help="train on renders of N sandbox identities (evaluator range)")
    p.add_argument("--photos-per-identity", type=int, default=4)
    p.add_argument("--out", help="output folder: config.json + fp16 generator.safetensors (required)")
    p.add_argument("--preset", default="sandbox",
                   help="sandbox (default), paper (the paper's DiT at 512 px), official (the released code: weight "
                        "decay, warm-up, no clipping, fp32), paper-sd21, official-sd21 (768 px)")
    p.add_argument("--show", action="store_true", help="print the preset's settings table and exit")
    p.add_argument("--arch", help="conv (light residual U-Net, sandbox default), dit (a small DiT) or dit-paper "
                                  "(the paper's DiT: patch 16, hidden 1152, depth 14, 8 heads)")
    p.add_argument("--budget", help="L_inf budget in [0, 1] pixels (eta = 2 * budget in [-1, 1] space; "
                                    "default: the preset's, sandbox 8/255)")
    p.add_argument("--resolution", type=int, help="training/working resolution (default: the preset's, sandbox: "
                                                  "the first model's)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the preset's)")
    p.add_argument("--warmup-steps", type=int, help="linear lr warm-up steps (default: the preset's)")
    p.add_argument("--max-grad-norm", metavar="none|FLOAT", help="gradient clipping (default 1.0; official: none)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--regression-subjects", type=int, default=0,
                   help="add the regression loss toward ASPL perturbations of this many identities (slow)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (keeps the weights reached)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_rid_train, parser=p)
    return rid


def _set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.help = text
