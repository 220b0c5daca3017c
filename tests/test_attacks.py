import json

import pytest
import torch

from noclone.attacks import DreamBooth, LoRA, PersonalizationConfig, TextualInversion
from noclone.attacks.base import build_subject_data, load_subject_images
from noclone.errors import NocloneError
from noclone.training.diffusion import diffusion_loss, encode_prompts, step_generator


def _config(**kw):
    base = dict(class_noun="person", steps=12, batch_size=2, num_class_images=4, class_image_steps=2,
                checkpoint_every=4, progress=False, lr=1e-3)
    base.update(kw)
    return PersonalizationConfig(**base)


@torch.no_grad()
def _instance_loss(pipe, images, config, n=16):
    """Fixed-noise, fixed-timestep diffusion loss of the subject under the instance prompt (lower = learned)."""
    data = build_subject_data(pipe, images, _config(prior_preservation=False))
    cond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [config.instance_prompt]).expand(n, -1, -1)
    g = step_generator(123, 0, "eval")
    return float(diffusion_loss(pipe.unet, pipe.scheduler, data.instance.batch(g, n), cond, g))


@pytest.mark.parametrize("method", [DreamBooth, LoRA, TextualInversion])
def test_attack_lowers_its_training_loss(method, tiny_pipe, subject_dir):
    _, images = load_subject_images(subject_dir)
    config = _config(steps=30, lr={DreamBooth: 1e-3, LoRA: 5e-3, TextualInversion: 0.3}[method])
    before = _instance_loss(tiny_pipe, images, config)
    method(config).train(tiny_pipe, images)
    after = _instance_loss(tiny_pipe, images, config)
    # the evaluation noise is fixed, so any decrease is real; one embedding row moves a random tiny model only a little
    required = 0.998 if method is TextualInversion else 0.95
    assert after < before * required, (before, after)


def test_dreambooth_is_deterministic_and_resume_equals_uninterrupted(tiny_model_dir, subject_dir, tmp_path):
    from noclone.models.pipeline import load_pipeline, model_fingerprint

    _, images = load_subject_images(subject_dir)
    full = load_pipeline(tiny_model_dir)
    DreamBooth(_config()).train(full, images)
    again = load_pipeline(tiny_model_dir)
    DreamBooth(_config()).train(again, images)
    assert model_fingerprint(full) == model_fingerprint(again)

    class Killed(DreamBooth):
        def after_step(self, pipe, step):
            if step == 5:
                raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    interrupted = load_pipeline(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        Killed(_config()).train(interrupted, images, checkpoint_dir=ckpt)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    resumed = load_pipeline(tiny_model_dir)
    DreamBooth(_config()).train(resumed, images, checkpoint_dir=ckpt)
    assert model_fingerprint(resumed) == model_fingerprint(full)
    # a checkpoint from other settings is refused, not silently mixed in
    with pytest.raises(NocloneError, match="other settings"):
        DreamBooth(_config(lr=5e-4)).train(load_pipeline(tiny_model_dir), images, checkpoint_dir=ckpt)


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_lora_reloads_into_stock_pipeline_exactly(tiny_pipe, tiny_model_dir, subject_dir, tmp_path, targets):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    LoRA(_config(steps=4, lr=1e-2, lora_targets=targets)).run(tiny_pipe, subject_dir, tmp_path / "lora")
    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    adapts_convs = any(".conv1." in k for k in keys) and any(".ff.net." in k for k in keys)
    assert adapts_convs == (targets == "all")
    stock = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    stock.set_progress_bar_config(disable=True)

    def image():
        return stock("a photo of sks person", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    plain = image()
    stock.load_lora_weights(str(tmp_path / "lora"))
    assert abs(image() - plain).max() > 1e-3
    # and the reloaded adapter is exactly the trained one (diffusers' old key names lost the conv adapters)
    size = stock.unet.config.sample_size
    x, cond = torch.randn(1, 4, size, size), torch.randn(1, 77, stock.text_encoder.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(stock.unet(x, 10, cond).sample, tiny_pipe.unet(x, 10, cond).sample, atol=1e-5)


def test_lora_targets_are_checked():
    with pytest.raises(NocloneError, match="lora-targets"):
        _config(lora_targets="everything").validate()


def test_lora_with_text_encoder_saves_both_adapters_and_reloads(tiny_pipe, tiny_model_dir, subject_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    text_before = {k: v.clone() for k, v in tiny_pipe.text_encoder.state_dict().items()}
    LoRA(_config(steps=6, lr=1e-2, train_text_encoder=True, text_encoder_lr=5e-2)).run(tiny_pipe, subject_dir, tmp_path / "lora")
    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    # the base text-encoder weights are untouched: only the adapter learned
    base_keys = {k.replace(".base_layer", "") for k in tiny_pipe.text_encoder.state_dict() if "lora_" not in k}
    assert base_keys == set(text_before)

    stock = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True)
    ids = stock.tokenizer(["a photo of sks person"], padding="max_length", max_length=stock.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        plain = stock.text_encoder(ids)[0]
        stock.load_lora_weights(str(tmp_path / "lora"))
        adapted = stock.text_encoder(ids)[0]
    assert (adapted - plain).abs().max() > 1e-4


def test_textual_inversion_changes_only_the_new_token(tiny_pipe, subject_dir, tmp_path):
    original = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    attack = TextualInversion(_config(token="<zq>", steps=5, lr=5e-2))
    attack.run(tiny_pipe, subject_dir, tmp_path / "ti")
    weight = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert weight.shape[0] == original.shape[0] + 1
    assert torch.equal(weight[:-1], original)
    from noclone.models.pipeline import load_pipeline

    reloaded = load_pipeline(tmp_path / "ti")
    assert "<zq>" in reloaded.tokenizer.get_added_vocab()
    assert (tmp_path / "ti" / "learned_embeds.safetensors").is_file()


def test_dreambooth_run_writes_pipeline_and_card(tiny_pipe, subject_dir, tmp_path):
    from noclone.models.pipeline import load_pipeline

    DreamBooth(_config(steps=2)).run(tiny_pipe, subject_dir, tmp_path / "db")
    card = json.loads((tmp_path / "db" / "personalization.json").read_text())
    assert card["method"] == "dreambooth" and len(card["subject_sha256"]) == 4
    load_pipeline(tmp_path / "db")
    assert not (tmp_path / ".db.checkpoint").exists()


def test_bad_settings_are_clear_errors():
    with pytest.raises(NocloneError):
        DreamBooth(_config(steps=0))
    with pytest.raises(NocloneError):
        DreamBooth(_config(token="two words"))
    with pytest.raises(NocloneError):
        DreamBooth(_config(lr=5.0))


def test_class_images_are_cached(tiny_pipe, monkeypatch, tmp_path):
    from noclone import class_images as module

    first = module.class_images(tiny_pipe, "a photo of a person", 3, seed=1, steps=2, cache=tmp_path, progress=False)

    def fail(*a, **k):
        raise AssertionError("regenerated instead of reusing the cache")

    monkeypatch.setattr(module, "generate_to_dir", fail)
    second = module.class_images(tiny_pipe, "a photo of a person", 3, seed=1, steps=2, cache=tmp_path, progress=False)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in second]
    with pytest.raises(AssertionError):
        module.class_images(tiny_pipe, "a photo of a person", 3, seed=2, steps=2, cache=tmp_path, progress=False)
