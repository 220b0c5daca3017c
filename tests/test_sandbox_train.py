"""The sandbox model's training recipe: identifier captions and the second (identifier) stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from noclone.cli import main
from noclone.sandbox.assets import tokenizer_dir
from noclone.sandbox.train import (
    RESERVED_IDENTIFIERS, SandboxTrainConfig, caption, identifier_pool, train_sandbox_model,
)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir()))


def test_identifier_pool_is_rare_single_tokens_and_never_a_reserved_word(tokenizer):
    pool = identifier_pool(tokenizer, 500, seed=0)
    assert len(pool) == len(set(pool)) == 500 and pool == identifier_pool(tokenizer, 500, seed=0)
    assert pool != identifier_pool(tokenizer, 500, seed=1)
    assert not set(pool) & RESERVED_IDENTIFIERS
    assert not set(pool) & {"a", "photo", "of", "person", "dog", "cat", "portrait"}
    for word in pool[:50]:
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_identifier_captions_bind_one_token_per_identity(tokenizer):
    pool = identifier_pool(tokenizer, 100)
    cfg = SandboxTrainConfig(identifier_prob=1.0, uncond_prob=0.0)
    rng = np.random.default_rng(0)
    first = {caption("dog", 123, rng, cfg, pool).split()[-2] for _ in range(20)}
    assert first == {pool[123 % 100]}
    assert caption("dog", 124, rng, cfg, pool).endswith(f"{pool[124 % 100]} dog")
    plain = SandboxTrainConfig(identifier_prob=0.3, uncond_prob=0.0, attribute_prob=0.0)
    texts = [caption("cat", 7, np.random.default_rng(i), plain, pool) for i in range(400)]
    share = sum(pool[7] in t.split() for t in texts) / len(texts)
    assert 0.2 < share < 0.4
    assert all(pool[7] not in caption("cat", 7, np.random.default_rng(i), plain).split() for i in range(50))


def test_identifier_stage_fine_tunes_an_existing_model(tiny_model_dir, tmp_path):
    from noclone.models.pipeline import load_pipeline

    cfg = SandboxTrainConfig(identities_per_class=2, photos_per_identity=2, unet_batch=2, identifier_steps=2,
                             identifier_pool=20, identifier_prob=1.0, identifier_unet_lr=1.0, identifier_text_lr=1.0)
    out = train_sandbox_model(tmp_path / "model", cfg, work=tmp_path / "work", init_from=tiny_model_dir)
    record = json.loads((out / "sandbox_training.json").read_text())
    assert record["identifier_steps"] == 2 and record["init_from"] == str(tiny_model_dir)
    before, after = load_pipeline(tiny_model_dir), load_pipeline(out)
    changed = [not torch.allclose(a.float(), b.float(), atol=1e-3)
               for a, b in zip(before.unet.parameters(), after.unet.parameters())]
    assert any(changed)
    assert torch.equal(before.vae.decoder.conv_out.weight.half().float(), after.vae.decoder.conv_out.weight.float())
    assert (tmp_path / "work" / "identifiers-ckpt" / "state.json").is_file()


def test_sandbox_train_cli_refuses_init_from_without_a_second_stage(tmp_path, capsys):
    assert main(["sandbox", "train", "--out", str(tmp_path / "m"), "--init-from", "sandbox"]) != 0
    assert "--identifier-steps" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    for bad in ("0", "1.5", "nan"):
        assert main(["sandbox", "train", "--out", str(tmp_path / "m"), "--init-from", "sandbox", "--identifier-steps",
                     "5", "--identifier-prob", bad]) != 0
        assert "--identifier-prob" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_one_to_one_binding_oversamples_the_bound_identities():
    from noclone.sandbox.train import _bound_photos, _one_to_one_batch

    labels = [("dog", 10)] * 3 + [("dog", 11)] * 3 + [("cat", 20)] * 3 + [("cat", 21)] * 3 + [("person", 30)] * 3
    assert _bound_photos(labels, 5) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    bound = _bound_photos(labels, 2)
    assert bound == [[0, 1, 2], [6, 7, 8]]  # spread over the dataset (dog and cat), not its first identities
    cfg = SandboxTrainConfig(identifier_prob=0.5, uncond_prob=0.0, attribute_prob=0.0)
    idx, prompts = _one_to_one_batch([13] * 400, labels, np.random.default_rng(0), cfg, ["vape", "oath"], bound)
    for j, text in zip(idx, prompts):
        if "vape" in text.split():
            assert j in bound[0] and text.endswith("vape dog")
        elif "oath" in text.split():
            assert j in bound[1] and text.endswith("oath cat")
        else:
            assert j == 13 and text.endswith("person") and "vape" not in text and "oath" not in text
    assert 0.4 < sum(j != 13 for j in idx) / len(idx) < 0.6


# ------------------------------------------------------------------------------------------------ sandbox v2


def test_v2_captions_name_the_photo_and_bind_tokens_one_to_one(tokenizer):
    from noclone.sandbox.render import photo_attributes
    from noclone.sandbox.train import bound_identifiers, caption_v2

    cfg = SandboxTrainConfig.preset("v2", uncond_prob=0.0, identifier_prob=1.0, identifier_bound=3)
    labels = [("dog", 5)] * 2 + [("cat", 9)] * 2 + [("person", 1)] * 2 + [("dog", 77)] * 2
    bound = bound_identifiers(tokenizer, labels, cfg)
    assert list(bound) == [("dog", 5), ("cat", 9), ("person", 1)] and len(set(bound.values())) == 3
    text = caption_v2("dog", 5, 1, np.random.default_rng(0), cfg, bound[("dog", 5)])
    assert f"{bound[('dog', 5)]} dog" in text
    assert "a dog" in caption_v2("dog", 77, 1, np.random.default_rng(0), cfg, bound.get(("dog", 77)))
    said = set()
    for seed in range(200):
        said |= {a for a in photo_attributes("cat", 9, 3) if a in caption_v2("cat", 9, 3, np.random.default_rng(seed), cfg)}
    assert said == set(photo_attributes("cat", 9, 3))  # every phrase of this photo is said sometimes ...
    other = set(photo_attributes("cat", 9, 4)) - set(photo_attributes("cat", 9, 3))
    assert not any(a in caption_v2("cat", 9, 3, np.random.default_rng(s), cfg) for s in range(50) for a in other)
    empty = SandboxTrainConfig.preset("v2", uncond_prob=1.0)
    assert caption_v2("cat", 9, 3, np.random.default_rng(0), empty) == ""


def test_v2_architecture_is_sd_shaped_at_128_px():
    from noclone.models.architectures import build_pipeline

    pipe = build_pipeline("sandbox-v2")
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128 and pipe.unet.config.layers_per_block == 2
    size_mb = sum(p.numel() for p in pipe.unet.parameters()) * 2 / 1e6 + sum(p.numel() for p in pipe.vae.parameters()) * 2 / 1e6 \
        + sum(p.numel() for p in pipe.text_encoder.parameters()) * 4 / 1e6
    assert size_mb < 60  # as written: UNet and VAE fp16, text encoder fp32


def test_v2_64_is_v2s_denoiser_and_text_encoder_on_v1s_vae():
    from noclone.models.architectures import PRESETS, resolution

    v1, v2, v2_64 = PRESETS["sandbox"], PRESETS["sandbox-v2"], PRESETS["sandbox-v2-64"]
    assert v2_64["vae"] == v1["vae"] and resolution("sandbox-v2-64") == resolution("sandbox") == 64
    assert v2_64["unet"] == v2["unet"] and v2_64["text"] == v2["text"]
    cfg = SandboxTrainConfig.preset("v2-64")
    assert cfg.caption_style == "v2" and cfg.identifier_bound == 1000 and cfg.resolution == 64
    assert (cfg.unet_steps, cfg.unet_batch) == (SandboxTrainConfig().unet_steps, SandboxTrainConfig().unet_batch)


def test_v2_training_stops_on_its_budget_writes_a_usable_model_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = SandboxTrainConfig.preset("v2", architecture="tiny", identities_per_class=3, photos_per_identity=2,
                                    vae_steps=2, vae_batch=4, unet_steps=4, unet_batch=4, identifier_bound=2,
                                    max_shard_size="1MB", minutes=0.01)
    out = train_sandbox_model(tmp_path / "model", cfg, work=tmp_path / "work")
    record = json.loads((out / "sandbox_training.json").read_text())
    assert record["complete"] is False and 1 <= record["denoiser_steps_done"] < 4
    shards = list((out / "unet").glob("*.safetensors"))
    assert len(shards) > 1 and all(f.stat().st_size < 1.1e6 for f in shards)  # the UNet is split below the size
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="np")
    out = train_sandbox_model(tmp_path / "model", replace_minutes(cfg), work=tmp_path / "work")
    record = json.loads((out / "sandbox_training.json").read_text())
    assert record["complete"] is True and record["denoiser_steps_done"] == 4


def replace_minutes(cfg):
    from dataclasses import replace

    return replace(cfg, minutes=None)


def test_cli_sandbox_train_v2_refusals(tmp_path, capsys):
    assert main(["sandbox", "train", "--out", str(tmp_path / "m"), "--preset", "v2", "--minutes", "0"]) == 2
    assert "--minutes" in capsys.readouterr().err


def test_zsnr_world_is_v2_64_with_v_prediction_sampled_from_zero_terminal_snr():
    from diffusers import DPMSolverMultistepScheduler

    from noclone.models.architectures import PRESETS, build_scheduler

    assert {k: v for k, v in PRESETS["sandbox-v2-64-zsnr"].items() if k not in ("prediction_type", "schedule")} == \
        {k: v for k, v in PRESETS["sandbox-v2-64"].items() if k != "prediction_type"}
    scheduler = build_scheduler("sandbox-v2-64-zsnr")
    assert scheduler.config.prediction_type == "v_prediction" and float(scheduler.alphas_cumprod[-1]) == 0.0
    assert float(build_scheduler("sandbox-v2-64").alphas_cumprod[-1]) > 1e-3  # SD's schedule leaves signal at t = T
    sampler = DPMSolverMultistepScheduler.from_config(scheduler.config)
    sampler.set_timesteps(25)
    assert int(sampler.timesteps[0]) == 999  # sampling starts where no signal is left
    cfg = SandboxTrainConfig.preset("v2-64-zsnr")
    assert cfg.snr_gamma is None and cfg.caption_style == "v2" and cfg.resolution == 64


def test_continuing_a_model_trains_and_writes_the_presets_noise_schedule(tiny_model_dir, tmp_path, monkeypatch):
    from noclone.models import architectures
    from noclone.models.pipeline import load_pipeline

    monkeypatch.setitem(architectures.PRESETS, "tiny-zsnr", {**architectures.PRESETS["tiny"], **{
        k: architectures.PRESETS["sandbox-v2-64-zsnr"][k] for k in ("prediction_type", "schedule")}})
    cfg = SandboxTrainConfig.preset("v2-64-zsnr", architecture="tiny-zsnr", identities_per_class=2,
                                    photos_per_identity=2, unet_steps=2, unet_batch=2, identifier_bound=2)
    out = train_sandbox_model(tmp_path / "model", cfg, work=tmp_path / "work", init_from=tiny_model_dir)
    assert load_pipeline(tiny_model_dir).scheduler.config.prediction_type == "epsilon"
    written = load_pipeline(out).scheduler.config
    assert written.prediction_type == "v_prediction" and written.rescale_betas_zero_snr and \
        written.timestep_spacing == "trailing"
    record = json.loads((out / "sandbox_training.json").read_text())
    assert record["complete"] is True and record["denoiser_steps_done"] == 2 and record["snr_gamma"] is None
