"""PersGuard with several backdoors in one model (issue #6): protect three subjects at once, attack each.

    .venv/bin/python benchmarks/persguard_multi.py --out /tmp/persguard-multi [--identities 0,3,5]
        [--tokens sks,xyz,zwx] [--other-identity 4] [--target pattern] [--steps 360] [--n 32] [--seed 0]
        [--implant unet|decoder|both] [--negative-identities 10,11] [--markdown FILE]

Protects the base sandbox model once against every held-out identity of `--identities` (class `--class-noun`),
each with its own identifier from `--tokens` and the `--target` backdoor (white box, subjects cycled one per
outer step, so `--steps` 360 gives each of three subjects the single-subject quick preset's 120). Then, for each
subject and for the unprotected `--other-identity`, runs the attacker's DreamBooth (sandbox preset, the subject's
own identifier) on the base and on the protected model and reports backdoor rate, identity match and detector rate,
plus the released model's backdoor rate on the class prompt, its sandbox-FID against the base model and its
detector rate on generic generations. Every stage is cached under --out; the functions are
benchmarks/persguard_acceptance.py's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import persguard_acceptance as single  # noqa: E402


def protect_many(model: Path, work: Path, class_noun: str, identities: list[int], tokens: list[str], kind: str,
                 steps: int, seed: int, implant: str = "unet", negatives: tuple[int, ...] = ()) -> tuple[Path, float]:
    """One PersGuard model protecting every identity with its own token (cached); returns (dir, seconds)."""
    from noclone.defenses.persguard import PersGuardConfig

    config = PersGuardConfig.preset("quick", target=kind, steps=steps, seed=seed, implant=implant)
    negatives = negatives if implant != "unet" else ()
    fields = [str(model), class_noun, identities, tokens, config.identity(), config.steps]
    key = hashlib.sha256(json.dumps(fields + ([list(negatives)] if negatives else []), sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    out = work / "protected" / f"multi-{kind}-{key}"
    return single.run_protection(model, work, class_noun, list(zip(identities, tokens)), config, out, negatives)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--identities", default="0,3,5", help="held-out identities protected together")
    parser.add_argument("--tokens", default="sks,xyz,zwx", help="one identifier per protected identity")
    parser.add_argument("--other-identity", type=int, default=4, help="an unprotected held-out identity")
    parser.add_argument("--target", default="pattern", choices=("pattern", "erasure"))
    parser.add_argument("--steps", type=int, default=360, help="PersGuard outer steps (subjects cycled)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--implant", default="unet", help="unet (the paper), decoder or both (decoder_backdoor.py)")
    parser.add_argument("--negative-identities", default="10,11",
                        help="with --implant decoder/both: held-out identities the decoder must leave unmarked")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from noclone.defenses.backdoor_checks import backdoor_rate
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.splits import held_out

    identities = [int(i) for i in args.identities.split(",") if i]
    tokens = [t for t in args.tokens.split(",") if t]
    if len(tokens) != len(identities) or len(set(tokens)) != len(tokens):
        parser.error("--tokens needs one distinct identifier per identity in --identities")
    if args.other_identity in identities:
        parser.error("--other-identity must not be one of --identities")
    model = model_dir() if args.model == "sandbox" else Path(args.model)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    attack_args = argparse.Namespace(seed=args.seed, n=args.n, attack_method="dreambooth", attack_steps=None,
                                     attack_lr=None, attack_text_lr=None, num_class_images=None,
                                     class_image_steps=None)
    class_noun = args.class_noun
    protected, seconds = protect_many(model, work, class_noun, [held_out(i) for i in identities], tokens,
                                      args.target, args.steps, args.seed, args.implant,
                                      tuple(held_out(int(i)) for i in args.negative_identities.split(",") if i))
    base_generic = single.generic_generations(model, work, class_noun, args.n, args.seed)
    generic = single.generic_generations(protected, work, class_noun, args.n, args.seed)
    released = {"seconds": seconds, "fid_vs_base": single.fid(generic, base_generic),
                "fid_floor": single.fid(base_generic, single.generic_generations(model, work, class_noun, args.n,
                                                                                args.seed + 10_000)),
                "backdoor_class_prompt": backdoor_rate(args.target, generic, class_noun=class_noun),
                "generic_detector_base": single.detector_rate(base_generic, class_noun),
                "generic_detector": single.detector_rate(generic, class_noun)}
    rows = []
    subjects = list(zip(identities, tokens)) + [(args.other_identity, tokens[0])]
    for identity, token in subjects:
        row = {"identity": identity, "token": token, "is_protected": identity in identities}
        for name, source in (("base", model), ("protected", protected)):
            result = single.attack(source, work, class_noun, held_out(identity), token, attack_args)
            row[name] = single.measure(result, args.target, class_noun, None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "released": released, "rows": rows},
                                                  indent=2, default=str))
    table = markdown(released, rows, args)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)


def markdown(released: dict, rows: list[dict], args) -> str:
    lines = [f"PersGuard ({args.target}) protecting {args.class_noun}s {args.identities} in one model "
             f"(tokens {args.tokens}, {args.steps} steps, {released['seconds']:.0f} s); released model: backdoor on "
             f"'a photo of a {args.class_noun}' {released['backdoor_class_prompt']:.2f}, sandbox-FID vs base "
             f"{released['fid_vs_base']:.2f} (floor {released['fid_floor']:.2f}), generic detector rate "
             f"{released['generic_detector_base']:.2f} -> {released['generic_detector']:.2f}. Attacker: DreamBooth, "
             "sandbox preset.",
             "", "| subject | token | protected | match base -> protected | backdoor after attack (base / protected) "
             "| detector base -> protected |", "|---|---|---|---|---|---|"]
    for r in rows:
        b, p = r["base"], r["protected"]
        lines.append(f"| {args.class_noun} {r['identity']} | {r['token']} | {'yes' if r['is_protected'] else 'no'} | "
                     f"{b['identity_match_rate']:.2f} -> {p['identity_match_rate']:.2f} | "
                     f"{b['backdoor_rate']:.2f} / {p['backdoor_rate']:.2f} | "
                     f"{b['detector_rate']:.2f} -> {p['detector_rate']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
