"""Real-photo metric backends: BRISQUE, dlib faces, ArcFace (ONNX) plumbing, DINO/CLIP-I, FID/KID, `evaluate`.

Photos come from scikit-image (offline). Tests needing an optional package skip, with the reason, only when that
package is not installed (`pip install 'noclone[faces,metrics]'` installs them all).
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from noclone.errors import NocloneError

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) supplies the real photos")


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_dlib = pytest.mark.skipif(not _installed("dlib", "face_recognition_models"),
                                reason="dlib-bin / face-recognition-models not installed (noclone[faces])")
needs_brisque_model = pytest.mark.skipif(not _installed("brisque"),
                                         reason="the brisque package (LIVE model files) is not installed (noclone[metrics])")
needs_brisque_reference = pytest.mark.skipif(not _installed("brisque", "cv2", "libsvm"),
                                             reason="brisque's own code needs opencv + libsvm-official (noclone[metrics])")
needs_onnx = pytest.mark.skipif(not _installed("onnx", "onnxruntime"), reason="onnx / onnxruntime not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _pil(a) -> Image.Image:
    return Image.fromarray(np.asarray(a)).convert("RGB")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return _pil(skimage_data.astronaut())


def _jpeg(image: Image.Image, quality: int = 60) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noisy(image: Image.Image, sigma: float = 25.0, seed: int = 0) -> Image.Image:
    a = np.asarray(image, dtype=np.float64)
    a = a + np.random.default_rng(seed).normal(0.0, sigma, a.shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _lfw_faces(n: int) -> list[Image.Image]:
    """The first LFW-subset faces (25x25 grey) upscaled to 150 px: other people's faces."""
    lfw = skimage_data.lfw_subset()
    return [Image.fromarray((lfw[i] * 255).astype(np.uint8)).resize((150, 150), Image.Resampling.BICUBIC).convert("RGB")
            for i in range(n)]


# ------------------------------------------------------------------------------------------------------- BRISQUE

# Ten-plus varied real photos shipped with scikit-image (colour, grey, texture, text, microscopy, sky).
BRISQUE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "text", "brick", "grass",
                  "gravel", "rocket", "immunohistochemistry", "cell")


@needs_brisque_model
def test_brisque_rises_under_blur_and_noise(astronaut):
    from noclone.eval.brisque import brisque_score

    clean = brisque_score(astronaut)
    blurred = brisque_score(astronaut.filter(ImageFilter.GaussianBlur(2)))
    noisy = brisque_score(_noisy(astronaut))
    assert 0.0 < clean < 25.0
    assert blurred > clean + 20.0
    assert noisy > clean + 20.0


