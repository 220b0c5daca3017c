"""The shipped sandbox model: stock-loadable, small, generates its classes, and personalizes."""

import pytest
import torch

from noclone.sandbox.assets import model_dir


def test_shipped_model_is_small_and_stock_loadable():
    """UNet and VAE stored fp16, the text encoder fp32 (stock default loading then gives fp32 everywhere: see
    tests/test_stock_loading.py)."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    root = model_dir()
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 40 * 2**20, size
    for weights in root.glob("*/*.safetensors"):
        stored = "F32" if weights.parent.name == "text_encoder" else "F16"
        with safe_open(str(weights), framework="pt") as f:
            assert all(f.get_slice(k).get_dtype() == stored for k in f.keys()), weights
    pipe = StableDiffusionPipeline.from_pretrained(str(root), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("name, init_from", [("sandbox-v2-64", None), ("sandbox-v2-64-zsnr", "model-v2-64")])
def test_shipped_v2_64_candidates_are_stock_loadable_split_and_recorded(name, init_from):
    """The candidate worlds: under 60 MB, every file below 16 MB, stock-loadable, recorded as trained (the zsnr
    world continues v2-64's weights under its own noise schedule)."""
    import json

    from diffusers import StableDiffusionPipeline

    from noclone.models.architectures import PRESETS

    root = model_dir(name)
    files = [f for f in root.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 60 * 2**20 and max(f.stat().st_size for f in files) < 16 * 2**20
    record = json.loads((root / "sandbox_training.json").read_text())
    assert record["architecture"] == name and record["denoiser_steps_done"] > 0
    assert (record["init_from"] or "").endswith(init_from or "") and (record["init_from"] is None) == (init_from is None)
    pipe = StableDiffusionPipeline.from_pretrained(str(root), local_files_only=True, torch_dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == PRESETS[name]["prediction_type"]
    assert pipe.unet.config.layers_per_block == PRESETS[name]["unet"]["layers_per_block"] == 2
    assert pipe.vae.config.latent_channels == 8 and model_dir("sandbox") != root  # not the default world
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a dog", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_sandbox_model_cli_writes_standalone_copy(tmp_path):
    from noclone.cli import main
    from noclone.models.pipeline import load_pipeline, model_fingerprint

    assert main(["-q", "sandbox", "model", "--out", str(tmp_path / "m")]) == 0
    assert model_fingerprint(load_pipeline(tmp_path / "m")) == model_fingerprint(load_pipeline(model_dir()))


def test_short_dreambooth_raises_identity_similarity(tmp_path):
    from noclone.attacks import PersonalizationConfig
    from noclone.sandbox.experiment import attack_experiment, base_experiment
    from noclone.sandbox.splits import held_out

    identity = held_out(11)
    config = PersonalizationConfig(class_noun="dog", steps=100, num_class_images=16, progress=False)
    base = base_experiment(model_dir(), tmp_path, "dog", identity, config.instance_prompt, n=8, progress=False)
    attacked = attack_experiment(model_dir(), tmp_path, "dog", identity, "dreambooth", config, n=8, progress=False)
    assert attacked["ism"] > base["ism"] + 0.05, (base["ism"], attacked["ism"])


@pytest.mark.parametrize("class_noun", ["person", "dog", "cat"])
def test_base_model_generates_the_prompted_class(class_noun):
    """The sandbox evaluator's detector finds the prompted class in most generations (64 images: 0.88-0.95)."""
    from noclone.generation import GenerationConfig, sample
    from noclone.models.pipeline import load_pipeline
    from noclone.sandbox.evaluator import load_default_evaluator

    pipe = load_pipeline(model_dir())
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe, f"a photo of a {class_noun}", list(range(16)), GenerationConfig(n=16, steps=20))
    rate = load_default_evaluator().detect(images, class_noun).mean()
    assert rate >= 0.7, rate


def test_sandbox_v1_pins_the_shipped_v1_everywhere(tmp_path, tiny_model_dir):
    """'sandbox-v1' names the shipped v1 model for every --model (the default 'sandbox' may move on)."""
    from noclone.bench import stages
    from noclone.bench.config import validate
    from noclone.errors import NocloneError
    from noclone.sandbox.assets import is_shipped, model_dir, model_path

    assert model_path("sandbox-v1") == model_dir("sandbox-v1") and (model_path("sandbox-v1") / "model_index.json").is_file()
    assert model_path(str(tiny_model_dir)) == tiny_model_dir and not is_shipped(str(tiny_model_dir))
    with pytest.raises(NocloneError, match="sandbox-v1"):
        model_dir("sandbox-v9")
    cache = stages.Cache(tmp_path / "cache")
    assert stages.model_ref(cache, "sandbox-v1").path == model_dir("sandbox-v1")
    config = validate({"models": ["sandbox-v1"], "subjects": [{"class": "person", "identity": 3}],
                       "defences": ["none"], "attacks": ["none"]})
    assert config.models[0].path == "sandbox-v1" and config.models[0].name == "sandbox-v1"
