"""Face (subject) detection and identity embedding backends behind one small interface.

Every backend has

* ``detect(images, class_noun) -> list[np.ndarray]``: per image, the boxes ``[k, 4]`` (left, top, right, bottom in
  pixels) of the subjects found, the one the embedding uses first (see each backend);
* ``embed(images, class_noun) -> (embeddings [N, D] float64, found bool [N])``: one identity embedding per image,
  taken from its first face (rows of images without a face are NaN and ``found`` is False there);
* ``threshold``: the cosine similarity at or above which two embeddings are "the same identity", and
  ``threshold_source`` saying where that number comes from.

Backends:

``sandbox``  the sandbox evaluator (noclone's embedded ArcFace/RetinaFace analogue). ``detect`` is its subject
             classifier (one full-image box when the class is recognised); ``embed`` embeds every image (found is
             all True: the sandbox embedding needs no detection, as before). Threshold: its stored 1%-FAR cosine.
``dlib``     dlib's HOG frontal face detector (upsampling once, as ``face_recognition`` does) and its 128-d ResNet
             descriptor (5-point landmarks, 150-px chip) from the ``dlib-bin`` and ``face-recognition-models``
             packages: offline, CPU. dlib's own rule is "euclidean distance < 0.6"; its descriptors are not unit
             length (norm about 1.3-1.5), so the cosine equivalent used here is 0.93 (cosine distance 0.07, the
             conversion DeepFace ships for dlib). The embedded face is the *most confident* detection, not the
             biggest: HOG's scale pyramid makes its false positives as big as real faces (on the astronaut photo a
             0.12-score box on her suit is as big as her 1.16-score face, and bigger after resizing).
             Install with ``pip install 'noclone[faces]'``.
``arcface``  an insightface-layout model folder (e.g. ``buffalo_l``: an SCRFD detector ``det_*.onnx`` with five
             keypoints and an ArcFace recogniser taking 112x112 crops) run with onnxruntime: detect at 640x640,
             score >= 0.5, NMS 0.4; align the five keypoints to the ArcFace template by a similarity transform;
             input (x - 127.5) / 127.5 RGB. Threshold 0.32 (DeepFace's ArcFace cosine distance 0.68, the stack
             Anti-DreamBooth's ISM/FDFR evaluation uses). The model files are not downloadable here: pass a folder.

Detections per image follow the papers' protocol (Anti-DreamBooth's ``ism_fdfr.py``): an image with no face is a
detection failure (FDFR); ISM is averaged over the images with a face, using the biggest face (arcface) or the most
confident one (dlib, see above).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from noclone.errors import NocloneError

__all__ = [
    "BACKENDS",
    "ArcFaceBackend",
    "DlibBackend",
    "FaceBackend",
    "SandboxBackend",
    "get_backend",
]

BACKENDS = ("sandbox", "dlib", "arcface")
FACES_EXTRA = "pip install 'noclone[faces]'"


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise NocloneError(f"expected an RGB image, got an array of shape {a.shape}")
    a = a[:, :, :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _by_area(boxes: np.ndarray, *extra: np.ndarray):
    if len(boxes) == 0:
        return (boxes, *extra)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-area, kind="stable")
    return (boxes[order], *(e[order] for e in extra))


class FaceBackend(ABC):
    """The interface; see the module docstring."""

    name = "base"
    threshold: float = 0.5
    threshold_source = ""
    classes: tuple[str, ...] = ("person",)

    def check_class(self, class_noun: str) -> None:
        if class_noun not in self.classes:
            raise NocloneError(
                f"the {self.name} backend detects {', '.join(self.classes)} only, not {class_noun!r}"
                + ("; use --backend sandbox for sandbox dogs and cats" if self.name != "sandbox" else "")
            )

    @abstractmethod
    def detect(self, images: Sequence, class_noun: str = "person") -> list[np.ndarray]:
        """Per image, the subject boxes found (an empty array when none)."""

    def detected(self, images: Sequence, class_noun: str = "person") -> np.ndarray:
        """bool [N]: at least one subject found in each image."""
        return np.array([len(b) > 0 for b in self.detect(images, class_noun)], dtype=bool)

    @abstractmethod
    def embed(self, images: Sequence, class_noun: str = "person") -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the images where a subject was found, bool mask of those images)."""

    def describe(self) -> dict:
        return {"backend": self.name, "threshold": float(self.threshold), "threshold_measure": "cosine",
                "threshold_source": self.threshold_source}