@needs_brisque_reference
def test_brisque_matches_the_brisque_package():
    """Our features + numpy SVR against the package's own code (patched for numpy 2 in this test only)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from brisque import BRISQUE

    from noclone.eval.brisque import brisque_score

    def scale_features(self, features):  # the package's float() of 1-element arrays fails on numpy 2
        f = np.array([float(np.asarray(v).reshape(-1)[0]) for v in features])
        lo = np.array(self.scale_params["min_"], dtype=np.float64)
        hi = np.array(self.scale_params["max_"], dtype=np.float64)
        return -1 + 2.0 / (hi - lo) * (f - lo)

    reference = BRISQUE(url=False)
    reference.scale_features = scale_features.__get__(reference)
    images = [getattr(skimage_data, name)() for name in BRISQUE_PHOTOS]
    images = [np.stack([a] * 3, -1) if a.ndim == 2 else a[:, :, :3] for a in images]
    images.append(np.asarray(_noisy(_pil(images[0]))))
    diffs = []
    for a in images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = float(reference.score(a))
        diffs.append(abs(brisque_score(a) - ref))
    assert len(diffs) >= 10
    assert max(diffs) < 0.5, diffs


@needs_brisque_model
def test_brisque_features_and_model_shape(astronaut):
    from noclone.eval.brisque import brisque_features, brisque_scores, load_brisque_model

    f = brisque_features(astronaut)
    assert f.shape == (36,) and np.isfinite(f).all()
    assert 0.2 < f[0] < 10 and f[1] > 0  # MSCN shape and variance
    model = load_brisque_model()
    assert model.support_vectors.shape == (770, 36) and model.gamma == pytest.approx(0.05)
    scores = brisque_scores([astronaut, np.asarray(astronaut.convert("L"))])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    assert brisque_features(astronaut, mscn_fit="ggd").shape == (36,)


def test_brisque_half_scale_and_fits_hand_checked():
    from noclone.eval.brisque import aggd_fit, ggd_fit, half_scale

    # half-size cubic: taps (-3/32, 19/32, 19/32, -3/32) at pixel midpoints, edges replicated
    row = np.array([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    img = np.repeat(row, 6, axis=0)
    out = half_scale(img)
    assert out.shape == (3, 3)
    first = -3 / 32 * 0 + 19 / 32 * 0 + 19 / 32 * 1 - 3 / 32 * 2  # pixel -1 replicates pixel 0
    np.testing.assert_allclose(out[:, 0], first)
    np.testing.assert_allclose(out[:, 1], 2.5)  # linear data in the interior is reproduced exactly
    # a Gaussian sample has GGD shape ~2 and variance ~1; a Laplacian sample shape ~1
    rng = np.random.default_rng(0)
    shape, var = ggd_fit(rng.normal(size=200_000))
    assert shape == pytest.approx(2.0, abs=0.05) and var == pytest.approx(1.0, abs=0.02)
    assert ggd_fit(rng.laplace(size=200_000))[0] == pytest.approx(1.0, abs=0.05)
    # an AGGD with nu = 2, sigma_l = 1, sigma_r = 2 puts mass sigma_l / (sigma_l + sigma_r) = 1/3 on the left
    sample = np.concatenate([-np.abs(rng.normal(size=40_000)), 2 * np.abs(rng.normal(size=80_000))])
    nu, eta, lvar, rvar = aggd_fit(sample)
    assert nu == pytest.approx(2.0, abs=0.1) and lvar == pytest.approx(1.0, abs=0.05) and rvar == pytest.approx(4.0, abs=0.1)
    assert eta > 0  # heavier right side


def test_brisque_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    from noclone.eval import brisque as B

    with pytest.raises(NocloneError, match="svm.txt"):
        B.load_brisque_model(tmp_path)
    monkeypatch.setitem(sys.modules, "brisque", None)  # find_spec("brisque") -> None: as if not installed
    B._load_model.cache_clear()
    try:
        with pytest.raises(NocloneError, match=r"noclone\[metrics\]"):
            B.load_brisque_model()
    finally:
        B._load_model.cache_clear()
    with pytest.raises(NocloneError, match="at least 16"):
        B.brisque_features(np.zeros((8, 8), np.uint8))


def test_brisque_scaling_pickle_with_code_is_refused(tmp_path):
    from noclone.eval import brisque as B

    model = "svm_type epsilon_svr\nkernel_type rbf\ngamma 0.05\nnr_class 2\ntotal_sv 1\nrho -1\nSV\n2 1:0.5 36:-0.25\n"
    (tmp_path / "svm.txt").write_text(model)
    (tmp_path / "normalize.pickle").write_bytes(pickle.dumps({"min_": [0.0] * 36, "max_": [1.0] * 36}))
    m = B.load_brisque_model(tmp_path)
    x = np.full(36, 0.5)  # scales to 0 everywhere
    sv = np.zeros(36)
    sv[0], sv[35] = 0.5, -0.25
    expected = 2 * np.exp(-0.05 * (sv**2).sum()) + 1.0
    assert m.predict(x)[0] == pytest.approx(expected)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "svm.txt").write_text(model)
    (evil / "normalize.pickle").write_bytes(pickle.dumps({"min_": np.zeros(36), "max_": np.ones(36)}))
    with pytest.raises(NocloneError, match="only plain lists"):
        B.load_brisque_model(evil)


# ------------------------------------------------------------------------------------------------------- dlib faces


@pytest.fixture(scope="module")
def dlib_backend():
    if not _installed("dlib", "face_recognition_models"):
        pytest.skip("dlib-bin / face-recognition-models not installed (noclone[faces])")
    from noclone.eval.faces import get_backend

    return get_backend("dlib")


@needs_dlib
def test_dlib_finds_the_astronauts_face(dlib_backend, astronaut):
    boxes = dlib_backend.detect([astronaut, _pil(skimage_data.chelsea()), _pil(skimage_data.coffee())])
    assert len(boxes[0]) >= 1
    left, top, right, bottom = boxes[0][0]
    assert left < 220 < right and top < 120 < bottom  # her face, not the flag patch
    assert 60 < right - left < 140
    assert len(boxes[1]) == 0 and len(boxes[2]) == 0  # a cat and a cup of coffee
    # at 4x, HOG's false positive on her suit is bigger than her face: the most confident box still comes first
    big = dlib_backend.detect([astronaut.resize((2048, 2048), Image.Resampling.BILINEAR)])[0]
    left, top, right, bottom = big[0]
    assert left < 880 < right and top < 480 < bottom


@needs_dlib
def test_dlib_identity_same_face_high_other_faces_low(dlib_backend, astronaut):
    from noclone.eval import metrics as M

    ref, ref_found = dlib_backend.embed([astronaut])
    same, same_found = dlib_backend.embed([ImageOps.mirror(astronaut), _jpeg(astronaut, 50),
                                           astronaut.resize((384, 384), Image.Resampling.LANCZOS)])
    assert ref_found.all() and same_found.all()
    assert ref.shape == (1, 128)
    ism_same = M.ism(same, ref)
    assert ism_same > 0.97
    assert M.identity_match_rate(same, ref, dlib_backend.threshold) == 1.0
    others, found = dlib_backend.embed(_lfw_faces(8))
    assert found.sum() >= 5
    ism_other = M.ism(others[found], ref)
    assert ism_other < dlib_backend.threshold < ism_same
    assert M.identity_match_rate(others[found], ref, dlib_backend.threshold) == 0.0
    # dlib's native rule agrees: same face within 0.6 euclidean, others beyond it
    assert np.linalg.norm(same - ref, axis=1).max() < 0.6
    assert np.linalg.norm(others[found] - ref, axis=1).min() > 0.55


@needs_dlib
def test_evaluate_folders_with_dlib(tmp_path, astronaut):
    from noclone.eval.evaluate import evaluate_folders

    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    astronaut.save(ref / "a.png")
    ImageOps.mirror(astronaut).save(gen / "flipped.png")
    _jpeg(astronaut, 70).save(gen / "jpeg.jpg")
    _pil(skimage_data.chelsea()).save(gen / "cat.png")
    out = tmp_path / "r.json"
    r = evaluate_folders(gen, ref, metrics=["ism", "fdfr"], backend="dlib", json_out=out)
    assert r["fdfr"] == pytest.approx(1 / 3)
    assert r["ism"] > 0.97
    assert r["identity_match_rate"] == pytest.approx(2 / 3)  # the cat image has no face: not a match
    saved = json.loads(out.read_text())
    for key in ("ism", "identity_match_rate", "fdfr", "brisque", "n_images"):
        assert key in saved
    assert saved["brisque"] is None and saved["n_images"] == 3
    assert saved["details"]["identity_match_rate"]["backend"] == "dlib"
    assert saved["details"]["identity_match_rate"]["threshold"] == pytest.approx(0.93)
    assert saved["details"]["ism"]["n_generated_with_face"] == 2
    cats = tmp_path / "cats"
    cats.mkdir()
    _pil(skimage_data.chelsea()).save(cats / "cat.png")
    r = evaluate_folders(cats, ref, metrics=["ism", "fdfr"], backend="dlib")
    assert r["ism"] is None and r["identity_match_rate"] == 0.0 and r["fdfr"] == 1.0
    with pytest.raises(NocloneError, match="found no face in any of the 1 reference"):
        evaluate_folders(ref, cats, metrics=["ism"], backend="dlib")
    with pytest.raises(NocloneError, match="human faces|person"):
        evaluate_folders(gen, ref, metrics=["fdfr"], backend="dlib", class_noun="dog")


def test_missing_face_packages_name_the_extra(monkeypatch, tmp_path):
    from noclone.eval import faces as F

    F._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
    try:
        with pytest.raises(NocloneError, match=r"noclone\[faces\]"):
            F.get_backend("dlib")
    finally:
        F._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(NocloneError, match=r"noclone\[faces\]"):
        F.get_backend("arcface", arcface_models=tmp_path)


# ------------------------------------------------------------------------------------------------------- ArcFace (ONNX)


def test_arcface_needs_a_model_folder(tmp_path):
    from noclone.eval.faces import get_backend

    with pytest.raises(NocloneError, match="--arcface-models"):
        get_backend("arcface")
    with pytest.raises(NocloneError, match="no such directory"):
        get_backend("arcface", arcface_models=tmp_path / "nope")
    with pytest.raises(NocloneError, match="no .onnx files"):
        get_backend("arcface", arcface_models=tmp_path)


@pytest.mark.skipif(not _installed("onnxruntime"), reason="onnxruntime not installed (noclone[faces])")
def test_arcface_rejects_a_corrupt_model(tmp_path):
    from noclone.eval.faces import get_backend

    (tmp_path / "det_10g.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(NocloneError, match="cannot load"):
        get_backend("arcface", arcface_models=tmp_path)


def test_scrfd_decoding_nms_and_alignment():
    from noclone.eval.faces import ARCFACE_TEMPLATE, align_face, decode_scrfd, nms, similarity_transform

    size = 64
    outs = []
    for kind in range(3):
        for s in (8, 16, 32):
            n = (size // s) ** 2 * 2
            outs.append(np.full((n, (1, 4, 10)[kind]), 0.1 if kind == 0 else 0.0, np.float32))
    idx = (1 * 4 + 2) * 2 + 1  # stride 16, row 1, column 2, second anchor: centre (32, 16)
    outs[1][idx] = 0.9
    outs[4][idx] = np.array([10, 12, 6, 4]) / 16
    outs[7][idx] = np.arange(10) / 16
    boxes, scores, kps = decode_scrfd(outs, (size, size), 0.5)
    np.testing.assert_allclose(boxes, [[22, 4, 38, 20]])
    np.testing.assert_allclose(scores, [0.9], rtol=1e-6)
    np.testing.assert_allclose(kps[0], np.array([32, 16]) + np.arange(10).reshape(5, 2))
    keep = nms(np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float), np.array([0.8, 0.9, 0.5]))
    assert keep.tolist() == [1, 2]
    # a known similarity transform is recovered and alignment lands the keypoints on the template
    angle, scale, shift = 0.3, 2.0, np.array([50.0, 30.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE @ (scale * rot).T + shift
    m = similarity_transform(src, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(src @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE, atol=1e-9)
    img = np.zeros((300, 300, 3), np.uint8)
    for x, y in src.round().astype(int):
        img[y - 2:y + 3, x - 2:x + 3] = 255
    crop = align_face(img, src)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE.round().astype(int):
        assert crop[y, x].max() > 100


def _tiny_arcface_models(folder, size: int = 64) -> None:
    """A constant SCRFD-shaped detector (9 outputs, one face) and a 112 px 'recogniser' (mean colour x matrix)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["m"], keepdims=0), helper.make_node("Mul", ["m", "zero"], ["z"])]
    outputs = []
    for kind in range(3):
        for s in (8, 16, 32):
            n = (size // s) ** 2 * 2
            a = np.full((n, (1, 4, 10)[kind]), 0.1 if kind == 0 else 0.0, np.float32)
            if s == 16:
                i = (1 * (size // 16) + 2) * 2
                a[i] = {0: [0.9], 1: np.array([10, 12, 10, 12]) / 16,
                        2: np.array([-4, -3, 4, -3, 0, 1, -3, 5, 3, 5]) / 16}[kind]
            name = f"out{len(outputs)}"
            inits.append(numpy_helper.from_array(a, "c" + name))
            nodes.append(helper.make_node("Add", ["c" + name, "z"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)))
    det = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
                            outputs, inits)
    w = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    rec = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["data"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("MatMul", ["f", "w"], ["fc1"])], "rec",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 8])], [numpy_helper.from_array(w, "w")])
    for graph, name in ((det, "det_tiny.onnx"), (rec, "w_tiny.onnx")):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, str(folder / name))


