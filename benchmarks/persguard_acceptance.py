"""PersGuard acceptance in the sandbox (issue #6): does the backdoor fire when the protected subject is fine-tuned?

    .venv/bin/python benchmarks/persguard_acceptance.py --out /tmp/persguard [--class-noun person] [--identity 0]
        [--other-identity 1] [--targets pattern,erasure,target] [--target-class cat] [--n 32] [--seed 0]
        [--preset quick] [--steps N] [--inner-steps N] [--br-horizon H] [--mark-weight W] [--pp-weight W]
        [--pp-subject-weight W] [--attack-method dreambooth|lora|ti] [--attack-steps N] [--attack-lr LR]
        [--attack-text-lr LR] [--gray-tokens sks,xyz,zwx]
        [--gray-attack-token qlx] [--implant unet|decoder|both] [--negative-identities 10,11] [--model sandbox]
        [--markdown FILE]

For each backdoor target: protect the base model against held-out identity `--identity` (5 photos; erasure gets the
photos' exact rendered backgrounds), run the attacker's DreamBooth (the sandbox preset, 300 steps) on the same
photos with the protector's identifier, generate `--n` images of "a photo of sks <class>" and report

    backdoor rate         the fraction of generations where the target's check fires (defenses/backdoor_checks.py)
    identity match rate   generations matching the protected identity (the sandbox evaluator's threshold)
    other-subject match   DreamBooth on another held-out identity of the same class, on the protected model:
                          its match rate (should stay at the base model's) and backdoor rate (should stay ~0)
    detector rate         generations where the sandbox detector finds a <class>
    generic detector rate the same on the released (un-attacked) model's "a photo of a <class>" generations:
                          generic quality, which sandbox-FID alone misses here
    sandbox-FID           "a photo of a <class>" generations of the protected vs the base model (same seeds);
                          the floor is base vs base with other seeds

against the same attacks on the unprotected base model, and the backdoor rate of the protected model before any
attack, for the trigger prompt "a photo of <token> <class>" (may fire: the trigger is the identifier) and for the
class prompt "a photo of a <class>" (should not: a backdoor there damages every user), and how often the
un-attacked model's trigger generations already match the subject (L_BB trains the model on the subject's photos
under the trigger, so the protection itself may teach it the subject). Then a gray-box run: protect with `--gray-tokens`
(templates sampled) and attack with `--gray-attack-token`, an identifier outside that set. Every stage is cached
under --out (protected models, attacks, generations), so a rerun only computes what is missing. Prints a table,
writes results.json (and --markdown).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

KINDS = ("pattern", "erasure", "target")


def protect(model: Path, work: Path, class_noun: str, identity: int, kind: str, target_class: str | None,
            settings: dict, tokens: tuple[str, ...] = (), negatives: tuple[int, ...] = ()) -> tuple[Path, float]:
    """The protected model for one backdoor (cached in work/protected/<key>); returns (dir, seconds)."""
    from noclone.defenses.persguard import PersGuardConfig

    config = PersGuardConfig.preset(settings.pop("preset"), target=kind,
                                    target_class=target_class if kind == "target" else None, tokens=tokens,
                                    **{k: v for k, v in settings.items() if v is not None})
    negatives = negatives if config.implant != "unet" else ()
    fields = [str(model), class_noun, identity, config.identity(), config.steps] + ([list(negatives)] if negatives else [])
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = work / "protected" / f"{kind}-{'gray' if tokens else 'white'}-{key}"
    return run_protection(model, work, class_noun, [(identity, "sks")], config, out, negatives)


def run_protection(model: Path, work: Path, class_noun: str, subjects: list[tuple[int, str]], config, out: Path,
                   negatives: tuple[int, ...] = ()) -> tuple[Path, float]:
    """PersGuard `config` on the (identity, token) subjects into `out`, unless already there; returns (dir, seconds)."""
    from noclone.defenses.base import ProtectionSubject
    from noclone.defenses.persguard import Backdoor, PersGuard
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import TRAIN_PHOTOS, subject_photos
    from noclone.sandbox.render import render_background

    timing = out.parent / f"{out.name}.seconds.json"
    if (out / "protection.json").is_file() and timing.is_file():
        return out, json.loads(timing.read_text())["seconds"]
    protected, backdoors = [], []
    erasure = config.target == "erasure"
    for identity, token in subjects:
        photos = subject_photos(work / "subjects" / f"{class_noun}-{identity}", class_noun, identity, TRAIN_PHOTOS)
        protected.append(ProtectionSubject.from_folder(photos, class_noun, token=token))
        images = [render_background(class_noun, identity, p) for p in TRAIN_PHOTOS] if erasure else None
        backdoors.append(Backdoor(config.target, config.target_class, images=images))
    from noclone.sandbox.experiment import images_in

    negative_images = [images_in(subject_photos(work / "subjects" / f"{class_noun}-{i}", class_noun, i, TRAIN_PHOTOS))
                       for i in negatives]
    started = time.time()
    PersGuard(config).run(load_pipeline(model), protected, out, overwrite=True, backdoors=backdoors,
                          negatives=negative_images)
    seconds = round(time.time() - started, 1)
    timing.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def attack(model: Path, work: Path, class_noun: str, identity: int, token: str, args) -> dict:
    """The attack (`--attack-method`, sandbox preset) on `identity` with `token`, then `--n` generations and
    identity metrics."""
    from noclone.attacks.base import preset_config
    from noclone.sandbox.experiment import attack_experiment

    config = preset_config(args.attack_method, "sandbox", class_noun=class_noun, token=token, seed=args.seed,
                           steps=args.attack_steps, lr=args.attack_lr, text_encoder_lr=args.attack_text_lr,
                           num_class_images=args.num_class_images,
                           class_image_steps=args.class_image_steps)
    # attack_experiment caches by attack settings only: one work folder per attacked model
    return attack_experiment(model, work / "attacks" / _model_key(model), class_noun, identity, args.attack_method,
                             config, args.n, args.seed)


def _model_key(model: Path) -> str:
    return hashlib.sha256(str(Path(model).resolve()).encode()).hexdigest()[:12]


def generic_generations(model: Path, work: Path, class_noun: str, n: int, seed: int) -> list:
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import generate_cached

    folder = work / "generic" / f"{_model_key(model)}-{class_noun}-{n}-{seed}"
    return generate_cached(lambda: load_pipeline(model), folder, f"a photo of a {class_noun}", n, seed)


def trigger_generations(model: Path, work: Path, class_noun: str, token: str, n: int, seed: int) -> list:
    """The released (protected, not yet attacked) model's images for the trigger prompt itself."""
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import generate_cached

    folder = work / "trigger" / f"{_model_key(model)}-{class_noun}-{token}-{n}-{seed}"
    return generate_cached(lambda: load_pipeline(model), folder, f"a photo of {token} {class_noun}", n, seed)


