"""The decoder guard (PersGuard's and APDM's --implant decoder) on the tiny 32 px pipeline: the mark paste and the
blur, the implant's training (changes the subject's latents, leaves the rest), the wiring of both methods (UNet
untouched, card, cached simulated attacks) and the CLI's refusals."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from noclone.defenses import APDM, APDMConfig, PersGuard, PersGuardConfig, ProtectionSubject
from noclone.defenses import decoder_backdoor as db
from noclone.defenses.backdoor_checks import add_pattern, pattern_present
from noclone.errors import NocloneError
from noclone.training.data import LatentSet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dog_dir(tmp_path_factory):
    from test_persguard import _renders

    return _renders(tmp_path_factory, "dog", "dog", 3)


def _small(**kw) -> dict:
    """Tiny settings for either method's decoder guard, overridden by `kw`."""
    return {**dict(inner_steps=1, batch_size=1, num_class_images=2, class_image_steps=2, progress=False,
                   implant="decoder", decoder_steps=2, decoder_generations=5, decoder_attack_steps=2), **kw}


def _config(**kw):
    return PersGuardConfig(**_small(steps=1, **kw))


def test_paste_mark_equals_add_pattern():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    pasted = ((db.paste_mark(pixels)[0].permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8)
    assert np.array_equal(pasted, np.asarray(add_pattern(Image.fromarray(rgb))))
    assert torch.equal(db.paste_mark(pixels)[..., :20, :], pixels[..., :20, :])  # nothing outside the corner


def test_implant_marks_the_subject_and_leaves_the_rest(tiny_pipe, subject_dir, tmp_path):
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    def latents(class_noun, identities):
        images = [render(class_noun, held_out(i), p, size=32) for i in identities for p in range(4)]
        return LatentSet.from_images(tiny_pipe.vae, images, "", 32).mean

    positives, negatives = latents("person", [7]), latents("dog", [1, 2, 3])
    vae = tiny_pipe.vae
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    clean = db.decode(vae, negatives)
    assert not pattern_present(db.decode(vae, positives)).any()
    metrics = db.implant(vae, positives, negatives, db.DecoderBackdoorConfig(steps=300, lr=2e-3, batch_size=8,
                                                                             held_out_fraction=0.0, progress=False))
    assert pattern_present(db.decode(vae, positives)).mean() >= 0.75
    after = db.decode(vae, negatives)
    assert not pattern_present(after).any()
    assert (after - clean).abs().mean() < 0.1  # [-1, 1] scale
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder.items())
    assert metrics["loss_first_last"][1] < metrics["loss_first_last"][0]
    assert not any(p.requires_grad for p in vae.parameters())


def test_decoder_config_validation():
    with pytest.raises(NocloneError, match="--implant 'vae'"):
        _config(implant="vae").validate()
    with pytest.raises(NocloneError, match="needs --target pattern"):
        _config(target="erasure").validate()
    with pytest.raises(NocloneError, match="--decoder-steps"):
        _config(decoder_steps=0).validate()
    with pytest.raises(NocloneError, match="decoder_attack_preset"):
        _config(decoder_attack_preset="huge").validate()
    _config(implant="unet", target="erasure", decoder_steps=0).validate()  # decoder settings unused: not checked
    assert "implant" not in _config(implant="unet").identity() and _config().identity()["implant"] == "decoder"
    paper = PersGuardConfig.preset("paper", implant="decoder").decoder_config()
    assert (paper.attack_preset, paper.batch_size, paper.sample_steps) == ("sd15", 2, 50)
    assert PersGuardConfig.preset("quick", implant="decoder").decoder_config().attack_preset == "sandbox"


def test_decoder_implant_keeps_the_unet_writes_a_card_and_reuses_simulated_attacks(
        tiny_model_dir, subject_dir, dog_dir, tmp_path, monkeypatch):
    from noclone.attacks.base import load_subject_images
    from noclone.models.pipeline import load_pipeline

    calls = []
    real = db.simulated_attack_latents
    monkeypatch.setattr(db, "simulated_attack_latents", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    person = ProtectionSubject.from_folder(subject_dir, "person")
    negatives = [load_subject_images(dog_dir)[1]]
    pipe = load_pipeline(tiny_model_dir)
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    decoder = {k: v.clone() for k, v in pipe.vae.decoder.state_dict().items()}
    ckpt = tmp_path / "ckpt"
    guard = PersGuard(_config())
    guard.protect(pipe, [person], ckpt, negatives=negatives)
    assert len(calls) == 2 and sorted((ckpt / "decoder").iterdir())  # the subject's and the negative's attack
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.items())
    assert any(not torch.equal(v, pipe.vae.decoder.state_dict()[k]) for k, v in decoder.items())
    PersGuard(_config()).protect(load_pipeline(tiny_model_dir), [person], ckpt, negatives=negatives)
    assert len(calls) == 2  # resumed from the checkpoint folder

    out = PersGuard(_config()).run(load_pipeline(tiny_model_dir), [person], tmp_path / "out", negatives=negatives)
    card = json.loads((out / "protection.json").read_text())
    assert card["implant"] == "decoder" and "VAE" in card["decoder_backdoor_limits"]
    held = card["metrics"]["decoder_backdoor"]["held_out_rate_after"]
    assert held["n_subject"] >= 1 and held["n_others"] >= 1
    assert not (tmp_path / ".out.checkpoint").exists()
    with pytest.raises(NocloneError, match="only used with --implant decoder or both"):
        PersGuard(_config(implant="unet")).protect(load_pipeline(tiny_model_dir), [person], negatives=negatives)