@needs_onnx
def test_arcface_backend_end_to_end_on_tiny_onnx_models(tmp_path):
    from noclone.eval.evaluate import evaluate_images
    from noclone.eval.faces import get_backend

    _tiny_arcface_models(tmp_path)
    backend = get_backend("arcface", arcface_models=tmp_path)
    img = Image.fromarray(np.full((128, 128, 3), 200, np.uint8))
    boxes = backend.detect([img])
    np.testing.assert_allclose(boxes[0], [[44, 8, 84, 56]])  # (32 +- 10, 16 +- 12) at det scale 0.5
    emb, found = backend.embed([img, img])
    assert found.all() and emb.shape == (2, 8)
    np.testing.assert_allclose(emb[0], emb[1])
    r = evaluate_images([img], [img], ["ism", "fdfr"], backend="arcface", arcface_models=tmp_path)
    assert r["ism"] == pytest.approx(1.0) and r["fdfr"] == 0.0 and r["identity_match_rate"] == 1.0
    assert r["details"]["ism"]["threshold"] == pytest.approx(0.32)


# ------------------------------------------------------------------------------------------------------- DINO / CLIP-I


def test_mean_pairwise_cosine_hand_computed():
    from noclone.eval.dino import mean_pairwise_cosine

    assert mean_pairwise_cosine([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.5)
    assert mean_pairwise_cosine([[3.0, 4.0]], [[4.0, 3.0]]) == pytest.approx(24 / 25)
    g = [[1.0, 0.0], [0.0, 2.0]]
    r = [[1.0, 1.0], [-1.0, 0.0], [0.0, 5.0]]
    s = 1 / np.sqrt(2)
    expected = np.mean([s, -1.0, 0.0, s, 0.0, 1.0])
    assert mean_pairwise_cosine(g, r) == pytest.approx(expected)
    with pytest.raises(NocloneError, match="dimension"):
        mean_pairwise_cosine([[1.0, 0.0]], [[1.0, 0.0, 0.0]])


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=224, patch_size=16)  # dino-vits16's architecture, shrunk
    out = tmp_path_factory.mktemp("vit") / "dino-tiny"
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(out))
    return out