def match_before_attack(model: Path, work: Path, class_noun: str, identity: int, token: str, n: int, seed: int) -> float:
    """Identity match rate of the un-attacked model's trigger generations against the subject's references."""
    from noclone.eval.evaluate import sandbox_scores
    from noclone.sandbox.experiment import reference_photos

    images = trigger_generations(model, work, class_noun, token, n, seed)
    return sandbox_scores(images, reference_photos(work, class_noun, identity), class_noun, ("ism",))["identity_match_rate"]


def detector_rate(images: list, class_noun: str) -> float:
    """The fraction of `images` in which the sandbox detector finds a well-formed `class_noun` (1 - FDFR)."""
    from noclone.eval.evaluate import sandbox_scores

    return 1 - sandbox_scores(images, [], class_noun, ("fdfr",))["fdfr"]


def measure(result: dict, kind: str, class_noun: str, target_class: str | None) -> dict:
    """Backdoor rate and detector rate of an attack's generations, plus its identity metrics."""
    from noclone.defenses.backdoor_checks import backdoor_rate
    from noclone.sandbox.experiment import images_in

    images = images_in(Path(result["generated_dir"]))
    return {"backdoor_rate": backdoor_rate(kind, images, class_noun=class_noun, target_class=target_class),
            "identity_match_rate": result["identity_match_rate"], "ism": result["ism"],
            "detector_rate": 1 - result["fdfr"], "n": len(images), "train_seconds": result["train_seconds"]}