# ------------------------------------------------------------------------------------------------------- sandbox


class SandboxBackend(FaceBackend):
    name = "sandbox"

    def __init__(self, evaluator=None, threshold: float | None = None):
        if evaluator is None:
            from noclone.sandbox.evaluator import load_default_evaluator

            evaluator = load_default_evaluator()
        from noclone.sandbox.evaluator import SUBJECT_CLASSES

        self.evaluator = evaluator
        self.classes = tuple(SUBJECT_CLASSES)
        self.threshold = float(evaluator.threshold if threshold is None else threshold)
        self.threshold_source = ("sandbox evaluator: cosine at 1% false-accept rate on held-out identities"
                                 if threshold is None else "given by the user")

    def detect(self, images, class_noun="person"):
        self.check_class(class_noun)
        images = list(images)
        if not images:
            return []
        found = self.evaluator.detect(images, class_noun)
        boxes = []
        for im, ok in zip(images, found):
            w, h = im.size if isinstance(im, Image.Image) else (np.asarray(im).shape[1], np.asarray(im).shape[0])
            boxes.append(np.array([[0.0, 0.0, float(w), float(h)]]) if ok else np.zeros((0, 4)))
        return boxes

    def embed(self, images, class_noun="person"):
        images = list(images)
        if not images:
            raise NocloneError("no images given")
        emb = np.asarray(self.evaluator.embed_images(images), dtype=np.float64)
        return emb, np.ones(len(images), dtype=bool)


# ------------------------------------------------------------------------------------------------------- dlib


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _dlib_models():
    try:
        import dlib
    except ImportError:
        raise NocloneError(f"the dlib face backend needs dlib: {FACES_EXTRA} (dlib-bin + face-recognition-models)") from None
    # Located without importing face_recognition_models (its __init__ needs pkg_resources, gone in setuptools>=81).
    root = _package_dir("face_recognition_models")
    if root is None:
        raise NocloneError(f"the dlib face backend needs the face-recognition-models package: {FACES_EXTRA}")
    models = root / "models"
    landmarks = models / "shape_predictor_5_face_landmarks.dat"
    resnet = models / "dlib_face_recognition_resnet_model_v1.dat"
    for f in (landmarks, resnet):
        if not f.is_file():
            raise NocloneError(f"{f}: dlib model file missing; reinstall face-recognition-models ({FACES_EXTRA})")
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(landmarks)), \
        dlib.face_recognition_model_v1(str(resnet))


class DlibBackend(FaceBackend):
    name = "dlib"
    DEFAULT_THRESHOLD = 0.93

    def __init__(self, threshold: float | None = None, upsample: int = 1, max_side: int = 1280):
        self._dlib, self._detector, self._landmarks, self._resnet = _dlib_models()
        self.upsample = int(upsample)
        self.max_side = int(max_side)
        self.threshold = float(self.DEFAULT_THRESHOLD if threshold is None else threshold)
        self.threshold_source = (
            "dlib's same-person rule (euclidean distance < 0.6 between 128-d descriptors) as a cosine: 0.93 "
            "(cosine distance 0.07, DeepFace's conversion; dlib descriptors have norm ~1.3-1.5)"
            if threshold is None else "given by the user")

    def _detect_one(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = a.shape[:2]
        scale = 1.0
        small = a
        if max(h, w) > self.max_side:  # HOG time grows with pixels x upsample^2: detect on a smaller copy
            scale = self.max_side / max(h, w)
            small = np.asarray(Image.fromarray(a).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                         Image.Resampling.BILINEAR))
        rects, scores, _ = self._detector.run(small, self.upsample, 0.0)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], dtype=np.float64) / scale
        boxes = boxes.reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        order = np.argsort(-scores, kind="stable")  # most confident first
        return boxes[order], scores[order]

    def detect(self, images, class_noun="person"):
        self.check_class(class_noun)
        return [self._detect_one(_as_rgb_array(im))[0] for im in images]

    def embed(self, images, class_noun="person"):
        self.check_class(class_noun)
        images = list(images)
        if not images:
            raise NocloneError("no images given")
        out = np.full((len(images), 128), np.nan)
        found = np.zeros(len(images), dtype=bool)
        for i, im in enumerate(images):
            a = _as_rgb_array(im)
            boxes, _ = self._detect_one(a)
            if len(boxes) == 0:
                continue
            l, t, r, b = (int(round(v)) for v in boxes[0])
            shape = self._landmarks(a, self._dlib.rectangle(l, t, r, b))
            out[i] = np.asarray(self._resnet.compute_face_descriptor(a, shape, 0), dtype=np.float64)
            found[i] = True
        return out, found