def test_dino_on_a_tiny_random_vit(tiny_vit_dir, astronaut):
    from transformers import ViTModel

    from noclone.eval.dino import IMAGENET_MEAN, IMAGENET_STD, load_image_encoder, preprocess

    images = [astronaut, _pil(skimage_data.chelsea()), _pil(skimage_data.coffee())]
    x = preprocess(images, "dino")
    assert x.shape == (3, 3, 224, 224)
    # hand-made DINO eval transform: shorter side 256 bicubic, centre 224, ImageNet normalisation
    w, h = images[1].size  # 451 x 300
    manual = images[1].resize((int(256 * w / h), 256), Image.Resampling.BICUBIC)
    left = int(round((manual.size[0] - 224) / 2))
    top = int(round((manual.size[1] - 224) / 2))
    manual = np.asarray(manual.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    manual = (manual - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(x[1].permute(1, 2, 0).numpy(), manual, atol=1e-5)
    encoder = load_image_encoder(tiny_vit_dir)
    assert encoder.kind == "dino"
    emb = encoder.embed(images)
    model = ViTModel.from_pretrained(str(tiny_vit_dir), add_pooling_layer=False).eval()
    with torch.no_grad():
        direct = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)


def test_dino_and_clip_metrics_through_evaluate(tiny_vit_dir, tmp_path, astronaut):
    from transformers import CLIPConfig, CLIPModel

    from noclone.eval.dino import load_image_encoder, mean_pairwise_cosine
    from noclone.eval.evaluate import evaluate_images

    torch.manual_seed(0)
    clip_dir = tmp_path / "clip-tiny"
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=224, patch_size=32),
        projection_dim=16)).save_pretrained(str(clip_dir))
    gen = [astronaut, ImageOps.mirror(astronaut)]
    ref = [_pil(skimage_data.chelsea())]
    r = evaluate_images(gen, ref, ["dino", "clip_i"], backend="dlib", dino_model=tiny_vit_dir, clip_model=clip_dir)
    enc = load_image_encoder(tiny_vit_dir)
    assert r["dino"] == pytest.approx(mean_pairwise_cosine(enc.embed(gen), enc.embed(ref)))
    assert -1.0 <= r["clip_i"] <= 1.0
    assert load_image_encoder(clip_dir).embed(ref).shape == (1, 16)
    assert "bicubic" in r["details"]["dino"]["preprocessing"]
    with pytest.raises(NocloneError, match="--dino-model"):
        evaluate_images(gen, ref, ["dino"], backend="dlib")
    with pytest.raises(NocloneError, match="config.json"):
        load_image_encoder(tmp_path)


