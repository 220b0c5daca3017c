"""`noclone protect-model`: change a model's weights so that personalizing it on the given subjects fails.

    noclone protect-model --recipe apdm-sandbox --images DIR --class-noun person --out DIR
    noclone protect-model --config my-recipe.yaml --images DIR --class-noun person [--steps 50] --out DIR
    noclone protect-model --list-recipes | --recipe NAME --show | --help | --help-all
    noclone protect-model --method apdm --model M --images DIR --class-noun person [--images DIR2 --class-noun dog]
                          [--token sks] [--preset quick|paper] [--steps N] [--inner-steps N] ... --out DIR
    noclone protect-model --method apdm --implant decoder [--negative-images DIR ...] [--decoder-blur F]
                          [--decoder-blur-calibrate [sandbox|dlib]] [--decoder-class-samples N]
                          [--decoder-detail-weight W] [--decoder-recolored-copies N] [--decoder-moved-copies N]
                          [--decoder-tries N] ...
    noclone protect-model --method persguard --target pattern|erasure|target [--target-class cat]
                          [--target-images DIR] [--tokens sks,xyz,...] [--implant unet|decoder|both]
                          [--negative-images DIR ...] --model M --images DIR --class-noun person --out DIR

`--images` and `--class-noun` repeat, one pair per subject (in order); `--token` is given once (all subjects) or
once per subject; so are PersGuard's `--target` and `--target-class`, while `--target-images` is given once per
subject ('-' = none for that subject). Flags of one method given with another are refused. Wire into the main
parser with `add_protect_model_parser(sub)`. Methods are the PROTECT_METHODS dict: a new defence adds one entry (a
function taking the parsed arguments).

Settings resolve in three layers: the preset, then the recipe (`--recipe NAME`, shipped, or `--config FILE.yaml`, a
user's own; recipe.py), then the flags given on the command line; the card records the recipe and which flags
changed it. `--config` keeps its older meaning for a directory: the diffusers config of a single-file checkpoint.
`--help` lists the essential flags; `--help-all` every flag, in groups (protection, L2P, repair, guard, PersGuard
backdoor, run).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from noclone.errors import NocloneError
from noclone.sandbox.assets import is_shipped

log = logging.getLogger("noclone")


def _subjects(args: argparse.Namespace):
    """The subjects, checked before any model is loaded."""
    from noclone.defenses.base import ProtectionSubject

    images, nouns = args.images or [], args.class_noun or []
    if len(images) != len(nouns):
        raise NocloneError(f"give one --class-noun per --images folder (got {len(images)} --images, {len(nouns)} --class-noun)")
    tokens = args.token or ["sks"]
    if len(tokens) == 1:
        tokens = tokens * len(images)
    if len(tokens) != len(images):
        raise NocloneError(f"give one --token for all subjects or one per subject (got {len(tokens)} for {len(images)})")
    positives = _per_subject(getattr(args, "positive_images", None), len(images), "--positive-images")
    anchors = _per_subject(getattr(args, "anchor_images", None), len(images), "--anchor-images")
    subjects = [ProtectionSubject.from_folder(folder, noun, token, positive, anchor)
                for folder, noun, token, positive, anchor in zip(images, nouns, tokens, positives, anchors)]
    seen = {}
    for folder, subject in zip(images, subjects):
        if subject.fingerprint in seen:
            raise NocloneError(f"{folder}: the same photos, class and token as {seen[subject.fingerprint]} (given twice)")
        seen[subject.fingerprint] = folder
    return subjects


def _apdm_overrides(args: argparse.Namespace) -> dict:
    """The APDM settings given on the command line, by flat name (APDM_FLAT_KEYS)."""
    overrides = {
        "outer_steps": args.steps, "inner_steps": args.inner_steps, "beta": args.beta, "reduction": args.reduction,
        "loss": args.loss, "naive_lambda": args.naive_lambda, "params": args.params, "lora_rank": args.rank,
        "lr_protect": args.lr_protect, "lr_per": args.lr_per, "text_lr_per": args.text_lr_per,
        "train_text_encoder": args.train_text_encoder, "batch_size": args.batch_size,
        "num_class_images": args.num_class_images, "multi_subject": args.multi_subject,
        "reference_dtype": args.reference_dtype, "optimizer": args.optimizer, "checkpoint_every": args.checkpoint_every,
        "accumulate": args.accumulate, "prior_loss": args.prior_loss, "seed": args.seed,
        "anchor_weight": args.anchor_weight, "dpo_max_timestep": args.dpo_max_timestep,
        "repair_steps": args.repair_steps, "repair_lr": args.repair_lr,
        "repair_min_timestep": args.repair_min_timestep, "repair_max_timestep": args.repair_max_timestep,
        "implant": args.implant, "decoder_steps": args.decoder_steps, "decoder_attack_steps": args.decoder_attack_steps,
        "decoder_blur": args.decoder_blur, "decoder_attack_lengths": _lengths(args.decoder_attack_lengths),
        "decoder_blur_calibrate": args.decoder_blur_calibrate, "decoder_class_samples": args.decoder_class_samples,
        "decoder_detail_weight": args.decoder_detail_weight,
        "decoder_recolored_copies": args.decoder_recolored_copies,
        "decoder_moved_copies": args.decoder_moved_copies, "decoder_tries": args.decoder_tries,
        "prompt_style": args.prompt_style,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_l2p:
        overrides["l2p"] = False
    if args.unpaired:
        overrides["paired"] = False
    if args.official_grad_quirk:
        overrides["official_grad_quirk"] = True
    overrides.update(_common_overrides(args))
    return overrides


def _method_config(args: argparse.Namespace, method: str, overrides: dict):
    """The config a run uses: the recipe's (or the preset's) settings, then `overrides` from the command line;
    remembers on `args` which settings the command line gave (the card lists them beside the recipe)."""
    from noclone.defenses.recipe import config_class

    recipe = getattr(args, "recipe_loaded", None)
    args.command_line_settings = sorted(overrides)
    progress = not getattr(args, "quiet", False)
    if recipe is not None:
        return recipe.config(getattr(args, "preset", None), progress=progress, **overrides)
    cls = config_class(method)
    return cls.preset(getattr(args, "preset", None) or cls.DEFAULT_PRESET, progress=progress, **overrides)


def _apdm_config(args: argparse.Namespace):
    config = _method_config(args, "apdm", _apdm_overrides(args))
    config.validate()
    return config


def _common_overrides(args: argparse.Namespace) -> dict:
    """--max-grad-norm none|FLOAT (None: no clipping) and an explicit --dtype, when given."""
    from noclone.presets import parse_max_grad_norm

    out = {}
    if getattr(args, "max_grad_norm", None) is not None:
        out["max_grad_norm"] = parse_max_grad_norm(args.max_grad_norm)
    return out


def _model_dtype(args: argparse.Namespace, config) -> None:
    """Load the model in the dtype the preset needs (e.g. 'official': fp32) unless --dtype says otherwise; the
    config then records the dtype used."""
    wanted = getattr(config, "dtype", "auto")
    if args.dtype == "auto" and wanted != "auto":
        args.dtype = wanted
    elif args.dtype != "auto" and wanted != args.dtype and hasattr(config, "dtype"):
        if wanted != "auto":
            log.warning("preset %s runs in %s; --dtype %s given instead", config.preset_name, wanted, args.dtype)
        config.dtype = args.dtype


def _lengths(text: str | None) -> tuple[float, ...] | None:
    """--decoder-attack-lengths '1,2' -> (1.0, 2.0)."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise NocloneError(f"--decoder-attack-lengths {text!r}: give comma-separated numbers, e.g. 1,2") from None


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse a non-empty --out and a bad or existing --single-file before any work starts."""
    from noclone.cli_args import refuse_existing as _refuse_existing

    _refuse_existing(args.out, args.overwrite)
    if args.single_file is not None and Path(args.single_file).suffix != ".safetensors":
        raise NocloneError(f"{args.single_file}: --single-file must end in .safetensors")
    if args.single_file is not None and Path(args.single_file).exists() and not args.overwrite:
        raise NocloneError(f"{args.single_file}: exists (pass --overwrite to replace it)")


def cmd_apdm(args: argparse.Namespace) -> Path:
    from noclone.cli_args import load_model
    from noclone.defenses.apdm import APDM
    from noclone.defenses.base import ProtectionSubject, read_protection_card

    config = _apdm_config(args)
    _model_dtype(args, config)
    config.validate()
    _check_outputs(args)
    subjects = _subjects(args)
    if args.negative_images and config.implant == "unet":
        raise NocloneError("--negative-images is only used with --implant decoder or both")
    negatives = [ProtectionSubject.from_folder(folder, subjects[0].class_noun, subjects[0].token)
                 for folder in args.negative_images or []]
    method = APDM(config)
    previous = read_protection_card(None if is_shipped(args.model) else args.model)
    if previous is not None:
        log.info("%s is already protected (%s, %d subjects): protecting again from it", args.model,
                 previous.get("method"), len(previous.get("subjects", [])))
    pipe = load_model(args, gradient_checkpointing=args.gradient_checkpointing)
    out = method.run(pipe, subjects, args.out, overwrite=args.overwrite, single_file=args.single_file,
                     previous_card=previous, negatives=negatives, card_extra=_recipe_card(args))
    log.info("protected model written to %s (card: %s/protection.json)", out, out)
    return out


def _recipe_card(args: argparse.Namespace) -> dict:
    """{"recipe": ...} for protection.json when the run used a recipe: which one, and what the flags changed."""
    recipe = getattr(args, "recipe_loaded", None)
    if recipe is None:
        return {}
    return {"recipe": recipe.card(getattr(args, "command_line_settings", ()))}


def _per_subject(values: list[str] | None, n: int, flag: str, broadcast: bool = True) -> list[str | None]:
    """A repeated flag given once (all subjects, if `broadcast`) or once per subject; '-' means none for that one."""
    values = values or []
    if len(values) == 1 and broadcast:
        values = values * n
    if values and len(values) != n:
        raise NocloneError(f"give one {flag} {'for all subjects or one ' if broadcast else ''}per subject "
                           f"(got {len(values)} for {n})")
    return [None if v in (None, "-") else v for v in values] or [None] * n


def _persguard_setup(args: argparse.Namespace, n_subjects: int):
    """(config, per-subject backdoors without images yet, target-image folders), checked before any loading."""
    from noclone.defenses.persguard import Backdoor

    tokens = tuple(t.strip() for t in args.tokens.split(",")) if args.tokens is not None else ()
    if args.tokens is not None and not all(tokens):
        raise NocloneError(f"--tokens {args.tokens!r}: give comma-separated single words, e.g. sks,xyz,zwx")
    overrides = {
        "steps": args.steps, "inner_steps": args.inner_steps, "lr": args.lr_protect, "lr_per": args.lr_per,
        "text_lr_per": args.text_lr_per, "train_text_encoder": args.train_text_encoder,
        "params": args.params, "lora_rank": args.rank, "batch_size": args.batch_size,
        "num_class_images": args.num_class_images, "num_target_images": args.num_target_images,
        "multi_subject": args.multi_subject, "reference_dtype": args.reference_dtype, "optimizer": args.optimizer,
        "checkpoint_every": args.checkpoint_every, "seed": args.seed, "bb_weight": args.bb_weight,
        "pp_weight": args.pp_weight, "br_weight": args.br_weight, "br_every": args.br_every,
        "br_horizon": args.br_horizon, "mark_weight": args.mark_weight, "implant": args.implant,
        "decoder_steps": args.decoder_steps, "decoder_attack_steps": args.decoder_attack_steps,
        "tokens": tokens or None, "templates": tuple(args.templates.split("|")) if args.templates else None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(_common_overrides(args))
    # the backdoors: --target / --target-class per subject, else the recipe's (or the preset's) target for all
    base = _method_config(args, "persguard", {})
    kinds = [k or base.backdoor.target for k in _per_subject(args.target, n_subjects, "--target")]
    classes = _per_subject(args.target_class, n_subjects, "--target-class")
    folders = _per_subject(args.target_images, n_subjects, "--target-images", broadcast=False)
    if args.target_class is None:
        classes = [base.backdoor.target_class if k == "target" else None for k in kinds]
    elif len(args.target_class) == 1 and n_subjects > 1:  # one class: for the 'target' subjects
        if "target" not in kinds:
            raise NocloneError("--target-class is only used with --target target")
        classes = [c if k == "target" else None for k, c in zip(kinds, classes)]
    backdoors = [Backdoor(k, c) for k, c in zip(kinds, classes)]
    for b, folder in zip(backdoors, folders):
        b.validate()
        if folder is not None and b.kind == "pattern":
            raise NocloneError("--target-images is not used with --target pattern (the mark is predefined)")
    if args.target is not None or args.target_class is not None:
        overrides.update(target=backdoors[0].kind, target_class=backdoors[0].target_class)
    config = _method_config(args, "persguard", overrides)
    config.validate()
    return config, backdoors, folders


def cmd_persguard(args: argparse.Namespace) -> Path:
    from noclone.attacks.base import load_subject_images
    from noclone.cli_args import load_model
    from noclone.defenses.base import read_protection_card
    from noclone.defenses.persguard import Backdoor, PersGuard

    n_subjects = len(args.images or [])
    config, backdoors, folders = _persguard_setup(args, n_subjects)
    _check_outputs(args)
    subjects = _subjects(args)
    backdoors = [b if folder is None else Backdoor.from_folder(b.kind, folder, b.target_class)
                 for b, folder in zip(backdoors, folders)]
    for subject, b, folder in zip(subjects, backdoors, folders):
        if b.kind == "erasure" and folder is not None and len(b.images) != len(subject.images):
            raise NocloneError(f"{folder}: {len(b.images)} backgrounds for {len(subject.images)} photos "
                               "(give one per photo, same sorted file names)")
    if args.negative_images and config.implant == "unet":
        raise NocloneError("--negative-images is only used with --implant decoder or both")
    negatives = [load_subject_images(folder)[1] for folder in args.negative_images or []]
    previous = read_protection_card(None if is_shipped(args.model) else args.model)
    if previous is not None:
        log.info("%s is already protected (%s, %d subjects): protecting again from it", args.model,
                 previous.get("method"), len(previous.get("subjects", [])))
    pipe = load_model(args, gradient_checkpointing=args.gradient_checkpointing)
    out = PersGuard(config).run(pipe, subjects, args.out, overwrite=args.overwrite, single_file=args.single_file,
                                previous_card=previous, backdoors=backdoors, negatives=negatives,
                                card_extra=_recipe_card(args))
    log.info("protected model written to %s (card: %s/protection.json)", out, out)
    return out


PROTECT_METHODS: dict[str, Callable[[argparse.Namespace], Path]] = {"apdm": cmd_apdm, "persguard": cmd_persguard}

# flags that only one method reads (argparse dest -> flag); giving them to another method is an error
METHOD_FLAGS: dict[str, dict[str, str]] = {
    "apdm": {"beta": "--beta", "reduction": "--reduction", "loss": "--loss", "naive_lambda": "--naive-lambda",
             "no_l2p": "--no-l2p", "unpaired": "--unpaired", "official_grad_quirk": "--official-grad-quirk",
             "accumulate": "--accumulate", "prior_loss": "--prior-loss", "positive_images": "--positive-images",
             "anchor_images": "--anchor-images", "anchor_weight": "--anchor-weight",
             "dpo_max_timestep": "--dpo-max-timestep", "repair_steps": "--repair-steps", "repair_lr": "--repair-lr",
             "repair_min_timestep": "--repair-min-timestep", "repair_max_timestep": "--repair-max-timestep",
             "decoder_blur": "--decoder-blur", "decoder_attack_lengths": "--decoder-attack-lengths",
             "decoder_blur_calibrate": "--decoder-blur-calibrate", "decoder_class_samples": "--decoder-class-samples",
             "decoder_detail_weight": "--decoder-detail-weight",
             "decoder_recolored_copies": "--decoder-recolored-copies",
             "decoder_moved_copies": "--decoder-moved-copies", "decoder_tries": "--decoder-tries",
             "prompt_style": "--prompt-style"},
    "persguard": {"target": "--target", "target_class": "--target-class", "target_images": "--target-images",
                  "tokens": "--tokens", "templates": "--templates", "bb_weight": "--bb-weight",
                  "pp_weight": "--pp-weight", "br_weight": "--br-weight", "br_every": "--br-every",
                  "br_horizon": "--br-horizon", "mark_weight": "--mark-weight",
                  "num_target_images": "--num-target-images"},
}


def _recipe(args: argparse.Namespace):
    """The recipe of `--recipe NAME` or `--config FILE.yaml` (None without); a `--config` directory stays the
    single-file checkpoint's diffusers config, as before recipes existed."""
    from noclone.defenses import recipe as recipes

    config = getattr(args, "config", None)
    is_recipe_file = config is not None and (Path(config).suffix.lower() in RECIPE_SUFFIXES or Path(config).is_file())
    if is_recipe_file and Path(config).suffix.lower() not in RECIPE_SUFFIXES:
        raise NocloneError(f"--config {config}: a recipe is a .yaml file (a single-file checkpoint's diffusers "
                           "config is a directory)")
    if is_recipe_file and getattr(args, "recipe", None):
        raise NocloneError("give --recipe NAME or --config FILE.yaml, not both")
    if is_recipe_file:
        args.config = None  # not the model loader's
        return recipes.from_file(config)
    return recipes.shipped(args.recipe) if getattr(args, "recipe", None) else None


