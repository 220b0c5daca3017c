"""Score decoder-guard VAEs on the attacks an `apdm_acceptance.py` run already made on the *unprotected* model,
without re-running any attack: each attack's 32 generations are sampled once as latents (cached in
WORK/probe-latents), then decoded by the input model's VAE and by each guarded VAE, and measured.

    .venv/bin/python benchmarks/apdm_guard_probe.py --work /tmp/apdm-acc --seed 0 --quality \\
        --vae /tmp/apdm-acc/protected/<model>/vae [/path/to/another/vae ...]

Why it works: `--implant decoder` changes only the VAE decoder, so an attack on the guarded model trains the same
UNet and text encoder from the same start; the one difference is its prior-preservation class images, which the
guarded decoder draws. The probe skips that difference. Measured against the full benchmark (docs/research/decoder-guard.md,
stop 30): exact for generic quality (the same latents), within one generation for the protected subject, and for
another subject at seed 1 0.75 (probe) against 0.59 (full) for a person and 0.31 against 0.31 for a dog. Stop 31
showed the skipped class images are what costs another subject (the guard softened them), so judge another subject
with the full benchmark. Use the probe for the protected subject and generic quality.

Per attack and VAE it prints (identity match rate, ISM, median PSNR in dB against the input VAE's decoding);
with --quality, per class (detector rate, sandbox-FID, PSNR) of 64 'a photo of a <class>' generations.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def vae_label(path: str) -> str:
    """A short name for a VAE folder: its own name, or its model's for a pipeline's vae/."""
    parts = Path(path).resolve().parts
    return parts[-2] if parts[-1] == "vae" else parts[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="an apdm_acceptance.py --out folder")
    parser.add_argument("--vae", nargs="+", required=True, help="guarded VAE folders (diffusers AutoencoderKL)")
    parser.add_argument("--model", default="sandbox", help="the unprotected model the attacks ran on")
    parser.add_argument("--seed", type=int, default=0, help="the acceptance run's --seed")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-n", type=int, default=64)
    parser.add_argument("--only", default="", help="a regex on attack folder names")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    from noclone.data.images import tensor_to_images
    from noclone.defenses.decoder_backdoor import decode
    from noclone.eval.evaluate import sandbox_scores
    from noclone.generation import GenerationConfig, sample_latents
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.assets import model_dir
    from noclone.sandbox.experiment import model_tag, reference_photos
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    work = Path(args.work)
    base = model_dir() if args.model == "sandbox" else Path(args.model)
    tag = model_tag(base)
    cache = work / "probe-latents"
    cache.mkdir(exist_ok=True)
    vaes = {"input": AutoencoderKL.from_pretrained(str(base / "vae")).float().eval()}
    vaes |= {vae_label(v): AutoencoderKL.from_pretrained(v).float().eval() for v in args.vae}

    def latents(name: str, load, prompt: str, seed: int, n: int) -> torch.Tensor:
        path = cache / f"{name}-{n}.safetensors"
        if not path.is_file():
            z = sample_latents(load(), prompt, list(range(seed, seed + n)), GenerationConfig(n=n, seed=seed))
            save_file({"z": z.contiguous()}, str(path))
        return load_file(str(path))["z"]

    def measured(z: torch.Tensor, score) -> dict:
        plain = decode(vaes["input"], z)
        out = {}
        for label, vae in vaes.items():
            x = decode(vae, z)
            psnr = (10 * torch.log10(4 / (x - plain).pow(2).flatten(1).mean(1).clamp_min(1e-10))).median()
            out[label] = [*score(tensor_to_images(x)), round(float(psnr), 1)]
        return out

    results: dict[str, dict] = {}
    pattern = re.compile(rf"{re.escape(tag)}-([a-z]+)-(\d+)-(dreambooth|lora)-([0-9a-f]+)-(\d+)")
    for folder in sorted((work / "attacks").iterdir()):
        m = pattern.fullmatch(folder.name)
        if not m or (args.only and not re.search(args.only, folder.name)):
            continue
        class_noun, identity, method = m.group(1), int(m.group(2)), m.group(3)
        prompt = json.loads((folder / "personalization.json").read_text())["instance_prompt"]

        def load(folder=folder, method=method):
            if method == "dreambooth":
                return load_pipeline(folder)
            from noclone.models.pipeline import load_lora

            pipe = load_pipeline(base)
            load_lora(pipe, str(folder))
            return pipe

        refs = reference_photos(work, class_noun, identity)

        def identity_scores(images, refs=refs, class_noun=class_noun):
            s = sandbox_scores(images, refs, class_noun, ("ism",))
            return round(s["identity_match_rate"], 3), round(s["ism"], 3)

        key = folder.name[len(tag) + 1:]
        results[key] = measured(latents(folder.name, load, prompt, args.seed + 1000, args.n), identity_scores)
        print(key, results[key], flush=True)
    if not results:
        parser.error(f"{work / 'attacks'}: no attack on {tag} to probe")
    if args.quality:
        for class_noun in sorted({k.split("-")[0] for k in results}):
            renders = [render(class_noun, held_out(500 + i), 0) for i in range(args.quality_n)]

            def quality_scores(images, renders=renders, class_noun=class_noun):
                s = sandbox_scores(images, renders, class_noun, ("fdfr", "fid"))
                return round(1 - s["fdfr"], 3), round(s["fid"], 3)

            z = latents(f"quality-{tag}-{class_noun}", lambda: load_pipeline(base), f"a photo of a {class_noun}",
                        args.seed + 5000, args.quality_n)
            results[f"quality-{class_noun}"] = measured(z, quality_scores)
            print(f"quality-{class_noun}", results[f"quality-{class_noun}"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