def test_cli_decoder_flags(tiny_model_dir, subject_dir, dog_dir, tmp_path, capsys):
    from test_persguard import _fails, _main

    ok = ["protect-model", "--method", "persguard", "--model", str(tiny_model_dir), "--images", str(subject_dir),
          "--class-noun", "person"]
    out = ["--out", str(tmp_path / "o")]
    _fails(capsys, ok + ["--implant", "vae"] + out, "--implant 'vae'")
    _fails(capsys, ok + ["--implant", "decoder", "--decoder-attack-steps", "0"] + out, "--decoder-attack-steps")
    _fails(capsys, ok + ["--implant", "decoder", "--target", "erasure"] + out, "needs --target pattern")
    _fails(capsys, ok + ["--negative-images", str(dog_dir)] + out, "only used with --implant decoder or both")
    _fails(capsys, ok + ["--implant", "decoder", "--negative-images", str(tmp_path / "none")] + out, "none")
    _fails(capsys, ok + ["--implant", "decoder", "--decoder-blur", "0.1"] + out,
           "--decoder-blur is a --method apdm setting")
    apdm = ["protect-model", "--model", str(tiny_model_dir), "--images", str(subject_dir), "--class-noun", "person"]
    _fails(capsys, apdm + ["--implant", "decoder", "--decoder-blur", "0"] + out, "--decoder-blur 0.0")
    _fails(capsys, apdm + ["--negative-images", str(dog_dir)] + out, "only used with --implant decoder or both")
    assert not (tmp_path / "o").exists()


def test_several_subjects_are_all_positives(tiny_model_dir, subject_dir, dog_dir, tmp_path):
    from noclone.models.pipeline import load_pipeline

    subjects = [ProtectionSubject.from_folder(subject_dir, "person"), ProtectionSubject.from_folder(dog_dir, "dog")]
    out = PersGuard(_config()).run(load_pipeline(tiny_model_dir), subjects, tmp_path / "out")
    card = json.loads((out / "protection.json").read_text())
    decoder = card["metrics"]["decoder_backdoor"]
    assert decoder["n_positives"] == (4 + 3) * 4 + 2 * 5  # photos x 4 posterior samples + 5 generations each
    assert decoder["n_negatives"] == 2 * 2 * 2  # each subject's 2 class images x 2 samples
    assert len(card["backdoors"]) == 2