def fid(a: list, b: list) -> float:
    from noclone.eval.metrics import frechet_distance
    from noclone.sandbox.evaluator import load_default_evaluator

    evaluator = load_default_evaluator()
    return frechet_distance(evaluator.features(a), evaluator.features(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--identity", type=int, default=0, help="held-out identity index of the protected subject")
    parser.add_argument("--other-identity", type=int, default=1, help="held-out identity index of an unprotected subject")
    parser.add_argument("--targets", default=",".join(KINDS))
    parser.add_argument("--target-class", default="cat")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--steps", type=int, help="PersGuard outer steps (default: the preset's)")
    parser.add_argument("--inner-steps", type=int)
    parser.add_argument("--mark-weight", type=float, help="pattern: L_BB weight on the mark's corner (default 1)")
    parser.add_argument("--br-horizon", type=int,
                        help="persistent simulated attacker of L_BR, restarted after this many steps (default 0: off)")
    parser.add_argument("--attack-method", default="dreambooth", choices=("dreambooth", "lora", "ti"),
                        help="the attacker's personalization (sandbox preset; default dreambooth)")
    parser.add_argument("--attack-steps", type=int, help="the attacker's DreamBooth steps (default: the preset's 300)")
    parser.add_argument("--attack-lr", type=float, help="the attacker's UNet lr (default: the preset's 3e-4)")
    parser.add_argument("--attack-text-lr", type=float, help="the attacker's text-encoder lr (default: the preset's 1e-3)")
    parser.add_argument("--pp-weight", type=float, help="weight of L_PP, the distillation from the original (default 1)")
    parser.add_argument("--pp-subject-weight", type=float,
                        help="weight of L_PP on the subject's own photos under the class prompt (default 0)")
    parser.add_argument("--implant", default="unet",
                        help="where the backdoor lives: unet (the paper), decoder or both (decoder_backdoor.py)")
    parser.add_argument("--negative-identities", default="10,11",
                        help="with --implant decoder/both: held-out identities whose photos the decoder must leave "
                             "unmarked (the protector's negatives; keep them apart from --identity/--other-identity)")
    parser.add_argument("--num-class-images", type=int, help="class images of both protection and attack")
    parser.add_argument("--class-image-steps", type=int)
    parser.add_argument("--gray-tokens", default="sks,xyz,zwx,pqv")
    parser.add_argument("--gray-attack-token", default="qlx", help="the attacker's identifier in the gray-box run")
    parser.add_argument("--no-gray", action="store_true", help="skip the gray-box run")
    parser.add_argument("--markdown", help="also write the tables as markdown to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.splits import held_out

    model = model_dir() if args.model == "sandbox" else Path(args.model)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    class_noun, kinds = args.class_noun, [k for k in args.targets.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown targets {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    target_class = args.target_class
    if "target" in kinds and target_class == class_noun:
        parser.error("--target-class must differ from --class-noun")
    gray_tokens = tuple(t for t in args.gray_tokens.split(",") if t)
    if args.gray_attack_token in gray_tokens:
        parser.error("--gray-attack-token must be outside --gray-tokens (that is the point of the run)")
    protected_id, other_id = held_out(args.identity), held_out(args.other_identity)
    settings = dict(preset=args.preset, steps=args.steps, inner_steps=args.inner_steps,
                    br_horizon=args.br_horizon, mark_weight=args.mark_weight, pp_weight=args.pp_weight,
                    pp_subject_weight=args.pp_subject_weight,
                    num_class_images=args.num_class_images, num_target_images=args.num_class_images,
                    class_image_steps=args.class_image_steps, seed=args.seed, implant=args.implant)
    negatives = tuple(held_out(int(i)) for i in args.negative_identities.split(",") if i)
    if {protected_id, other_id} & set(negatives):
        parser.error("--negative-identities must not include --identity or --other-identity")

    base_generic = generic_generations(model, work, class_noun, args.n, args.seed)
    floor = fid(base_generic, generic_generations(model, work, class_noun, args.n, args.seed + 10_000))
    base_attack = attack(model, work, class_noun, protected_id, "sks", args)
    base_other = attack(model, work, class_noun, other_id, "sks", args)
    results = {"args": vars(args), "fid_floor": floor, "rows": []}

    def row(name: str, kind: str, protected: Path | None, seconds: float, token: str) -> dict:
        tc = target_class if kind == "target" else None
        from noclone.defenses.backdoor_checks import backdoor_rate

        before_attack = {"trigger": None, "class": None}
        released = protected or model
        match_before = match_before_attack(released, work, class_noun, protected_id, token, args.n, args.seed)
        generic_detector = detector_rate(generic_generations(released, work, class_noun, args.n, args.seed), class_noun)
        if protected is None:
            own, other, fid_value = base_attack, base_other, None
        else:
            own = attack(protected, work, class_noun, protected_id, token, args)
            other = attack(protected, work, class_noun, other_id, token, args)
            generic = generic_generations(protected, work, class_noun, args.n, args.seed)
            fid_value = fid(generic, base_generic)
            before_attack = {
                "trigger": backdoor_rate(kind, trigger_generations(protected, work, class_noun, token, args.n, args.seed),
                                         class_noun=class_noun, target_class=tc),
                "class": backdoor_rate(kind, generic, class_noun=class_noun, target_class=tc)}
        mine, theirs = measure(own, kind, class_noun, tc), measure(other, kind, class_noun, tc)
        return {"run": name, "target": kind, "attack_token": token, "protect_seconds": seconds,
                "backdoor_rate": mine["backdoor_rate"], "identity_match_rate": mine["identity_match_rate"],
                "ism": mine["ism"], "detector_rate": mine["detector_rate"],
                "other_match_rate": theirs["identity_match_rate"], "other_backdoor_rate": theirs["backdoor_rate"],
                "fid_vs_base": fid_value, "n": mine["n"], "backdoor_before_attack_trigger": before_attack["trigger"],
                "backdoor_before_attack_class": before_attack["class"], "identity_match_before_attack": match_before,
                "generic_detector_rate": generic_detector}

    for kind in kinds:
        results["rows"].append(row("base model (unprotected)", kind, None, 0.0, "sks"))
        protected, seconds = protect(model, work, class_noun, protected_id, kind, target_class, dict(settings),
                                     negatives=negatives)
        results["rows"].append(row("white-box", kind, protected, seconds, "sks"))
    if not args.no_gray and kinds:
        kind = kinds[0]
        protected, seconds = protect(model, work, class_noun, protected_id, kind, target_class, dict(settings),
                                     tokens=gray_tokens, negatives=negatives)
        results["rows"].append(row(f"gray-box {{{','.join(gray_tokens)}}}", kind, protected, seconds,
                                   args.gray_attack_token))
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results, args)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)


def markdown(results: dict, args) -> str:
    lines = [f"PersGuard acceptance: {args.class_noun} held-out identity {args.identity} protected, attacker "
             f"{ {'dreambooth': 'DreamBooth', 'lora': 'LoRA', 'ti': 'textual inversion'}[args.attack_method]} "
             f"(sandbox preset{', ' + str(args.attack_steps) + ' steps' if args.attack_steps else ''}"
             f"{', lr ' + str(args.attack_lr) if args.attack_lr else ''}"
             f"{', text lr ' + str(args.attack_text_lr) if args.attack_text_lr else ''}), "
             f"{'backdoor implanted in: ' + args.implant + ', ' if args.implant != 'unet' else ''}"
             f"{args.n} generations of 'a photo of <token> {args.class_noun}'. Sandbox-FID floor (base vs base, "
             f"other seeds): {results['fid_floor']:.2f}.", "",
             "| run | target | attack token | backdoor rate | identity match | ISM | detector rate | other-subject match "
             "| other-subject backdoor | FID vs base | backdoor before attack: trigger / class prompt "
             "| identity match before attack | generic detector rate | protect s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['target']} | {r['attack_token']} | {r['backdoor_rate']:.2f} | "
              f"{r['identity_match_rate']:.2f} | {r['ism']:.3f} | {r['detector_rate']:.2f} | {r['other_match_rate']:.2f} | "
              f"{r['other_backdoor_rate']:.2f} | {_num(r['fid_vs_base'])} | {_num(r['backdoor_before_attack_trigger'])} / "
              f"{_num(r['backdoor_before_attack_class'])} | {_num(r.get('identity_match_before_attack'))} | "
              f"{_num(r.get('generic_detector_rate'))} | "
              f"{r['protect_seconds']:.0f} |"
              for r in results["rows"]]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
