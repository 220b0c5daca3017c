"""Acceptance figures of APDM in the sandbox (issue: APDM): protect held-out subjects, attack, measure.

    .venv/bin/python benchmarks/apdm_acceptance.py --out /tmp/apdm-acc [--classes person,dog,cat] [--identity 0]
        [--adaptive person] [--other-identity 1] [--quality] [--n 32] [--seed 0] [--outer-steps N]
        [--simulate-text-encoder] [--prior-loss distill] [--no-l2p] [--positives N] [--token T]
        [--loss naive] [--beta B] [--anchors N] [--repair-steps N] [--markdown F]
        [--implant decoder|both] [--negative-identities 10,11] [--decoder-blur F] [--decoder-blur-calibrate]
        [--other-seeds 1,2,3]
        [--decoder-option FIELD=VALUE ...]
    .venv/bin/python benchmarks/apdm_acceptance.py --out DIR --subjects person:0,dog:4,cat:2 [--multi-subject sum]
        [--other-identity K]     # criterion 6: several subjects protected in ONE model

For each class: APDM (quick preset) protects held-out identity `--identity` (5 photos); the attacker runs the
sandbox DreamBooth (the same settings the inner path simulates) on the unprotected and on the protected model;
both are measured against 8 held-back reference photos, and against the base model's ISM for the same prompt.
`--adaptive CLASSES` adds the adaptive attackers on those classes (3x lr, 2x steps, another identifier token, LoRA);
`--other-identity K` checks that another subject still personalizes on the protected model; `--other-seeds 1,2,3`
repeats that check with several attacker seeds and judges criterion 3 on the mean (the unprotected model alone
ranges from 0.81 to 1.00 over four seeds: docs/research/decoder-guard.md, stop 31). `--quality` compares generic generations (detector
rate, sandbox-FID against renders) of the base and protected models. Every stage is cached in --out, so a rerun
only computes what is missing.

`--subjects CLASS:K,...` protects all the listed held-out identities together in one model (APDM's multi-subject
mode, `--multi-subject cycle|sum`) and then attacks each of them on it; `--other-identity K` is then the "fourth
subject" (held-out K of the first subject's class), which should still personalize.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from statistics import mean


def positive_photos(work: Path, class_noun: str, n: int) -> Path:
    """One render each of n generator-training identities of the class: 'photos of other members of the class'."""
    from noclone.sandbox.render import render
    from noclone.data.atomic import atomic_output_dir
    from noclone.data.images import save_image

    folder = work / "positives" / f"{class_noun}-{n}"
    if not (folder / ".complete").is_file():
        with atomic_output_dir(folder, overwrite=True) as tmp:
            for i in range(n):
                save_image(render(class_noun, 7919 * i + 11, i % 8), tmp / f"{i:04d}.png")
            (tmp / ".complete").write_text("")
    return folder


def protect(model: Path, work: Path, class_noun: str, identity: int, settings,
            positives: int = 0, token: str = "sks", anchors: int = 0,
            also: list[tuple[str, int]] = (), repair_anchors: int = 0,
            negatives: list[tuple[str, int]] = ()) -> tuple[Path, float]:
    """APDM-protect one held-out identity, plus any `also` (class, identity) in the same model (cached); returns
    (protected model dir, seconds). `negatives`: (class, identity) the decoder guard must leave alone."""
    from noclone.defenses import APDM, ProtectionSubject
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.experiment import TRAIN_PHOTOS, model_tag, subject_photos

    if settings.repair_steps:
        unrepaired, seconds = protect(model, work, class_noun, identity, replace(settings, repair_steps=0), positives,
                                      token, anchors, also, negatives=negatives)
        return repaired(model, unrepaired, work, settings, [(class_noun, identity), *also], anchors,
                        repair_anchors), seconds
    key_settings = {k: v for k, v in settings.flat().items() if not k.startswith("repair_")}  # repaired below
    if settings.implant == "unet":  # the decoder guard's settings play no part: earlier caches stay valid
        key_settings = {k: v for k, v in key_settings.items() if k != "implant" and not k.startswith("decoder_")}
    key = hashlib.sha256(json.dumps(key_settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    suffix = ((f"-pos{positives}" if positives else "") + (f"-anchor{anchors}" if anchors else "")
              + (f"-{token}" if token != "sks" else "") + "".join(f"+{c}-{i}" for c, i in also)
              + (f"-neg{'_'.join(f'{c}{i}' for c, i in negatives)}" if negatives else ""))
    out = work / "protected" / f"{model_tag(model)}-{class_noun}-{identity}-{key}{suffix}"
    card = out / "protection.json"
    if not card.is_file():
        subjects = []
        for c, i in [(class_noun, identity), *also]:
            photos = subject_photos(work / "subjects" / f"{c}-{i}", c, i, TRAIN_PHOTOS)
            positive_dir = positive_photos(work, c, positives) if positives else None
            anchor_dir = positive_photos(work, c, anchors) if anchors else None
            subjects.append(ProtectionSubject.from_folder(photos, c, token, positives=positive_dir, anchors=anchor_dir))
        others = [ProtectionSubject.from_folder(subject_photos(work / "subjects" / f"{c}-{i}", c, i, TRAIN_PHOTOS), c,
                                                token) for c, i in negatives]
        started = time.time()
        APDM(settings).run(load_pipeline(model), subjects, out, overwrite=True, negatives=others)
        data = json.loads(card.read_text())
        data.setdefault("metrics", {})["seconds"] = round(time.time() - started, 1)
        card.write_text(json.dumps(data, indent=2))
    return out, json.loads(card.read_text()).get("metrics", {}).get("seconds", 0.0)


def repaired(model: Path, unrepaired: Path, work: Path, settings, targets, anchors: int,
             repair_anchors: int = 0) -> Path:
    """The release repair (APDM.repair, the code `--repair-steps` runs after L2P) applied to a cached protected model;
    `repair_anchors` renders of other class members join the repair only (as `--anchor-weight 0 --anchor-images`)."""
    from noclone.defenses import APDM, ProtectionSubject
    from noclone.models.pipeline import load_pipeline, save_pipeline
    from noclone.sandbox.experiment import TRAIN_PHOTOS, subject_photos
    from noclone.training.loop import smoothed

    suffix = ((f"-ranchor{repair_anchors}" if repair_anchors else "")
              + (f"-rt{settings.repair_min_timestep}" if settings.repair_min_timestep else "")
              + (f"-rtmax{settings.repair_max_timestep}" if settings.repair_max_timestep else ""))
    repair_set = repair_anchors or anchors  # the anchors the repair alternates with the class images
    out = unrepaired.parent / f"{unrepaired.name}-repair{settings.repair_steps}-{settings.repair_lr:g}{suffix}"
    if not (out / "protection.json").is_file():
        original, pipe = load_pipeline(model), load_pipeline(unrepaired)
        method = APDM(settings)
        datas = [method.subject_data(original, ProtectionSubject.from_folder(
                     subject_photos(work / "subjects" / f"{c}-{i}", c, i, TRAIN_PHOTOS), c,
                     anchors=positive_photos(work, c, repair_set) if repair_set else None)) for c, i in targets]
        started = time.time()
        history = method.repair(pipe, original.unet, datas)
        card = json.loads((unrepaired / "protection.json").read_text())
        card["hyperparameters"] = asdict(settings)
        card.setdefault("metrics", {})["repair_seconds"] = round(time.time() - started, 1)
        card["metrics"]["repair_first_last"] = list(smoothed(history))  # as the card of an in-run repair
        save_pipeline(pipe, out, overwrite=True, extra_files={"protection.json": json.dumps(card, indent=2)})
    return out


def quality(model: Path, work: Path, class_noun: str, n: int, seed: int) -> dict:
    """Detector rate and sandbox-FID (evaluator features) of n 'a photo of a <class>' images vs n held-out renders."""
    from noclone.eval.evaluate import sandbox_scores
    from noclone.sandbox.experiment import generate_cached, images_in, model_tag
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out
    from noclone.models.pipeline import load_pipeline

    prompt = f"a photo of a {class_noun}"
    generated = generate_cached(lambda: load_pipeline(model), work / "generated" / f"quality-{model_tag(model)}-{class_noun}-{n}-{seed}",
                                prompt, n, seed + 5000, progress=False)
    renders = [render(class_noun, held_out(500 + i), 0) for i in range(n)]
    scores = sandbox_scores(generated, renders, class_noun, ("fdfr", "fid"))
    return {"detector_rate": 1 - scores["fdfr"], "fid": scores["fid"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--classes", default="person,dog,cat")
    parser.add_argument("--identity", type=int, default=0)
    parser.add_argument("--subjects", help="CLASS:K,... held-out identities protected together in one model")
    parser.add_argument("--multi-subject", help="cycle (default) | sum: how APDM shares its steps among --subjects")
    parser.add_argument("--adaptive", default="", help="classes to run the adaptive attackers on, e.g. person")
    parser.add_argument("--other-identity", type=int, default=None)
    parser.add_argument("--other-seeds", help="attack seeds of the --other-identity check, e.g. 1,2,3 (default: "
                        "--seed); criterion 3 is judged on their mean match rates")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-n", type=int, default=64)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outer-steps", type=int)
    parser.add_argument("--inner-steps", type=int)
    parser.add_argument("--params", help="full (default) | attention | lora")
    parser.add_argument("--lr-protect", type=float, help="protection lr (default: the preset's 3e-4)")
    parser.add_argument("--prior-weight", type=float, help="weight of L_ppl in both paths (default 1)")
    parser.add_argument("--prior-loss", help="ground_truth (default) | distill: L_ppl of the protection loss")
    parser.add_argument("--loss", help="dpo (default) | naive: -L_simple + lambda L_ppl, the baseline the paper rejects")
    parser.add_argument("--beta", type=float, help="DPO beta (default 1)")
    parser.add_argument("--token", default="sks", help="the identifier both the protector and the attacker use")
    parser.add_argument("--positives", type=int, default=0,
                        help="DPO positives: renders of N generator-training identities instead of class images")
    parser.add_argument("--anchors", type=int, default=0,
                        help="L_anchor (beyond the paper): keep phi's denoising of renders of N generator-training identities")
    parser.add_argument("--repair-anchors", type=int, default=0,
                        help="renders of N generator-training identities in the repair only (not in L2P)")
    parser.add_argument("--anchor-weight", type=float, help="weight of L_anchor (default 1)")
    parser.add_argument("--repair-steps", type=int, help="release repair after L2P (default 0); applied to the "
                        "cached unrepaired protected model with the same code (APDM.repair)")
    parser.add_argument("--dpo-max-timestep", type=int, help="DPO on timesteps below this only (default: all)")
    parser.add_argument("--repair-min-timestep", type=int, help="repair on timesteps >= this only (default 0: all)")
    parser.add_argument("--repair-max-timestep", type=int, help="repair on timesteps below this only (default: all)")
    parser.add_argument("--no-l2p", action="store_true", help="ablation: protection gradient at the current weights only")
    parser.add_argument("--simulate-text-encoder", action="store_true",
                        help="the simulated attacker also fine-tunes the text encoder (off by default: measured worse)")
    parser.add_argument("--implant", help="unet (the paper, default) | decoder | both: APDM's blurring decoder guard")
    parser.add_argument("--decoder-blur", type=float, help="the decoder guard's blur sigma / image width (0.0625)")
    parser.add_argument("--decoder-blur-calibrate", nargs="?", const="sandbox",
                        help="pick each subject's blur with this identity backend (default sandbox; see "
                             "noclone protect-model --help)")
    parser.add_argument("--decoder-attack-lengths", help="sample the guard's simulated attacks after these multiples "
                        "of their steps, e.g. 1,2 (default 1)")
    parser.add_argument("--decoder-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="set an APDMConfig decoder_* field, e.g. steps=1200 or lr_schedule=constant (repeatable; "
                             "stop 29's guard: lr_schedule=constant negative_share=0.5 class_samples=0 "
                             "balance_negatives=false)")
    parser.add_argument("--negative-identities", default="10,11",
                        help="with --implant decoder/both: held-out identities of each protected class whose "
                             "DreamBooths the guard must leave alone (keep them apart from --identity/--other-identity)")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from noclone.attacks.base import preset_config
    from noclone.defenses import APDMConfig
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import attack_experiment, base_experiment
    from noclone.sandbox.splits import held_out

    model = model_dir() if args.model == "sandbox" else Path(args.model)
    work = Path(args.out)
    overrides = {k: v for k, v in {"outer_steps": args.outer_steps, "inner_steps": args.inner_steps,
                                   "params": args.params, "lr_protect": args.lr_protect,
                                   "prior_weight": args.prior_weight, "prior_loss": args.prior_loss,
                                   "loss": args.loss, "beta": args.beta, "anchor_weight": args.anchor_weight,
                                   "repair_steps": args.repair_steps,
                                   "repair_min_timestep": args.repair_min_timestep,
                                   "repair_max_timestep": args.repair_max_timestep,
                                   "dpo_max_timestep": args.dpo_max_timestep,
                                   "multi_subject": args.multi_subject, "implant": args.implant,
                                   "decoder_blur": args.decoder_blur,
                                   "decoder_blur_calibrate": args.decoder_blur_calibrate,
                                   "decoder_attack_lengths": tuple(float(x) for x in args.decoder_attack_lengths.split(","))
                                   if args.decoder_attack_lengths else None}.items() if v is not None}
    for item in args.decoder_option:
        field, value = decoder_option(item, parser)
        overrides[field] = value
    if args.simulate_text_encoder:
        overrides["train_text_encoder"] = True
    if args.no_l2p:
        overrides["l2p"] = False
    settings = APDMConfig.preset("quick", seed=args.seed, **overrides)
    try:
        other_seeds = [int(x) for x in args.other_seeds.split(",")] if args.other_seeds else [args.seed]
    except ValueError:
        parser.error(f"--other-seeds {args.other_seeds!r}: give seeds like 1,2,3")
    if len(set(other_seeds)) != len(other_seeds):
        parser.error(f"--other-seeds {args.other_seeds!r}: a seed is repeated")
    rows, quality_rows = [], []
    calibrated: dict[str, dict] = {}  # subject -> its calibrated guard blur (--decoder-blur-calibrate)
    guards: dict[str, dict] = {}  # protected model -> its guard's tries and held-back rates
    joint = None
    if args.subjects:
        try:
            targets = [(c, held_out(int(k))) for c, k in (item.split(":") for item in args.subjects.split(","))]
        except ValueError:
            parser.error(f"--subjects {args.subjects!r}: expected CLASS:K[,CLASS:K...], e.g. person:0,dog:4")
    else:
        targets = [(c, held_out(args.identity)) for c in args.classes.split(",")]
    negative_ids = [held_out(int(i)) for i in args.negative_identities.split(",") if i] if settings.implant != "unet" else []
    if {i for _, i in targets} & set(negative_ids) or (
            args.other_identity is not None and held_out(args.other_identity) in negative_ids):
        parser.error("--negative-identities must not include a protected identity or --other-identity")

    def negatives_for(classes) -> list[tuple[str, int]]:
        return [(c, i) for c in dict.fromkeys(classes) for i in negative_ids]

    if args.subjects:
        (first_class, first_identity), *rest = targets
        joint = protect(model, work, first_class, first_identity, settings, args.positives, args.token, args.anchors,
                        also=rest, repair_anchors=args.repair_anchors, negatives=negatives_for(c for c, _ in targets))
    for n_target, (class_noun, identity) in enumerate(targets):
        protected, protect_seconds = joint or protect(model, work, class_noun, identity, settings, args.positives,
                                                      args.token, args.anchors, repair_anchors=args.repair_anchors,
                                                      negatives=negatives_for([class_noun]))
        guard = json.loads((protected / "protection.json").read_text())["metrics"].get("decoder_guard", {})
        for (c, i), calibration in zip(targets if joint else [(class_noun, identity)], guard.get("blur_calibration", [])):
            calibrated[f"{c}-{i}"] = calibration
        if guard:
            guards[protected.name] = {"tries": guard.get("tries", 1), "kept_try": guard.get("kept_try", 1),
                                      "held_out_rate_after": guard["held_out_rate_after"]}
        attack = preset_config("dreambooth", "sandbox", class_noun=class_noun, seed=args.seed, token=args.token)
        base = base_experiment(model, work, class_noun, identity, attack.instance_prompt, args.n, args.seed, False)
        attackers = [("dreambooth", "dreambooth", attack)]
        if class_noun in args.adaptive.split(","):
            attackers += [
                ("dreambooth 3x lr", "dreambooth", replace(attack, lr=attack.lr * 3)),
                ("dreambooth 2x steps", "dreambooth", replace(attack, steps=attack.steps * 2)),
                ("dreambooth token xyz", "dreambooth", replace(attack, token="xyz")),
                ("lora", "lora", preset_config("lora", "sandbox", class_noun=class_noun, seed=args.seed)),
            ]
        for name, method, config in attackers:
            clean = attack_experiment(model, work, class_noun, identity, method, config, args.n, args.seed, False)
            prot = attack_experiment(protected, work, class_noun, identity, method, config, args.n, args.seed, False)
            rows.append({"class": class_noun, "subject": "protected", "attack": name,
                         "match_unprotected": clean["identity_match_rate"], "match_protected": prot["identity_match_rate"],
                         "ism_unprotected": clean["ism"], "ism_protected": prot["ism"], "base_ism": base["ism"],
                         "fdfr_protected": prot["fdfr"], "protect_seconds": protect_seconds,
                         "attack_seconds": prot["train_seconds"]})
            print(rows[-1], flush=True)
        if args.other_identity is not None and not (joint and n_target > 0):
            other = held_out(args.other_identity)
            for other_seed in other_seeds:  # the attacker's seed: its class images, draws and generations
                other_attack = replace(attack, seed=other_seed)
                clean = attack_experiment(model, work, class_noun, other, "dreambooth", other_attack, args.n,
                                          other_seed, False)
                prot = attack_experiment(protected, work, class_noun, other, "dreambooth", other_attack, args.n,
                                         other_seed, False)
                rows.append({"class": class_noun, "subject": f"other (held-out #{args.other_identity})",
                             "attack": "dreambooth" + (f" seed {other_seed}" if other_seed != args.seed else ""),
                             "match_unprotected": clean["identity_match_rate"],
                             "match_protected": prot["identity_match_rate"], "ism_unprotected": clean["ism"],
                             "ism_protected": prot["ism"], "base_ism": float("nan"), "fdfr_protected": prot["fdfr"],
                             "protect_seconds": protect_seconds, "attack_seconds": prot["train_seconds"]})
                print(rows[-1], flush=True)
        if args.quality and class_noun not in [c for c, _ in targets[:n_target]]:  # one quality row per model and class
            q_base, q_prot = quality(model, work, class_noun, args.quality_n, args.seed), quality(protected, work, class_noun, args.quality_n, args.seed)
            quality_rows.append({"class": class_noun, "detector_base": q_base["detector_rate"],
                                 "detector_protected": q_prot["detector_rate"], "fid_base": q_base["fid"],
                                 "fid_protected": q_prot["fid"]})
            print(quality_rows[-1], flush=True)
    results = json.dumps({"settings": asdict(settings), "rows": rows, "quality": quality_rows,
                          "criteria": criteria(rows, quality_rows), "calibrated_blur": calibrated,
                          "decoder_guards": guards}, indent=2)
    (work / "apdm_results.json").write_text(results)
    text = markdown(rows, quality_rows, settings, args, calibrated, guards)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
        Path(args.markdown).with_suffix(".json").write_text(results)  # for benchmarks/apdm_seeds.py


def decoder_option(item: str, parser) -> tuple[str, object]:
    """'negative_share=0.5' -> ('decoder_negative_share', 0.5), typed after APDMConfig's default."""
    from noclone.defenses import APDMConfig

    field, sep, text = item.partition("=")
    name = "decoder_" + field.strip().removeprefix("decoder_")
    # fields whose None default means "by the number of subjects" take ints
    defaults = APDMConfig().flat() | {"decoder_moved_copies": 0, "decoder_steps": 0, "decoder_tries": 0}
    if not sep or name not in defaults or isinstance(defaults[name], (tuple, type(None))):
        parser.error(f"--decoder-option {item!r}: give FIELD=VALUE with FIELD one of "
                     + ", ".join(k.removeprefix("decoder_") for k, v in defaults.items()
                                 if k.startswith("decoder_") and not isinstance(v, (tuple, type(None)))))
    kind = type(defaults[name])
    if kind is bool:
        if text.lower() not in ("true", "false"):
            parser.error(f"--decoder-option {item!r}: give true or false")
        return name, text.lower() == "true"
    try:
        return name, kind(text)
    except ValueError:
        parser.error(f"--decoder-option {item!r}: {text!r} is not a {kind.__name__}")


