"""Every pipeline noclone writes loads in stock diffusers with default arguments, the way users and diffusers' own
DreamBooth script (examples/dreambooth/train_dreambooth.py) load it: one dtype (fp32) for every component.

Stock default loading mixes two policies: diffusers loads its models (UNet, VAE) in fp32 whatever their stored dtype,
transformers 5 loads a model in its saved dtype. A text encoder written in fp16/bf16 therefore meets an fp32 UNet
("mat1 and mat2 must have the same dtype"), and the DreamBooth script refuses it for --train_text_encoder
("Text encoder loaded as datatype torch.float16"). `save_pipeline` writes the text encoder in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noclone.cli import main


def _stock_loads_and_generates(folder, size: int) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # the DreamBooth script's loading: each component from its subfolder, default arguments, must be fp32
    assert UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").dtype == torch.float32
    assert CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").dtype == torch.float32
    assert AutoencoderKL.from_pretrained(str(folder), subfolder="vae").dtype == torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe("a photo of sks person", num_inference_steps=2, height=size, width=size, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()


def test_sandbox_model_export_loads_stock(tmp_path):
    out = tmp_path / "sandbox"
    assert main(["-q", "sandbox", "model", "--out", str(out)]) == 0
    _stock_loads_and_generates(out, 64)


def test_save_pipeline_from_bf16_pipeline_loads_stock_with_the_same_values(tiny_pipe, tmp_path):
    from noclone.models.pipeline import load_pipeline, save_pipeline

    pipe = tiny_pipe.to(torch.bfloat16)
    save_pipeline(pipe, tmp_path / "bf16")
    _stock_loads_and_generates(tmp_path / "bf16", 32)
    assert pipe.text_encoder.dtype == torch.bfloat16  # the pipeline in memory is left as it was
    loaded = load_pipeline(tmp_path / "bf16", dtype="bf16")  # our loader: the saved values exactly
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name


def test_personalized_model_loads_stock(tiny_model_dir, subject_dir, tmp_path):
    out = tmp_path / "db"
    assert main(["-q", "personalize", "--model", str(tiny_model_dir), "--images", str(subject_dir), "--class-noun",
                 "person", "--method", "dreambooth", "--train-text-encoder", "--dtype", "bf16", "--steps", "2",
                 "--num-class-images", "2", "--out", str(out)]) == 0
    _stock_loads_and_generates(out, 32)


def test_sandbox_training_output_loads_stock(tiny_model_dir, tmp_path):
    from noclone.sandbox.train import SandboxTrainConfig, train_sandbox_model

    cfg = SandboxTrainConfig(identities_per_class=2, photos_per_identity=2, unet_batch=2, identifier_steps=1,
                             identifier_pool=20)
    out = train_sandbox_model(tmp_path / "model", cfg, work=tmp_path / "work", init_from=tiny_model_dir)
    _stock_loads_and_generates(out, 32)


def test_the_check_catches_a_half_precision_text_encoder(tiny_pipe, tmp_path):
    """What save_pipeline used to write (a plain save_pretrained of a half-precision pipeline) fails the check."""
    tiny_pipe.to(torch.bfloat16).save_pretrained(str(tmp_path / "old"), safe_serialization=True)
    with pytest.raises(AssertionError):
        _stock_loads_and_generates(tmp_path / "old", 32)