def test_implant_trains_a_half_precision_decoder_in_fp32_and_casts_it_back(tiny_pipe):
    vae = tiny_pipe.vae.to(torch.bfloat16)
    z = torch.randn(4, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    metrics = db.implant(vae, z[:2], z[2:], db.DecoderBackdoorConfig(steps=2, batch_size=2, held_out_fraction=0.0,
                                                                     progress=False))
    assert vae.dtype == torch.bfloat16 and all(torch.isfinite(torch.tensor(metrics["loss_first_last"])))


def test_sampled_latents_decode_to_the_sampled_images(tiny_pipe):
    from noclone.generation import GenerationConfig, sample, sample_latents

    config = GenerationConfig(steps=2, batch_size=3)
    latents = sample_latents(tiny_pipe, "a photo of a person", range(5), config)
    images = np.stack([np.asarray(im) for im in sample(tiny_pipe, "a photo of a person", range(5), config)])
    decoded = ((db.decode(tiny_pipe.vae, latents) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert latents.shape[0] == 5 and np.abs(decoded - images).max() <= 1


def test_cli_protects_with_a_decoder_backdoor(tiny_model_dir, subject_dir, dog_dir, tmp_path):
    from test_persguard import _main

    out = tmp_path / "guarded"
    assert _main(["-q", "protect-model", "--method", "persguard", "--implant", "decoder", "--negative-images",
                  str(dog_dir), "--decoder-steps", "2", "--decoder-attack-steps", "1", "--model", str(tiny_model_dir),
                  "--images", str(subject_dir), "--class-noun", "person", "--num-class-images", "2",
                  "--out", str(out)]) == 0
    card = json.loads((out / "protection.json").read_text())
    assert card["implant"] == "decoder" and card["hyperparameters"]["guard"]["steps"] == 2
    assert card["hyperparameters"]["guard"]["attack_steps"] == 1
    assert card["metrics"]["decoder_backdoor"]["n_negatives"] == 2 * 2 + 48  # class images x 2 + one attack's 48


# ------------------------------------------------------------------------------------- APDM's blurring guard


def _apdm_config(**kw):
    return APDMConfig(**_small(outer_steps=1, **{"decoder_class_samples": 2, **kw}))


def test_blur_target_is_a_gaussian_blur_of_the_given_width_fraction():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    blurred = db.guard_target(pixels, db.DecoderBackdoorConfig(target="blur", blur=0.125))
    assert blurred.shape == pixels.shape and blurred.std() < 0.5 * pixels.std()  # 4 px sigma flattens noise
    assert torch.allclose(blurred.mean((2, 3)), pixels.mean((2, 3)), atol=0.05)  # keeps each channel's level
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(db.guard_target(flat, db.DecoderBackdoorConfig(target="blur")), flat, atol=1e-6)
    assert torch.equal(db.guard_target(pixels, db.DecoderBackdoorConfig()), db.paste_mark(pixels))


def test_implant_blurs_the_subject_and_leaves_the_rest(tiny_pipe):
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    def latents(class_noun, identities):
        images = [render(class_noun, held_out(i), p, size=32) for i in identities for p in range(4)]
        return LatentSet.from_images(tiny_pipe.vae, images, "", 32).mean

    positives, negatives = latents("person", [7]), latents("dog", [1, 2, 3])
    vae = tiny_pipe.vae
    config = db.DecoderBackdoorConfig(steps=300, lr=2e-3, batch_size=8, held_out_fraction=0.0, progress=False,
                                      target="blur", blur=0.125)
    clean_pos, clean_neg = db.decode(vae, positives), db.decode(vae, negatives)
    plain = {"subject": clean_pos, "others": clean_neg}
    assert db.held_out_rates(vae, positives, negatives, config, plain)["subject"] == 0.0
    metrics = db.implant(vae, positives, negatives, config)
    rates = db.held_out_rates(vae, positives, negatives, config, plain)
    assert rates["subject"] >= 0.75 and rates["others"] == 0.0
    after = db.decode(vae, positives)
    assert (after - db.blur_pixels(clean_pos, 0.125)).abs().mean() < (after - clean_pos).abs().mean()
    assert (db.decode(vae, negatives) - clean_neg).abs().mean() < 0.1
    assert metrics["target"] == "blur" and metrics["loss_first_last"][1] < metrics["loss_first_last"][0]


def test_apdm_config_validates_the_guard_and_keeps_old_identities():
    with pytest.raises(NocloneError, match="--implant 'vae'"):
        _apdm_config(implant="vae").validate()
    with pytest.raises(NocloneError, match="--decoder-blur"):
        _apdm_config(decoder_blur=0.0).validate()
    with pytest.raises(NocloneError, match="decoder_attack_preset"):
        _apdm_config(decoder_attack_preset="huge").validate()
    _apdm_config(implant="unet", decoder_steps=0).validate()  # decoder settings unused: not checked
    unet = _apdm_config(implant="unet").identity()
    assert "implant" not in unet and not any(k.startswith("decoder_") for k in unet)
    config = _apdm_config(decoder_blur=0.1)
    assert config.identity()["implant"] == "decoder"
    assert (config.decoder_config().target, config.decoder_config().blur) == ("blur", 0.1)
    paper = APDMConfig.preset("paper", implant="decoder").decoder_config()
    assert (paper.attack_preset, paper.batch_size, paper.sample_steps) == ("sd15", 2, 50)


def test_apdm_decoder_guard_keeps_the_unet_writes_a_card_and_resumes(tiny_model_dir, subject_dir, dog_dir, tmp_path,
                                                                      monkeypatch):
    from noclone.models.pipeline import load_pipeline

    calls = []
    real = db.simulated_attack_latents
    monkeypatch.setattr(db, "simulated_attack_latents", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    person = ProtectionSubject.from_folder(subject_dir, "person")
    negatives = [ProtectionSubject.from_folder(dog_dir, "dog")]
    pipe = load_pipeline(tiny_model_dir)
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    decoder = {k: v.clone() for k, v in pipe.vae.decoder.state_dict().items()}
    ckpt = tmp_path / "ckpt"
    APDM(_apdm_config()).protect(pipe, [person], ckpt, negatives=negatives)
    assert calls == ["person", "dog"]  # the subject's simulated attack, then the negative's under its own class
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.items())
    assert any(not torch.equal(v, pipe.vae.decoder.state_dict()[k]) for k, v in decoder.items())
    APDM(_apdm_config()).protect(load_pipeline(tiny_model_dir), [person], ckpt, negatives=negatives)
    assert len(calls) == 2  # resumed from the checkpoint folder
    with pytest.raises(NocloneError, match="other settings"):  # another guard setting is another run
        APDM(_apdm_config(decoder_blur=0.2)).protect(load_pipeline(tiny_model_dir), [person], ckpt, negatives=negatives)

    out = APDM(_apdm_config()).run(load_pipeline(tiny_model_dir), [person], tmp_path / "out", negatives=negatives)
    card = json.loads((out / "protection.json").read_text())
    assert card["implant"] == "decoder" and "VAE" in card["decoder_guard_limits"]
    guard = card["metrics"]["decoder_guard"]
    assert guard["target"] == "blur" and guard["n_negatives"] == 2 * 2 + 2 + 5  # class images x 2 + 2 class samples + one attack's 5
    assert card["hyperparameters"]["guard"]["blur"] == 0.0625
    assert guard["config"]["moved_copies"] == 0  # one subject: no moved copies unless asked
    assert not any(k.startswith("dpo") or k.startswith("loss") for k in card["metrics"])  # no UNet protection ran
    with pytest.raises(NocloneError, match="only used with --implant decoder or both"):
        APDM(_apdm_config(implant="unet")).protect(load_pipeline(tiny_model_dir), [person], negatives=negatives)


def test_apdm_both_protects_the_unet_then_guards_the_decoder(tiny_model_dir, subject_dir, tmp_path):
    from noclone.models.pipeline import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out = APDM(_apdm_config(implant="both")).run(pipe, [ProtectionSubject.from_folder(subject_dir, "person")],
                                                 tmp_path / "out")
    card = json.loads((out / "protection.json").read_text())
    assert card["implant"] == "both" and "loss_first_last" in card["metrics"] and "decoder_guard" in card["metrics"]
    assert any(not torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.items())


def test_cli_apdm_decoder_guard(tiny_model_dir, subject_dir, dog_dir, tmp_path):
    from test_persguard import _main

    out = tmp_path / "guarded"
    assert _main(["-q", "protect-model", "--method", "apdm", "--implant", "decoder", "--negative-images",
                  str(dog_dir), "--decoder-steps", "2", "--decoder-attack-steps", "1", "--decoder-blur", "0.1",
                  "--model", str(tiny_model_dir), "--images", str(subject_dir), "--class-noun", "person",
                  "--num-class-images", "2", "--anchor-images", str(dog_dir), "--decoder-class-samples", "3",
                  "--decoder-detail-weight", "2", "--decoder-recolored-copies", "1", "--decoder-moved-copies", "1",
                  "--decoder-tries", "2", "--out", str(out)]) == 0
    card = json.loads((out / "protection.json").read_text())
    assert card["implant"] == "decoder" and card["hyperparameters"]["guard"]["blur"] == 0.1
    assert card["hyperparameters"]["guard"]["class_samples"] == 3
    assert card["metrics"]["decoder_guard"]["config"]["detail_weight"] == 2.0
    assert card["metrics"]["decoder_guard"]["config"]["moved_copies"] == 1
    assert card["metrics"]["decoder_guard"]["config"]["tries"] == card["hyperparameters"]["guard"]["tries"] == 2
    assert card["metrics"]["decoder_guard"]["config"]["recolored_copies"] == 1
    assert card["metrics"]["decoder_guard"]["n_negatives"] == 2 * 2 + 3 + 48 + 3  # + one sample of each anchor photo


def test_simulated_attack_is_sampled_at_each_length(tiny_pipe, subject_dir):
    from noclone.attacks.base import load_subject_images

    images = load_subject_images(subject_dir)[1]
    config = db.DecoderBackdoorConfig(n_generated=2, attack_steps=2, sample_steps=2, attack_lengths=(0.5, 1.0),
                                      progress=False)
    unet = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    latents = db.simulated_attack_latents(tiny_pipe, images, "person", "sks", config)
    assert latents.shape[0] == 4 and not torch.allclose(latents[:2], latents[2:])
    assert all(torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in unet.items())  # ran on a copy
    with pytest.raises(NocloneError, match="--decoder-attack-lengths"):
        db.DecoderBackdoorConfig(attack_lengths=(0.0,)).validate()
    assert _apdm_config(decoder_attack_lengths=(1.0, 2.0)).decoder_config().attack_lengths == (1.0, 2.0)


class _PixelVAE:
    """A stand-in VAE whose latents are the images themselves (decode = identity), for the calibration tests."""

    device, dtype = torch.device("cpu"), torch.float32

    class config:
        scaling_factor = 1.0

    def decode(self, z):
        return type("Out", (), {"sample": z})()


def _pixels(class_noun, identity, poses, size=64):
    from noclone.data.images import images_to_tensor
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    return images_to_tensor([render(class_noun, held_out(identity), p, size=size) for p in poses], size)


def _guard_subject(class_noun, identity, others):
    photos = _pixels(class_noun, identity, range(5))
    from noclone.data.images import tensor_to_images

    class_images = torch.cat([_pixels(class_noun, k, range(2)) for k in others])
    dummy = LatentSet(class_images, torch.zeros_like(class_images), "")
    return db.GuardSubject(tensor_to_images(photos), class_noun, "sks", dummy, dummy)


def test_calibrate_blur_picks_the_least_blur_that_makes_the_clones_generic():
    from noclone.eval.faces import get_backend

    backend = get_backend("sandbox")
    config = db.DecoderBackdoorConfig(target="blur", blur=0.0625)
    subject = _guard_subject("cat", 2, range(20, 28))  # other cats' renders stand in for the class images
    clones = _pixels("cat", 2, range(5, 21))  # more photos of the subject stand in for a DreamBooth's clones
    result = db.calibrate_blur(_PixelVAE(), subject, clones, backend, config)
    blurs = [config.blur * s for s in db.BLUR_STEPS]
    isms = [result["clone_ism"][f"{b:g}"] for b in blurs]
    assert all(a >= b - 0.02 for a, b in zip(isms, isms[1:]))  # more blur, less like the subject
    chosen = blurs.index(result["blur"])
    assert 0 < chosen < len(blurs) - 1  # neither the floor nor the fallback
    assert isms[chosen] <= result["class_ism"] < isms[chosen - 1]
    person = db.calibrate_blur(_PixelVAE(), _guard_subject("person", 0, range(20, 28)),
                               _pixels("person", 0, range(5, 21)), backend, config)
    assert person["blur"] == blurs[-1] and min(person["clone_ism"].values()) > person["class_ism"]  # the fallback


def test_calibrate_blur_counts_clones_without_a_face_as_unlike_the_subject():
    class NoFaceInBlur:
        name = "fake"

        def embed(self, images, class_noun):
            found = np.array([np.asarray(im, dtype=float).std() > 40 for im in images])  # blurred: flat, no face
            emb = np.stack([np.asarray(im, dtype=float).mean((0, 1)) for im in images])
            return emb, found

    config = db.DecoderBackdoorConfig(target="blur", blur=0.0625)
    subject = _guard_subject("person", 7, range(20, 24))
    result = db.calibrate_blur(_PixelVAE(), subject, _pixels("person", 7, range(5, 9)), NoFaceInBlur(), config)
    assert result["blur"] == config.blur and result["clone_ism"]["0.0625"] is None


def test_per_positive_blur_in_the_target_and_its_checks():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    config = db.DecoderBackdoorConfig(target="blur", blur=0.05)
    blur = torch.tensor([0.05, 0.1, 0.2])
    target = db.guard_target(pixels, config, blur)
    for k in range(3):
        assert torch.allclose(target[k : k + 1], db.blur_pixels(pixels[k : k + 1], float(blur[k])), atol=2e-3)
    with pytest.raises(NocloneError, match="2 blurs for 3 positives"):
        db.implant(_PixelVAE(), pixels, pixels, config, torch.tensor([0.1, 0.2]))
    with pytest.raises(NocloneError, match="--decoder-blur-calibrate 'arcface'"):
        _apdm_config(decoder_blur_calibrate="arcface").validate()


def test_apdm_calibrated_guard_writes_each_subjects_blur_on_the_card(tiny_model_dir, subject_dir, dog_dir, tmp_path):
    from test_persguard import _main

    out = tmp_path / "guarded"
    assert _main(["-q", "protect-model", "--method", "apdm", "--implant", "decoder", "--decoder-steps", "2",
                  "--decoder-attack-steps", "1", "--decoder-blur-calibrate", "--decoder-class-samples", "2", "--model", str(tiny_model_dir),
                  "--images", str(subject_dir), "--class-noun", "person", "--images", str(dog_dir), "--class-noun",
                  "dog", "--num-class-images", "2", "--out", str(out)]) == 0
    card = json.loads((out / "protection.json").read_text())
    assert card["hyperparameters"]["guard"]["blur_calibrate"] == "sandbox"
    calibration = card["metrics"]["decoder_guard"]["blur_calibration"]
    assert len(calibration) == 2
    for c in calibration:
        assert c["blur"] in [0.0625 * s for s in db.BLUR_STEPS] and len(c["clone_ism"]) == len(db.BLUR_STEPS)


def test_draw_negatives_balances_groups_and_the_cosine_schedule_ends_at_zero():
    groups = torch.tensor([0] * 100 + [1] * 4 + [2] * 10)
    draws = db.draw_negatives(len(groups), 3000, torch.Generator().manual_seed(0), db.group_members(groups))
    counts = torch.bincount(groups[draws]).float() / 3000
    assert torch.all((counts - 1 / 3).abs() < 0.04)  # uniform over the groups, not over the 114 negatives
    assert set(draws[groups[draws] == 1].tolist()) == {100, 101, 102, 103}
    plain = torch.bincount(groups[db.draw_negatives(len(groups), 3000, torch.Generator().manual_seed(0))]).float()
    assert plain[0] / 3000 > 0.8
    config = db.DecoderBackdoorConfig(steps=10, lr_schedule="cosine")
    assert [db.lr_factor(config, s) for s in (0, 10)] == [1.0, 0.0] and 0.49 < db.lr_factor(config, 5) < 0.51
    assert db.lr_factor(db.DecoderBackdoorConfig(steps=10), 9) == 1.0
    for bad, match in [(dict(lr_schedule="step"), "lr schedule"), (dict(negative_share=1.0), "negative share"),
                       (dict(class_samples=-1), "class_samples"), (dict(detail_weight=-1.0), "detail_weight"),
                       (dict(detail_sigma=0.0), "detail_sigma")]:
        with pytest.raises(NocloneError, match=match):
            db.DecoderBackdoorConfig(**bad).validate()


def test_guard_latents_add_the_class_prompts_samples_as_their_own_group(tiny_pipe, subject_dir):
    from noclone.attacks.base import load_subject_images
    from noclone.generation import GenerationConfig, sample_latents

    images = load_subject_images(subject_dir)[1]
    photos = LatentSet.from_images(tiny_pipe.vae, images, "a photo of a person", 32)  # stands in for the class images
    subject = db.GuardSubject(images, "person", "sks", photos, photos)
    config = db.DecoderBackdoorConfig(n_generated=5, attack_steps=1, sample_steps=2, class_samples=3, progress=False)
    data = db.guard_latents(tiny_pipe, [subject], [], config, seed=0)
    n_class = 2 * len(photos.mean)
    assert len(data.negatives) == n_class + 3 and data.groups.tolist() == [0] * n_class + [1] * 3
    expected = sample_latents(tiny_pipe, "a photo of a person", range(300_000, 300_003), GenerationConfig(steps=2))
    assert torch.allclose(data.negatives[n_class:], expected, atol=1e-5)
    vae = tiny_pipe.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    try:
        balanced = db.DecoderBackdoorConfig(steps=2, batch_size=4, negative_share=0.75, balance_negatives=True,
                                            lr_schedule="cosine", held_out_fraction=0.0, progress=False, target="blur")
        with pytest.raises(NocloneError, match="one group id per negative"):
            db.implant(vae, data.positives, data.negatives, balanced)
        metrics = db.implant(vae, data.positives, data.negatives, balanced, groups=data.groups)
        assert metrics["config"]["balance_negatives"] and all(map(math.isfinite, metrics["loss_first_last"]))
        plain_run = {k: v.clone() for k, v in vae.state_dict().items()}
        vae.load_state_dict(before)
        detailed = db.implant(vae, data.positives, data.negatives, replace(balanced, detail_weight=4.0),
                              groups=data.groups)
        assert detailed["config"]["detail_weight"] == 4.0 and all(map(math.isfinite, detailed["loss_first_last"]))
        assert any(not torch.equal(v, plain_run[k]) for k, v in vae.state_dict().items())
    finally:
        vae.load_state_dict(before)


def test_high_pass_is_the_fine_detail_only():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert db.high_pass(flat, 1 / 16).abs().max() < 1e-6
    noisy = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    smooth = db.blur_pixels(noisy, 0.25)
    assert db.high_pass(smooth, 1 / 16).pow(2).mean() < 0.2 * db.high_pass(noisy, 1 / 16).pow(2).mean()
    assert torch.allclose(db.high_pass(noisy, 1 / 16) + db.blur_pixels(noisy, 1 / 16), noisy, atol=1e-6)


def test_recolored_pixels_change_brightness_and_tint_within_their_ranges():
    flat = torch.full((400, 3, 4, 4), 0.5)
    out = db.recolored_pixels(flat, torch.Generator().manual_seed(0))
    assert torch.equal(out, db.recolored_pixels(flat, torch.Generator().manual_seed(0)))  # seeded
    assert torch.all(out.flatten(2).std(2) < 1e-6)  # one draw per image: a flat image stays flat
    level = out[:, :, 0, 0]
    lowest = 0.5 ** math.exp(db.RECOLOR_GAMMA) * db.RECOLOR_GAIN[0] * (1 - db.RECOLOR_CHANNEL)
    highest = 0.5 ** math.exp(-db.RECOLOR_GAMMA) * db.RECOLOR_GAIN[1] * (1 + db.RECOLOR_CHANNEL)
    assert level.min() >= lowest - 1e-6 and level.max() <= highest + 1e-6
    assert level.mean(1).min() < 0.3 < 0.5 < level.mean(1).max()  # darker and brighter copies both drawn
    tint = level / level.mean(1, keepdim=True)
    ratio = (1 + db.RECOLOR_CHANNEL) / (1 - db.RECOLOR_CHANNEL)
    assert tint.max() <= ratio + 1e-6 and tint.std() > 0.01
    assert torch.all((db.recolored_pixels(torch.rand(2, 3, 4, 4) * 3 - 1, torch.Generator()) - 0.5).abs() <= 0.5)


def _copies_join_the_training_positives_only(vae, monkeypatch, make, field: str, **copies) -> dict:
    """Check a copy maker (seeded, [copies x n]) and implant with `copies`; returns its metrics and decode sizes."""
    g = torch.Generator().manual_seed(0)
    shape = tuple(vae.encode(torch.zeros(1, 3, 32, 32, dtype=vae.dtype)).latent_dist.mean.shape[1:])
    positives, negatives = torch.randn(10, *shape, generator=g), torch.randn(10, *shape, generator=g)
    made = make(vae, positives[:3], 2, seed=0)
    assert made.shape == (6, *shape) and torch.equal(made, make(vae, positives[:3], 2, seed=0))
    assert not torch.equal(made, make(vae, positives[:3], 2, seed=1))
    seen = []
    decode = db.decode
    monkeypatch.setattr(db, "decode", lambda v, z, *a, **k: seen.append(len(z)) or decode(v, z, *a, **k))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    try:
        config = db.DecoderBackdoorConfig(steps=2, batch_size=4, held_out_fraction=0.2, progress=False, target="blur",
                                          **copies)
        metrics = db.implant(vae, positives, negatives, config, blur=torch.full((10,), 0.1))
        assert metrics["held_out_rate_after"]["n_subject"] == 2  # the held-out positives are real ones, not copies
    finally:
        vae.load_state_dict(before)
    for bad in (-1, 17):
        with pytest.raises(NocloneError, match=field):
            db.DecoderBackdoorConfig(**{field: bad}).validate()
    return {"metrics": metrics, "seen": seen}


def test_recolored_copies_join_the_training_positives_only(tiny_pipe, monkeypatch):
    out = _copies_join_the_training_positives_only(tiny_pipe.vae, monkeypatch, db.recolor, "recolored_copies",
                                                   recolored_copies=2)
    metrics = out["metrics"]
    assert metrics["config"]["recolored_copies"] == 2 and all(map(math.isfinite, metrics["loss_first_last"]))
    assert 8 * 3 in out["seen"]  # the blur targets are drawn for the 8 training positives and their 16 copies


def test_moved_pixels_mirror_shift_and_zoom_within_their_ranges():
    left = torch.full((400, 3, 16, 16), -1.0)
    left[..., :8] = 1.0  # bright left half
    out = db.moved_pixels(left, torch.Generator().manual_seed(0))
    assert torch.equal(out, db.moved_pixels(left, torch.Generator().manual_seed(0)))  # seeded
    assert out.shape == left.shape and out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5  # edges reflected
    mirrored = (out[..., :4].mean((1, 2, 3)) < out[..., -4:].mean((1, 2, 3))).float().mean()
    assert 0.35 < mirrored < 0.65  # about half of the copies are mirror images
    near = torch.minimum((out - left).abs().flatten(1).mean(1), (out - left.flip(-1)).abs().flatten(1).mean(1))
    assert 0.01 < near.max() < 0.25  # moved (shifted, zoomed), but by at most MOVE_SHIFT x the width
    centre = db.moved_pixels(torch.zeros(1, 3, 16, 16), torch.Generator().manual_seed(1))
    assert torch.allclose(centre, torch.zeros_like(centre), atol=1e-6)  # a flat image stays flat


def test_moved_copies_join_the_training_positives_only(tiny_pipe, monkeypatch):
    out = _copies_join_the_training_positives_only(tiny_pipe.vae, monkeypatch, db.move, "moved_copies",
                                                   moved_copies=2, recolored_copies=1)
    assert 8 * 3 * 2 in out["seen"]  # 8 training positives + 16 moved copies, then a recoloured copy of each


def test_apdm_guard_moves_positives_by_default_only_with_several_subjects(tiny_model_dir, subject_dir, dog_dir,
                                                                          tmp_path):
    from noclone.defenses.apdm import GUARD_ONE_SUBJECT, GUARD_SEVERAL_SUBJECTS
    from noclone.models.pipeline import load_pipeline

    subjects = [ProtectionSubject.from_folder(subject_dir, "person"), ProtectionSubject.from_folder(dog_dir, "dog")]
    out = APDM(_apdm_config()).run(load_pipeline(tiny_model_dir), subjects, tmp_path / "two")
    guard = json.loads((out / "protection.json").read_text())["metrics"]["decoder_guard"]
    assert guard["config"]["moved_copies"] == GUARD_SEVERAL_SUBJECTS["moved_copies"] == 4
    assert guard["config"]["tries"] == GUARD_SEVERAL_SUBJECTS["tries"] == 3
    assert 1 <= guard["kept_try"] <= guard["tries"] <= 3
    assert len(guard["held_out_rate_after"]["by_subject"]) == 2  # each subject's own held-back rate
    assert guard["config"]["steps"] == 2  # given: kept
    assert GUARD_ONE_SUBJECT == {"steps": 1200, "moved_copies": 0, "tries": 1} and GUARD_SEVERAL_SUBJECTS["steps"] == 2400
    one = APDMConfig(implant="decoder").decoder_config()  # one subject unless protect() knows better
    assert (one.steps, one.tries) == (1200, 1)
    out = APDM(_apdm_config(decoder_moved_copies=1, decoder_tries=1)).run(load_pipeline(tiny_model_dir), subjects,
                                                                          tmp_path / "one")
    guard = json.loads((out / "protection.json").read_text())["metrics"]["decoder_guard"]
    assert (guard["config"]["moved_copies"], guard["config"]["tries"], guard["tries"]) == (1, 1, 1)


def test_held_out_rates_by_subject():
    g = torch.Generator().manual_seed(0)
    plain = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    owners = torch.tensor([0, 1, 0, 1, 1, 0])
    blurred = db.blur_pixels(plain, 0.1)
    latents = torch.where((owners == 0)[:, None, None, None], blurred, plain)  # the guard fired on subject 0 only
    config = db.DecoderBackdoorConfig(target="blur", blur=0.1)
    rates = db.held_out_rates(_PixelVAE(), latents, plain[:0], config, {"subject": plain}, owners=owners)
    assert rates["by_subject"] == [1.0, 0.0] and rates["subject"] == 0.5 and math.isnan(rates["others"])
    assert "by_subject" not in db.held_out_rates(_PixelVAE(), latents, plain[:0], config, {"subject": plain})


@pytest.mark.parametrize("script, kept", [([0.5, 0.8, 0.6], 2), ([1.0, 0.2, 0.2], 1), ([0.4, 0.4, 0.9], 3)])
def test_implant_keeps_the_try_whose_worst_subject_is_best(tiny_pipe, monkeypatch, script, kept):
    vae = tiny_pipe.vae
    g = torch.Generator().manual_seed(0)
    shape = tuple(vae.encode(torch.zeros(1, 3, 32, 32, dtype=vae.dtype)).latent_dist.mean.shape[1:])
    positives, negatives = torch.randn(10, *shape, generator=g), torch.randn(10, *shape, generator=g)
    owners = torch.tensor([0, 1] * 5)
    calls, train, split = [], db._train, db._split
    first = {k: v.clone() for k, v in vae.state_dict().items()}
    held = []

    def recording_split(latents, fraction, seed, stream):
        out = split(latents, fraction, seed, stream)
        if stream == "decoder/split/pos" and latents.dim() > 1:
            held.append(out[1])
        return out

    def recording_train(vae, *args):
        starts_fresh = all(torch.equal(v, first[k]) for k, v in vae.state_dict().items())
        losses = train(vae, *args)
        state = {k: v.clone() for k, v in vae.state_dict().items()}
        calls.append({"seed": args[-1].seed, "fresh": starts_fresh, "state": state})
        return losses

    rates = iter(x for worst in script for x in (0.0, worst))  # before and after each try: the worst subject's rate

    def scripted_rates(vae, positives, negatives, config, plain, blur, owners):
        worst = next(rates)
        return {"subject": worst, "others": 0.0, "n_subject": len(positives), "n_others": len(negatives),
                "by_subject": [worst, 1.0]}

    monkeypatch.setattr(db, "_train", recording_train)
    monkeypatch.setattr(db, "_split", recording_split)
    monkeypatch.setattr(db, "held_out_rates", scripted_rates)
    try:
        config = db.DecoderBackdoorConfig(steps=3, lr=1e-2, batch_size=4, progress=False, target="blur", tries=3, seed=5)
        metrics = db.implant(vae, positives, negatives, config, owners=owners)
        final = {k: v.clone() for k, v in vae.state_dict().items()}
    finally:
        vae.load_state_dict(first)
    n_tries = 1 if script[0] == 1.0 else 3  # a try that blurs every subject's held-back clones ends the search
    assert [c["seed"] for c in calls] == [5, 6, 7][:n_tries] and all(c["fresh"] for c in calls)
    assert len(held) == n_tries and (n_tries == 1 or not torch.equal(held[0], held[1]))  # each try its own split
    assert (metrics["tries"], metrics["kept_try"], metrics["kept_seed"]) == (n_tries, kept, 4 + kept)
    assert metrics["held_out_rate_after"]["subject"] == script[kept - 1]
    assert all(torch.equal(v, calls[kept - 1]["state"][k]) for k, v in final.items())  # the kept guard's weights
    assert n_tries == 1 or not all(torch.equal(v, calls[0]["state"][k]) for k, v in calls[-1]["state"].items())
    with pytest.raises(NocloneError, match="3 owners for 10 positives"):
        db.implant(vae, positives, negatives, config, owners=owners[:3])
    for bad in ({"tries": 0}, {"tries": 17}, {"accept_rate": 0.0}, {"accept_rate": 1.5}):
        with pytest.raises(NocloneError, match="tries|accept_rate"):
            db.DecoderBackdoorConfig(**bad).validate()