ADAPTIVE_LIMIT = 0.20  # criterion 2: the goal for every adaptive attacker's match rate
EPS = 1e-9  # a figure exactly on a limit meets it (0.8 - 0.1 is 0.7000000000000001 in floats)


def adaptive_held(match_protected: float) -> bool:
    """Criterion 2 for one adaptive attacker: its match rate on the protected model is at most ADAPTIVE_LIMIT."""
    return match_protected <= ADAPTIVE_LIMIT + EPS


def other_subject_rows(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(class, other subject) -> its rows, one per attacker seed (--other-seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["subject"] != "protected":
            groups.setdefault((r["class"], r["subject"]), []).append(r)
    return groups


def criteria(rows: list[dict], quality_rows: list[dict]) -> dict[str, dict[str, bool]]:
    """The issue's criteria 1-4 per class, judged on this run's rows (a criterion without its rows is left out)."""
    verdicts: dict[str, dict[str, bool]] = {}
    for r in rows:
        v = verdicts.setdefault(r["class"], {})
        if r["subject"] != "protected":
            continue  # criterion 3, below
        if r["attack"] == "dreambooth":  # 1: <= 10% match rate (from >= 80%), ISM within 0.1 of the base model's
            v["1_protected"] = (r["match_unprotected"] >= 0.80 - EPS and r["match_protected"] <= 0.10 + EPS
                                and abs(r["ism_protected"] - r["base_ism"]) <= 0.10 + EPS)
        else:  # 2: every adaptive attacker at <= 20%
            v["2_adaptive"] = v.get("2_adaptive", True) and adaptive_held(r["match_protected"])
    for (c, _), seeds in other_subject_rows(rows).items():  # 3: another subject within 10 points (seed mean)
        v = verdicts[c]
        v["3_other_subject"] = v.get("3_other_subject", True) and (
            mean(r["match_protected"] for r in seeds) >= mean(r["match_unprotected"] for r in seeds) - 0.10 - EPS)
    for q in quality_rows:  # 4: detector rate within 5 points, sandbox-FID within +15% of the base model's
        verdicts.setdefault(q["class"], {})["4_quality"] = (q["detector_protected"] >= q["detector_base"] - 0.05 - EPS
                                                            and q["fid_protected"] <= 1.15 * q["fid_base"] + EPS)
    return verdicts


def markdown(rows, quality_rows, settings, args, calibrated: dict | None = None, guards: dict | None = None) -> str:
    blur = (f"blur calibrated by {settings.decoder_blur_calibrate} ("
            + ", ".join(f"{k} {v['blur']:g}" for k, v in calibrated.items()) + ")"
            if settings.decoder_blur_calibrate and calibrated else f"blur {settings.decoder_blur:g}")
    guard = (f"; decoder guard ({settings.implant}: {blur}, {settings.decoder_steps or 'default'} steps, "
             f"simulated attacks sampled at {'/'.join(f'{x:g}' for x in settings.decoder_attack_lengths)}x, "
             f"negatives: held-out {args.negative_identities})" if settings.implant != "unet" else "")
    lines = [f"APDM {settings.outer_steps} outer x {settings.inner_steps} inner steps, lr {settings.lr_protect:g}, "
             f"beta {settings.beta:g}, loss {settings.loss}, params {settings.params}, seed {settings.seed}{guard}; "
             f"{args.n} generations per cell.", "",
             "| class | subject | attack | match unprotected | match protected | ISM unprotected | ISM protected | "
             "base ISM | FDFR protected | protect s | attack s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['class']} | {r['subject']} | {r['attack']} | {r['match_unprotected']:.2f} | {r['match_protected']:.2f} | "
              f"{r['ism_unprotected']:.3f} | {r['ism_protected']:.3f} | {r['base_ism']:.3f} | {r['fdfr_protected']:.2f} | "
              f"{r['protect_seconds']:.0f} | {r['attack_seconds']:.0f} |" for r in rows]
    means = [f"- {c}, {subject}, mean over {len(v)} attack seeds: match unprotected "
             f"{mean(r['match_unprotected'] for r in v):.2f}, protected {mean(r['match_protected'] for r in v):.2f}"
             for (c, subject), v in other_subject_rows(rows).items() if len(v) > 1]
    lines += [""] + means if means else []
    if quality_rows:
        lines += ["", f"Generic quality, {args.quality_n} images of 'a photo of a <class>' (sandbox-FID against "
                  f"{args.quality_n} renders of held-out identities):", "",
                  "| class | detector base | detector protected | FID base | FID protected | FID ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {q['class']} | {q['detector_base']:.2f} | {q['detector_protected']:.2f} | {q['fid_base']:.1f} | "
                  f"{q['fid_protected']:.1f} | {q['fid_protected'] / q['fid_base']:.2f} |" for q in quality_rows]
    for name, g in (guards or {}).items():
        after = g["held_out_rate_after"]
        per = "/".join(f"{x:.2f}" for x in after.get("by_subject", [after["subject"]]))
        lines += ["", f"Decoder guard of {name}: kept try {g['kept_try']} of {g['tries']} trained; its held-back "
                  f"clones blurred, per subject: {per}; other held-back latents blurred: {after['others']:.3f}"]
    lines += ["", "Criteria (the APDM issue's 1-4, this seed only): " + "; ".join(
        f"{c}: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in sorted(v.items()))
        for c, v in criteria(rows, quality_rows).items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