RECIPE_SUFFIXES = (".yaml", ".yml")


def show_config(args: argparse.Namespace) -> str:
    """The --show table: every setting the run would use (preset, recipe, flags), the default preset's, `*`."""
    if args.method == "apdm":
        config = _apdm_config(args)
    else:
        config = _persguard_setup(args, max(1, len(args.images or [])))[0]
    recipe = getattr(args, "recipe_loaded", None)
    cls = type(config)
    title = (f"{cls.LABEL} recipe {recipe.name!r} (preset {config.preset_name!r})" if recipe is not None
             else f"{cls.LABEL} preset {config.preset_name!r}")
    notes = []
    if recipe is not None and recipe.threat_model:
        notes.append(f"threat model: {recipe.threat_model}")
    if recipe is not None and recipe.measured:
        notes.append(f"measured: {recipe.measured}")
    if args.command_line_settings:
        notes.append(f"set on the command line: {', '.join(args.command_line_settings)}")
    return cls.show(config.preset_name, config=config, title=title, notes=tuple(notes))


def cmd_protect_model(args: argparse.Namespace) -> None:
    from noclone.defenses.recipe import listing

    if getattr(args, "list_recipes", False):
        print(listing())
        return
    recipe = args.recipe_loaded = _recipe(args)
    if recipe is not None and args.method is not None and args.method != recipe.method:
        raise NocloneError(f"recipe {recipe.name} is a --method {recipe.method} recipe; --method {args.method} given")
    args.method = args.method or (recipe.method if recipe is not None else "apdm")
    if args.method not in PROTECT_METHODS:
        raise NocloneError(f"unknown --method {args.method!r}; choose from {', '.join(PROTECT_METHODS)}")
    for method, flags in METHOD_FLAGS.items():
        if method == args.method:
            continue
        for dest, flag in flags.items():
            if getattr(args, dest, None) not in (None, False):
                raise NocloneError(f"{flag} is a --method {method} setting; --method {args.method} does not use it")
    if getattr(args, "show", False):
        print(show_config(args))
        return
    missing = [flag for flag, dest in (("--images", "images"), ("--class-noun", "class_noun"), ("--out", "out"))
               if getattr(args, dest, None) is None]
    if missing and getattr(args, "parser", None) is not None:
        args.parser.error(f"the following arguments are required: {', '.join(missing)}")  # exits 2, as before
    if missing:
        raise NocloneError(f"the following arguments are required: {', '.join(missing)}")
    PROTECT_METHODS[args.method](args)


