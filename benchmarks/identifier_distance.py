"""How far a model's text encoder puts an identifier prompt from its class prompt.

    .venv/bin/python benchmarks/identifier_distance.py [--model sandbox] [--class-noun person]
        [--tokens sks,xyz,qzv,ohwx] [--words old,smiling,glasses]

Prints the relative L2 distance ||c(p) - c(q)|| / ||c(q)|| of the encoder's hidden states (all 77 positions, as the
UNet sees them) between "a photo of <token> <class>" and "a photo of a <class>", next to other classes for scale.
An identifier can only carry a subject apart from its class if this distance is not ~0 (DreamBooth, APDM and
PersGuard all rely on it).
"""

from __future__ import annotations

import argparse

import torch


def relative_distance(text_encoder, tokenizer, prompt: str, reference: str) -> float:
    from noclone.training.diffusion import encode_prompts

    with torch.no_grad():
        a, b = encode_prompts(text_encoder, tokenizer, [prompt, reference])
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sandbox")
    parser.add_argument("--class-noun", default="person")
    parser.add_argument("--tokens", default="sks,xyz,qzv,ohwx")
    parser.add_argument("--words", default="old,smiling,glasses")
    args = parser.parse_args()

    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir

    pipe = load_pipeline(model_dir() if args.model == "sandbox" else args.model, dtype="fp32")
    reference = f"a photo of a {args.class_noun}"
    rows = [(f"a photo of {t} {args.class_noun}", "identifier") for t in args.tokens.split(",") if t]
    rows += [(f"a photo of {w} {args.class_noun}", "word") for w in args.words.split(",") if w]
    rows += [(f"a photo of a {c}", "other class") for c in ("person", "dog", "cat") if c != args.class_noun]
    print(f"| prompt | kind | relative L2 to '{reference}' |\n|---|---|---|")
    for prompt, kind in rows:
        print(f"| {prompt} | {kind} | {relative_distance(pipe.text_encoder, pipe.tokenizer, prompt, reference):.3f} |")


if __name__ == "__main__":
    main()