# ------------------------------------------------------------------------------------------------------- FID / KID


def test_kid_hand_computed():
    from noclone.eval.fid import kid, polynomial_mmd2_unbiased

    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 1.0], [0.0, 0.0]])
    # k(a, b) = (a.b / 2 + 1)^3: k(x1, x2) = 1, k(y1, y2) = 1, k(x_i, y1) = 1.5^3, k(x_i, y2) = 1
    expected = 1.0 + 1.0 - 2.0 * (2 * 3.375 + 2 * 1.0) / 4
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(expected) == pytest.approx(-2.375)
    assert kid(x, y) == (pytest.approx(-2.375), 0.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))

    def brute(p, q):
        d = p.shape[1]
        k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
        m, n = len(p), len(q)
        sxx = sum(k(p[i], p[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        syy = sum(k(q[i], q[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        sxy = sum(k(p[i], q[j]) for i in range(m) for j in range(n)) / (m * n)
        return sxx + syy - 2 * sxy

    assert polynomial_mmd2_unbiased(a, b) == pytest.approx(brute(a, b))
    mean, std = kid(a, b + 1.0, subset_size=20, n_subsets=10)
    assert mean > 0.1 and std > 0
    assert abs(kid(a, b, subset_size=20, n_subsets=10)[0]) < 0.1
    with pytest.raises(NocloneError):
        kid(a[:1], b)


def test_frechet_distance_against_direct_scipy_reference():
    from scipy import linalg

    from noclone.eval.metrics import frechet_distance

    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 4))
    b = rng.normal(size=(40, 4)) @ rng.normal(size=(4, 4)) + 0.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-9)
    # 1-D closed form: (mu1 - mu2)^2 + (sigma1 - sigma2)^2
    u, v = rng.normal(size=(30, 1)), 3 * rng.normal(size=(30, 1)) + 2
    closed = (u.mean() - v.mean()) ** 2 + (u.std(ddof=1) - v.std(ddof=1)) ** 2
    assert frechet_distance(u, v) == pytest.approx(closed, rel=1e-9)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from safetensors.torch import save_file

    from noclone.eval.fid import InceptionFeatures

    torch.manual_seed(0)
    model = InceptionFeatures("fid")
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1008, 2048, dtype=torch.float16)  # the FID network's 1008-way classifier
    state["fc.bias"] = torch.zeros(1008, dtype=torch.float16)
    out = tmp_path_factory.mktemp("inception") / "pt_inception-tiny-random.safetensors"
    save_file(state, str(out))
    return out, state


def test_inception_weights_load_and_give_pool_features(inception_file, tmp_path, astronaut):
    from noclone.eval.fid import inception_features, load_inception

    path, state = inception_file
    net = load_inception(path)
    assert net.variant == "fid"
    feats = inception_features(net, [astronaut, _pil(skimage_data.chelsea())])
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and (feats >= 0).all()
    pth = tmp_path / "w.pth"
    torch.save({k: v.float() for k, v in state.items()}, str(pth))
    with pytest.raises(NocloneError, match="allow-pickle"):
        load_inception(pth)
    assert load_inception(pth, allow_pickle=True).variant == "fid"
    tv = dict(state)
    tv["fc.weight"] = torch.zeros(1000, 2048)
    tv.pop("Mixed_7c.branch_pool.conv.weight")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(tv, str(bad))
    with pytest.raises(NocloneError, match="missing Mixed_7c.branch_pool.conv.weight"):
        load_inception(bad)


# ------------------------------------------------------------------------------------------------------- evaluate


@pytest.fixture
def sandbox_evaluator(monkeypatch):
    """The shipped sandbox evaluator, or (while its weights are absent) a random one: plumbing only."""
    import noclone.sandbox.evaluator as E

    if (E.DEFAULT_WEIGHTS_DIR / "model.safetensors").is_file():
        return E.load_default_evaluator()
    torch.manual_seed(0)
    ev = E.SandboxEvaluator().eval()
    monkeypatch.setattr(E, "load_default_evaluator", lambda: ev)
    return ev


def _renders(folder, photos, size=64):
    from noclone.sandbox.render import render
    from noclone.sandbox.splits import held_out

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for p in photos:
        im = render("person", held_out(3), p, size=size)
        im.save(folder / f"p{p}.png")
        images.append(im)
    return images


def test_evaluate_sandbox_backend_matches_sandbox_scores(sandbox_evaluator, tmp_path):
    from noclone.eval.evaluate import evaluate_folders, print_table, sandbox_scores

    gen = _renders(tmp_path / "gen", range(4, 8))
    ref = _renders(tmp_path / "ref", range(4))
    r = evaluate_folders(tmp_path / "gen", tmp_path / "ref", metrics=["ism", "fdfr", "dino", "fid", "kid"],
                         json_out=tmp_path / "out.json")
    old = sandbox_scores(gen, ref, "person", ("ism", "fdfr", "fid"))
    for key in ("ism", "identity_match_rate", "fdfr", "fid", "threshold"):
        assert r[key] == pytest.approx(old[key], abs=1e-9), key
    assert r["kid"] is not None and r["dino"] is not None
    saved = json.loads((tmp_path / "out.json").read_text())
    assert {"ism", "identity_match_rate", "fdfr", "brisque", "n_images", "details"} <= set(saved)
    assert saved["details"]["dino"]["model"].startswith("sandbox evaluator")
    print_table(r)


def test_evaluate_errors_are_one_line(tmp_path, sandbox_evaluator):
    from noclone.eval.evaluate import evaluate_folders

    gen, ref, empty = tmp_path / "gen", tmp_path / "ref", tmp_path / "empty"
    empty.mkdir()
    _renders(gen, [0, 1])
    _renders(ref, [2])
    with pytest.raises(NocloneError, match="found 0 images"):
        evaluate_folders(empty, ref)
    with pytest.raises(NocloneError, match="no such directory"):
        evaluate_folders(tmp_path / "missing", ref)
    with pytest.raises(NocloneError, match="unknown metric"):
        evaluate_folders(gen, ref, metrics=["ism", "lpips"])
    with pytest.raises(NocloneError, match="backend 'insightface' is not available"):
        evaluate_folders(gen, ref, backend="insightface")
    with pytest.raises(NocloneError, match="at least 2"):
        evaluate_folders(gen, ref, metrics=["fid"])
    (gen / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(NocloneError, match="broken.png") as err:
        evaluate_folders(gen, ref)
    assert "\n" not in str(err.value)
