import json

import pytest
import torch

from noclone.errors import NocloneError
from noclone.models.pipeline import load_pipeline, model_fingerprint, resolve_dtype, save_pipeline, save_single_file


def _out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a person", num_inference_steps=2, generator=g, output_type="np").images


def test_directory_round_trip_loads_in_stock_diffusers(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    with torch.no_grad():
        next(tiny_pipe.unet.parameters()).add_(0.01)  # a "modified" pipeline
    save_pipeline(tiny_pipe, tmp_path / "saved", extra_files={"card.json": json.dumps({"a": 1})})
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"), local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    assert (tmp_path / "saved" / "card.json").is_file()
    assert model_fingerprint(stock) == model_fingerprint(tiny_pipe)
    assert (_out(stock) == _out(tiny_pipe)).all()


def test_single_file_round_trip(tiny_pipe, tmp_path):
    path = save_single_file(tiny_pipe, tmp_path / "model.safetensors")
    loaded = load_pipeline(path)
    assert model_fingerprint(loaded) == model_fingerprint(tiny_pipe)
    assert len(loaded.tokenizer) == len(tiny_pipe.tokenizer)


def test_sd2_v_prediction_round_trip(tmp_path):
    from noclone.models.architectures import build_pipeline
    from noclone.training.diffusion import diffusion_target

    pipe = build_pipeline("tiny-sd2")
    save_pipeline(pipe, tmp_path / "sd2")
    loaded = load_pipeline(tmp_path / "sd2")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.unet.config.use_linear_projection
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    assert not torch.allclose(diffusion_target(loaded.scheduler, latents, noise, t), noise)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2", "sandbox-v2-64-zsnr"])
def test_a_perfect_prediction_converts_back_to_the_noise(preset):
    from noclone.models.architectures import build_scheduler
    from noclone.training.diffusion import diffusion_target, predicted_noise

    scheduler = build_scheduler(preset)
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999])
    noisy = scheduler.add_noise(latents, noise, t)
    recovered = predicted_noise(scheduler, diffusion_target(scheduler, latents, noise, t), noisy, t)
    assert torch.allclose(recovered, noise, atol=1e-4)


def test_pickle_checkpoints_refused(tmp_path, tiny_model_dir):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even a pickle")
    with pytest.raises(NocloneError, match="pickle checkpoint refused"):
        load_pipeline(ckpt)
    # a diffusers directory whose weights are .bin files
    import shutil

    bin_dir = tmp_path / "bin_model"
    shutil.copytree(tiny_model_dir, bin_dir)
    for f in bin_dir.glob("*/*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(NocloneError, match="pickle"):
        load_pipeline(bin_dir)


def test_bad_model_paths(tmp_path):
    with pytest.raises(NocloneError, match="no such model"):
        load_pipeline(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NocloneError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(NocloneError, match="safetensors"):
        load_pipeline(bad)


def test_dtype_policy():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(NocloneError):
        resolve_dtype("fp16", cpu)
    with pytest.raises(NocloneError):
        resolve_dtype("int8", cpu)
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16


def test_sdpa_and_gradient_checkpointing(tiny_model_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_pipeline(tiny_model_dir, gradient_checkpointing=True)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.unet.is_gradient_checkpointing