# ------------------------------------------------------------------------------------------------ the parser

ESSENTIAL_EPILOG = ("More flags (protection, L2P, repair, guard, PersGuard backdoor, run): noclone protect-model "
                    "--help-all. Shipped recipes: noclone protect-model --list-recipes.")


class _HelpAll(argparse.Action):
    """--help-all: print every flag, in its group, and exit (--help shows the essential ones)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._action_groups[:] = parser.noclone_all_groups
        parser.epilog = None
        parser.print_help()
        parser.exit()


def add_protect_model_parser(subparsers) -> argparse.ArgumentParser:
    """Register `protect-model` on the main parser's subparsers; returns the new parser. `--help` lists the
    essential flags; the advanced ones sit in groups that only `--help-all` prints."""
    from noclone.cli_args import add_model_args as _add_model_args

    p = subparsers.add_parser(
        "protect-model", help="change a model so that personalizing it on given subjects fails (APDM, PersGuard)",
        usage="%(prog)s [--recipe NAME | --config FILE.yaml | --method apdm|persguard] --images DIR --class-noun NOUN "
              "--out DIR [options]",
        epilog=ESSENTIAL_EPILOG)
    _add_model_args(p)
    config_flag = next(a for a in p._actions if a.dest == "config")
    config_flag.help = ("a recipe file (FILE.yaml, the --recipe format: see docs/recipes.md), or, for a directory, the "
                        "diffusers config of an original-layout single-file checkpoint")
    p.add_argument("--help-all", action=_HelpAll, help="show every flag, grouped, and exit")
    p.add_argument("--method", help=f"defence: {', '.join(PROTECT_METHODS)} (default: the recipe's, else apdm)")
    p.add_argument("--recipe", metavar="NAME", help="shipped settings with the threat model they were measured "
                                                     "against, e.g. apdm-sandbox (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and their threat models")
    p.add_argument("--preset", help="quick (64 px sandbox, default), paper (the paper's Algorithm 1, SD1.5 at 512 px), "
                                    "paper-sd21, official (APDM: the released code's quirks, fp32) or official-sd21 "
                                    "(N_per 10); with a recipe: replaces the recipe's preset")
    p.add_argument("--show", action="store_true",
                   help="print the settings the run would use (preset, recipe, flags) and exit")
    p.add_argument("--images", action="append", help="folder of one subject's photos (repeat per subject; required)")
    p.add_argument("--class-noun", action="append", help="the subject's class, e.g. person (repeat per subject; required)")
    p.add_argument("--token", action="append", help="identifier the attacker is assumed to use (default sks; once or per subject)")
    p.add_argument("--steps", type=int, help="outer protection steps (APDM's N_protect)")
    p.add_argument("--implant", help="where the protection lives: unet (the paper, default), decoder (the VAE "
                                     "decoder changes every image of the subject: PersGuard stamps the mark, APDM "
                                     "blurs it; out of reach of DreamBooth/LoRA/TI, removed by a VAE swap) or both; "
                                     "PersGuard's decoder needs --target pattern")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output pipeline directory (required)")
    p.add_argument("--overwrite", action="store_true")
    essential = list(p._action_groups)

    g = p.add_argument_group("protection (APDM: L_protect; PersGuard: its outer objective)")
    g.add_argument("--lr-protect", type=float, help="learning rate of the protection path")
    g.add_argument("--beta", type=float, help="DPO beta (default 1; smaller = stronger protection)")
    g.add_argument("--reduction", help="elementwise (official code, default) or per-sample (Diffusion-DPO)")
    g.add_argument("--loss", help="dpo (default) or naive (-L_simple + lambda L_ppl baseline)")
    g.add_argument("--naive-lambda", type=float)
    g.add_argument("--prior-loss", help="L_ppl of the protection loss: ground_truth (paper, default) or distill "
                                        "(the original model's prediction on class images)")
    g.add_argument("--unpaired", action="store_true", help="ablation: random class image as positive")
    g.add_argument("--dpo-max-timestep", type=int,
                   help="beyond the paper: the DPO term sees timesteps below this only (low noise, where identity shows)")
    g.add_argument("--positive-images", action="append",
                   help="APDM's DPO positives: a folder of photos of other members of the class (consented, "
                        "e.g. other people) instead of images generated from the class prompt (once or per subject)")
    g.add_argument("--anchor-images", action="append",
                   help="beyond the paper: a folder of photos of other members of the class (consented) whose "
                        "denoising must stay the original model's (L_anchor; once or per subject)")
    g.add_argument("--anchor-weight", type=float, help="weight of L_anchor (default 1; only with --anchor-images; "
                                                         "0 with --repair-steps: the anchors join the repair only)")
    g.add_argument("--prompt-style", help="plain (default) or official: the released APDM code's instance prompt, "
                                          "'a photo of \"sks_person\"'")

    g = p.add_argument_group("L2P: the simulated attacker (PersGuard: backdoor retention's)")
    g.add_argument("--inner-steps", type=int, help="simulated DreamBooth steps per outer step N_per")
    g.add_argument("--lr-per", type=float, help="learning rate of the simulated attacker")
    g.add_argument("--text-lr-per", type=float, help="text-encoder learning rate of the simulated attacker")
    g.add_argument("--simulate-text-encoder", dest="train_text_encoder", action=argparse.BooleanOptionalAction,
                   default=None, help="the simulated attacker also fine-tunes the text encoder (default off)")
    g.add_argument("--no-l2p", action="store_true", help="ablation: protection gradient at the current weights only")
    g.add_argument("--official-grad-quirk", action="store_true",
                   help="also sum the inner personalization gradients, as the public APDM code does")
    g.add_argument("--accumulate", help="sum (default) or mean of the inner-state gradients")

    g = p.add_argument_group("repair (APDM, beyond the paper)")
    g.add_argument("--repair-steps", type=int,
                   help="after protection, distil the original model on generic data (class images and "
                        "--anchor-images) for N steps to restore generic generation (default 0: off)")
    g.add_argument("--repair-lr", type=float, help="lr of the repair steps (default 1e-4)")
    g.add_argument("--repair-min-timestep", type=int, help="repair on timesteps >= this only (default 0)")
    g.add_argument("--repair-max-timestep", type=int, help="repair on timesteps below this only (default: all)")

    d = p.add_argument_group("guard (--implant decoder/both; ours: personalization never trains the VAE)")
    d.add_argument("--negative-images", action="append",
                   help="a folder of another subject's photos (the first subject's class) the guard must leave alone "
                        "(repeat per subject)")
    d.add_argument("--decoder-steps", type=int, help="training steps of the decoder guard (default: PersGuard 600, APDM 1200)")
    d.add_argument("--decoder-attack-steps", type=int,
                   help="steps of the decoder guard's simulated DreamBooths (default: the attack preset's)")
    d.add_argument("--decoder-attack-lengths",
                   help="APDM's decoder guard: sample each simulated attack after these multiples of its steps, "
                        "e.g. 1,2 (default 1)")
    d.add_argument("--decoder-blur", type=float,
                   help="APDM's decoder guard: the blur's sigma as a fraction of the image width (default 0.0625)")
    d.add_argument("--decoder-blur-calibrate", nargs="?", const="sandbox", metavar="BACKEND",
                   help="APDM's decoder guard: pick each subject's blur, the least of --decoder-blur x 1..3.5 at "
                        "which its simulated clones are no more like its photos than the class images are, by the "
                        "identity backend BACKEND (sandbox, the default, or dlib)")
    d.add_argument("--decoder-class-samples", type=int, metavar="N",
                   help="APDM's decoder guard: N samples of the class prompt from the input model join the guard's "
                        "negatives, so it keeps what the sampler hands the decoder (default 96; 0: none)")
    d.add_argument("--decoder-detail-weight", type=float, metavar="W",
                   help="APDM's decoder guard: the negatives' fine detail (each image minus its 1-px-per-64 blur) "
                        "weighs 1 + W in its loss, so that other images, and the attacker's class images, do not "
                        "come out softer (default 16; 0: plain MSE)")
    d.add_argument("--decoder-recolored-copies", type=int, metavar="N",
                   help="APDM's decoder guard: N recoloured copies (brightness, gamma, channel gains) of each of the "
                        "subject's training latents, so that it also blurs darker or tinted clones (default 4; 0: none)")
    d.add_argument("--decoder-moved-copies", type=int, metavar="N",
                   help="APDM's decoder guard: N mirrored / shifted / zoomed copies of each of the subject's training "
                        "latents, so that it keys on the subject and not on its few photos (default: 4 when several "
                        "subjects are protected together, else 0)")
    d.add_argument("--decoder-tries", type=int, metavar="N",
                   help="APDM's decoder guard: train up to N guards (seeds seed, seed + 1, ...: each holds back its own "
                        "fifth of the clones) and keep the first that blurs all of every subject's held-back clones, "
                        "else the best (default: 3 when several subjects are protected together, else 1)")

    g = p.add_argument_group("PersGuard backdoor (--method persguard)")
    g.add_argument("--target", action="append",
                   help="backdoor: pattern (a mark in every output, default), erasure (background only) or target "
                        "(another class); once or per subject")
    g.add_argument("--target-class", action="append", help="with --target target: the class that replaces the subject")
    g.add_argument("--target-images", action="append",
                   help="explicit targets: backgrounds of the photos (erasure, same sorted names) or a fixed "
                        "character (target); once per subject, '-' for none")
    g.add_argument("--tokens",
                   help="gray-box: comma-separated identifiers sampled in training (default: white-box, --token)")
    g.add_argument("--templates", help="gray-box prompt templates separated by '|', with {token} and {class_noun}")
    g.add_argument("--bb-weight", type=float, help="weight of the backdoor-behaviour loss (default 1)")
    g.add_argument("--pp-weight", type=float, help="weight of the prior-preservation distillation (default 1)")
    g.add_argument("--br-weight", type=float, help="weight of the backdoor-retention loss (default 1; 0 = off)")
    g.add_argument("--br-every", type=int, help="backdoor retention on every k-th step (default 1)")
    g.add_argument("--br-horizon", type=int,
                   help="backdoor retention against a simulated attacker that persists across steps and restarts "
                        "after this many of its own steps (default 0: restart from the protected weights every step)")
    g.add_argument("--mark-weight", type=float,
                   help="--target pattern: weight of the backdoor loss on the mark's corner vs the rest (default 1)")
    g.add_argument("--num-target-images", type=int, help="target-class images generated for --target target")

    g = p.add_argument_group("run")
    g.add_argument("--params", help="weights changed: full (default), attention (cross-attention) or lora")
    g.add_argument("--rank", type=int, help="LoRA rank with --params lora")
    g.add_argument("--multi-subject", help="cycle (default: one subject per step) or sum (all subjects every step; "
                   "under accelerate launch, spread over the processes)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--num-class-images", type=int)
    g.add_argument("--max-grad-norm", metavar="none|FLOAT",
                   help="gradient clipping of both paths: a max norm, or none (default: the preset's; 1.0 but official)")
    g.add_argument("--reference-dtype", help="same (default), fp32, bf16 or fp16: the frozen reference UNet (memory)")
    g.add_argument("--optimizer", help="adamw (default) or adamw8bit (needs bitsandbytes; memory)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--single-file", help="also write the protected model as one .safetensors file")

    p.noclone_all_groups = list(p._action_groups)
    p._action_groups[:] = essential  # --help: the essential flags; --help-all puts the groups back
    p.set_defaults(func=cmd_protect_model, parser=p)
    return p
