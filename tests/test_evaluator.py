import json

import numpy as np
import pytest
import torch

from noclone.errors import NocloneError
from noclone.sandbox import evaluator as E
from noclone.sandbox import render as R
from noclone.sandbox.splits import held_out

# fresh held-out identities: the shipped validity report used held_out(0 .. 199)
FRESH_OFFSET = 700_000


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def ev():
    return E.load_default_evaluator()


@pytest.fixture(scope="module")
def fresh_report(ev):
    return E.validate(ev, n_identities=40, photos=4, seed=12345, id_offset=FRESH_OFFSET, n_negatives=150,
                      threshold=ev.threshold)


def test_shipped_files_and_config(ev):
    d = E.DEFAULT_WEIGHTS_DIR
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    assert (d / "model.safetensors").stat().st_size < 3 * 1024 * 1024
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["threshold"] == pytest.approx(ev.threshold)
    assert cfg["validity"]["clean"]["roc_auc"] >= 0.99
    assert cfg["validity"]["clean"]["detector_accuracy"] >= 0.98
    assert 0.0 < ev.threshold < 1.0
    assert E.load_default_evaluator() is ev  # cached


def test_fresh_identities_verification(fresh_report):
    clean = fresh_report["clean"]
    assert clean["roc_auc"] >= 0.985
    assert clean["tar_at_threshold"] >= 0.9  # genuine pairs above the stored threshold
    assert clean["far_at_threshold"] <= 0.03  # impostors below it
    blur = fresh_report[fresh_report["conditions"][1]]
    assert blur["tar_at_threshold"] >= 0.85 and blur["far_at_threshold"] <= 0.03


def test_fresh_identities_detection(fresh_report):
    for c in R.CLASSES:
        assert fresh_report["clean"]["per_class"][c]["detect_rate"] >= 0.95, c
    rej = fresh_report["clean"]["detector_negative_rejection"]
    assert rej["nonsubject"] >= 0.95
    assert rej["malformed"] >= 0.9
    assert fresh_report["clean"]["detector_accuracy"] >= 0.95


def test_detect_and_reject_direct(ev):
    for c in R.CLASSES:
        imgs = [R.render(c, held_out(FRESH_OFFSET + 100 + i), 7) for i in range(12)]
        assert ev.detect(imgs, c).mean() >= 0.9, c
        others = [o for o in R.CLASSES if o != c]
        assert not any(ev.detect(imgs, o).mean() > 0.1 for o in others)
    ns = [R.random_nonsubject(900_000 + s) for s in range(24)]
    assert all(ev.detect(ns, c).mean() <= 0.05 for c in R.CLASSES)


def test_input_formats_agree(ev):
    ids = [held_out(FRESH_OFFSET + 200 + i) for i in range(4)]
    pil = [R.render("cat", i, 3) for i in ids]
    arr = R.render_array("cat", ids, [3] * 4)
    ten = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    e1, e2, e3 = ev.embed_images(pil), ev.embed_images(arr), ev.embed_images(ten)
    assert e1.shape == (4, 128) and e1.dtype == np.float32
    assert np.allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    assert np.allclose(e1, e2, atol=1e-5) and np.allclose(e1, e3, atol=1e-4)
    big = [R.render("cat", i, 3, size=128) for i in ids]  # resized to 64 with antialias
    cos = (ev.embed_images(big) * e1).sum(1)
    assert cos.min() > ev.threshold
    assert ev.features(arr).shape == (4, ev.channels[-1])
    with pytest.raises(NocloneError):
        ev.detect(arr, "horse")
    with pytest.raises(NocloneError):
        ev.embed_images([])


def test_save_load_roundtrip(ev, tmp_path):
    ev.save_pretrained(tmp_path)
    ev2 = E.SandboxEvaluator.from_pretrained(tmp_path)
    arr = R.render_array("dog", [held_out(FRESH_OFFSET + 300 + i) for i in range(6)], list(range(6)))
    assert np.array_equal(ev.embed_images(arr), ev2.embed_images(arr))
    assert np.array_equal(ev.class_probs(arr), ev2.class_probs(arr))
    assert ev2.threshold == ev.threshold and ev2.validity == ev.validity
    with pytest.raises(NocloneError):
        E.SandboxEvaluator.from_pretrained(tmp_path / "missing")


def test_tiny_training_run(tmp_path):
    out = tmp_path / "ev"
    m = E.train_evaluator(out, seed=3, n_identities=4, photos_per_identity=3, steps=3, batch_size=32,
                          n_nonsubject=16, class_only_identities=4, validate_identities=3, validate_photos=2,
                          progress=False)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["seed"] == 3 and cfg["training"]["steps"] == 3
    assert "clean" in cfg["validity"] and np.isfinite(cfg["threshold"])
    m2 = E.SandboxEvaluator.from_pretrained(out)
    arr = R.render_array("person", [held_out(5)], [0])
    assert np.allclose(m.embed_images(arr), m2.embed_images(arr), atol=1e-6)
    # seeded: the same run again gives the same weights
    m3 = E.train_evaluator(tmp_path / "again", seed=3, n_identities=4, photos_per_identity=3, steps=3,
                           batch_size=32, n_nonsubject=16, class_only_identities=4, validate_identities=0,
                           progress=False, save=False)
    m4 = E.train_evaluator(tmp_path / "again", seed=3, n_identities=4, photos_per_identity=3, steps=3,
                           batch_size=32, n_nonsubject=16, class_only_identities=4, validate_identities=0,
                           progress=False, save=False)
    for (k, a), b in zip(m3.state_dict().items(), m4.state_dict().values()):
        assert torch.equal(a, b), k