# ------------------------------------------------------------------------------------------------------- arcface

# The five-point ArcFace alignment template for 112x112 crops (eyes, nose tip, mouth corners).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping src points onto dst (least squares, Umeyama)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    var_s = (s**2).sum() / len(src)
    scale = (sig * sign).sum() / var_s if var_s > 0 else 1.0
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The ArcFace crop: warp so the five keypoints land on the template (bilinear, black outside)."""
    m = similarity_transform(keypoints, ARCFACE_TEMPLATE * (size / 112.0))
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]  # PIL maps output -> input
    warped = Image.fromarray(image).transform((size, size), Image.Transform.AFFINE, tuple(inv.reshape(-1)),
                                              resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(warped)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.4) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (insightface's +1 pixel area convention)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][ovr <= iou]
    return np.array(keep, dtype=np.int64)


def decode_scrfd(outputs: Sequence[np.ndarray], input_hw: tuple[int, int], score_threshold: float = 0.5):
    """SCRFD heads -> (boxes [k, 4], scores [k], keypoints [k, 5, 2] or None) in network-input pixels, pre-NMS.

    ``outputs`` are the model's outputs in order: scores per stride, then box distances per stride, then (if 9 or
    15 outputs) keypoint distances per stride. 6/9 outputs: strides 8, 16, 32 with 2 anchors per cell; 10/15:
    strides 8..128 with 1 anchor.
    """
    n = len(outputs)
    if n in (6, 9):
        strides, anchors = (8, 16, 32), 2
    elif n in (10, 15):
        strides, anchors = (8, 16, 32, 64, 128), 1
    else:
        raise NocloneError(f"not an SCRFD face detector: {n} outputs (expected 6, 9, 10 or 15)")
    fmc = len(strides)
    use_kps = n in (9, 15)
    all_scores, all_boxes, all_kps = [], [], []
    height, width = input_hw
    for i, stride in enumerate(strides):
        scores = np.asarray(outputs[i], dtype=np.float64).reshape(-1)
        dist = np.asarray(outputs[i + fmc], dtype=np.float64).reshape(-1, 4) * stride
        gh, gw = height // stride, width // stride
        ys, xs = np.mgrid[:gh, :gw]
        centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float64)
        centers = np.repeat(centers, anchors, axis=0)
        if len(centers) != len(scores):
            raise NocloneError(f"SCRFD output {i} has {len(scores)} scores, expected {len(centers)} for a "
                               f"{width}x{height} input")
        keep = scores >= score_threshold
        c = centers[keep]
        d = dist[keep]
        all_scores.append(scores[keep])
        all_boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], -1))
        if use_kps:
            k = np.asarray(outputs[i + 2 * fmc], dtype=np.float64).reshape(-1, 10)[keep] * stride
            all_kps.append(k.reshape(-1, 5, 2) + c[:, None, :])
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    boxes = np.concatenate(all_boxes).reshape(-1, 4)
    kps = np.concatenate(all_kps).reshape(-1, 5, 2) if use_kps else None
    return boxes, scores, kps


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise NocloneError(f"the arcface backend needs onnxruntime: {FACES_EXTRA}") from None
    return onnxruntime


class ArcFaceBackend(FaceBackend):
    name = "arcface"
    DEFAULT_THRESHOLD = 0.32

    def __init__(self, model_dir: str | Path | None, threshold: float | None = None, det_size: int = 640,
                 det_threshold: float = 0.5, nms_threshold: float = 0.4):
        if not model_dir:
            raise NocloneError("the arcface backend needs --arcface-models DIR: an insightface model folder "
                               "(e.g. buffalo_l) holding a SCRFD detector and an ArcFace recognition .onnx")
        folder = Path(model_dir)
        if not folder.is_dir():
            raise NocloneError(f"{folder}: no such directory (expected an insightface model folder with .onnx files)")
        files = sorted(folder.glob("*.onnx"))
        if not files:
            raise NocloneError(f"{folder}: no .onnx files (expected a SCRFD detector and an ArcFace recogniser)")
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.detector = self.recognizer = None
        for f in files:
            try:
                session = ort.InferenceSession(str(f), sess_options=options, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise NocloneError(f"{f}: onnxruntime cannot load it ({' '.join(str(exc).split())[:200]})") from None
            outs = session.get_outputs()
            shape = session.get_inputs()[0].shape
            if len(outs) in (6, 9, 10, 15) and self.detector is None:
                self.detector, self.detector_file = session, f
            elif (len(outs) == 1 and len(shape) == 4 and shape[2] == shape[3] and isinstance(shape[2], int)
                  and shape[2] == 112 and self.recognizer is None):
                self.recognizer, self.recognizer_file = session, f
        if self.detector is None:
            raise NocloneError(f"{folder}: no SCRFD face detector among {', '.join(p.name for p in files)} "
                               "(a model with 6, 9, 10 or 15 outputs)")
        if self.recognizer is None:
            raise NocloneError(f"{folder}: no ArcFace recogniser among {', '.join(p.name for p in files)} "
                               "(a model with one output and a 112x112 input)")
        if len(self.detector.get_outputs()) not in (9, 15):
            raise NocloneError(f"{self.detector_file}: this SCRFD model has no keypoint outputs; alignment needs them")
        shape = self.detector.get_inputs()[0].shape
        self.det_size = (shape[2], shape[3]) if all(isinstance(s, int) for s in shape[2:4]) else (det_size, det_size)
        self.det_threshold = float(det_threshold)
        self.nms_threshold = float(nms_threshold)
        self.threshold = float(self.DEFAULT_THRESHOLD if threshold is None else threshold)
        self.threshold_source = ("ArcFace cosine 0.32 (DeepFace's ArcFace cosine distance 0.68, the stack "
                                 "Anti-DreamBooth's ISM uses)" if threshold is None else "given by the user")

    def _faces(self, a: np.ndarray):
        h, w = a.shape[:2]
        dh, dw = self.det_size
        if h / w > dh / dw:
            new_h, new_w = dh, max(1, int(dh * w / h))
        else:
            new_w, new_h = dw, max(1, int(dw * h / w))
        scale = new_h / h
        canvas = np.zeros((dh, dw, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = np.asarray(Image.fromarray(a).resize((new_w, new_h), Image.Resampling.BILINEAR))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        name = self.detector.get_inputs()[0].name
        outs = self.detector.run(None, {name: blob})
        boxes, scores, kps = decode_scrfd(outs, (dh, dw), self.det_threshold)
        if len(scores):
            keep = nms(boxes, scores, self.nms_threshold)
            boxes, scores, kps = boxes[keep] / scale, scores[keep], kps[keep] / scale
        return _by_area(boxes.reshape(-1, 4), scores, kps.reshape(-1, 5, 2))

    def detect(self, images, class_noun="person"):
        self.check_class(class_noun)
        return [self._faces(_as_rgb_array(im))[0] for im in images]

    def embed(self, images, class_noun="person"):
        self.check_class(class_noun)
        images = list(images)
        if not images:
            raise NocloneError("no images given")
        name = self.recognizer.get_inputs()[0].name
        rows, found = [], np.zeros(len(images), dtype=bool)
        for i, im in enumerate(images):
            a = _as_rgb_array(im)
            boxes, _, kps = self._faces(a)
            if len(boxes) == 0:
                rows.append(None)
                continue
            crop = align_face(a, kps[0])
            blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
            rows.append(np.asarray(self.recognizer.run(None, {name: blob})[0], dtype=np.float64).reshape(-1))
            found[i] = True
        dim = next((len(r) for r in rows if r is not None), 512)
        out = np.full((len(images), dim), np.nan)
        for i, r in enumerate(rows):
            if r is not None:
                out[i] = r
        return out, found

    def describe(self) -> dict:
        d = super().describe()
        d.update({"detector": str(self.detector_file), "recognizer": str(self.recognizer_file)})
        return d


# ------------------------------------------------------------------------------------------------------- factory


def get_backend(name: str, *, arcface_models: str | Path | None = None, threshold: float | None = None,
                evaluator=None) -> FaceBackend:
    """A backend by name ("sandbox", "dlib" or "arcface"); a missing package is a one-line NocloneError."""
    if name == "sandbox":
        return SandboxBackend(evaluator, threshold)
    if name == "dlib":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DlibBackend(threshold)
    if name == "arcface":
        return ArcFaceBackend(arcface_models, threshold)
    raise NocloneError(f"backend {name!r} is not available; available: {', '.join(BACKENDS)}")
