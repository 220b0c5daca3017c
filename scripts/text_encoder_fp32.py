"""Rewrite a diffusers pipeline directory's text encoder with fp32 weights (values upcast exactly, nothing retrained).

    .venv/bin/python scripts/text_encoder_fp32.py [DIR]      # default: the shipped sandbox model

Used once on src/noclone/sandbox/weights/model (issue 40): its fp16 text encoder loaded as fp16 under transformers 5's
default arguments while diffusers loads the UNet and VAE in fp32, so stock `StableDiffusionPipeline.from_pretrained`
failed. File names are kept; the script checks that every tensor equals the stored one upcast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import CLIPTextModel

from noclone.models.pipeline import write_text_encoder_fp32
from noclone.sandbox.assets import model_dir


def main(folder: Path) -> None:
    sub = folder / "text_encoder"
    weights = sorted(sub.glob("*.safetensors"))
    before = {k: v for f in weights for k, v in load_file(str(f)).items()}
    size_before = sum(f.stat().st_size for f in weights)
    if all(v.dtype == torch.float32 for v in before.values() if v.is_floating_point()):
        print(f"{sub}: already fp32")
        return
    model = CLIPTextModel.from_pretrained(str(sub), dtype="auto")
    write_text_encoder_fp32(model, sub)
    after = {k: v for f in sorted(sub.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert before.keys() == after.keys(), "tensor names changed"
    for key, old in before.items():
        new = after[key]
        assert new.dtype == (torch.float32 if old.is_floating_point() else old.dtype), key
        assert torch.equal(new, old.to(new.dtype)), f"{key}: values changed"
    print(f"{sub}: {len(after)} tensors upcast to fp32, values unchanged "
          f"({size_before} -> {sum(f.stat().st_size for f in sub.glob('*.safetensors'))} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else model_dir())
