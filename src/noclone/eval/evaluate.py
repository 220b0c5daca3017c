"""`noclone evaluate`: identity and quality metrics of a folder of generated images against reference photos.

Metrics (``--metrics``, comma-separated):

``ism``      Identity Score Matching: mean cosine between each generated face embedding and the normalised mean of
             the (normalised) reference embeddings, over the generated images where a face was found (one face per
             image: the biggest, as Anti-DreamBooth does, or dlib's most confident). Also gives
             ``identity_match_rate``: the fraction of *all* generated images whose cosine is >= the backend's
             threshold (no face = no match).
``fdfr``     Face Detection Failure Rate: the fraction of generated images with no face (no subject of
             ``class_noun`` for the sandbox backend).
``brisque``  mean BRISQUE of the generated images (lower is better), see :mod:`noclone.eval.brisque`.
``dino``     mean cosine over all (generated, reference) pairs of DINO ViT-S/16 CLS embeddings (``dino_model``, a local
             HF directory); with the sandbox backend and no model, the sandbox evaluator's embedding stands in.
``clip_i``   the same with CLIP image embeddings (``clip_model``).
``fid``      Frechet distance between the generated and reference sets, on Inception pool features when
             ``inception`` (a weights file) is given, else on the sandbox evaluator's pooled features.
``kid``      Kernel Inception Distance (unbiased polynomial MMD^2) on the same features as ``fid``.

Backends for ism/fdfr (``--backend``): ``sandbox`` (default), ``dlib``, ``arcface`` (see :mod:`noclone.eval.faces`).

The result (and ``--json``) is a flat dict of numbers (``ism``, ``identity_match_rate``, ``fdfr``, ``brisque``,
``n_images`` are always present, null when not requested or not defined) plus ``details``: per metric, the backend,
model, threshold and what the number is averaged over, and ``warnings`` (a list of lines: the sandbox backend's
identity scores on images that are not 64x64 sandbox renders). The printed table shows the requested metrics only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from noclone.data.atomic import atomic_write_json
from noclone.data.images import load_image_folder
from noclone.errors import NocloneError
from noclone.eval import metrics as M

log = logging.getLogger(__name__)

KNOWN_METRICS = ("ism", "fdfr", "brisque", "dino", "clip_i", "fid", "kid")
BACKENDS = ("sandbox", "dlib", "arcface")
ALWAYS_KEYS = ("ism", "identity_match_rate", "fdfr", "brisque", "n_images")
# the result keys each metric fills (what the printed table shows when that metric is requested)
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "ism": ("ism", "identity_match_rate", "threshold"), "fdfr": ("fdfr",), "brisque": ("brisque", "brisque_std"),
    "dino": ("dino",), "clip_i": ("clip_i",), "fid": ("fid",), "kid": ("kid", "kid_std"),
}
COUNT_KEYS = ("n_images", "n_references")
SANDBOX_SIZE = 64  # the sandbox evaluator's renders (and input) are 64x64
SANDBOX_ON_REAL_PHOTOS = ("the sandbox evaluator was trained on the 64 px sandbox world only (these images are not "
                          "64x64): its identity scores on real photos are meaningless; use --backend dlib or arcface")
_warned: set[str] = set()  # warnings already logged in this process: a bench of many cells warns once, not per cell


def _warn_once(message: str) -> None:
    """logging.warning the first time a message comes up in this process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _image_size(image) -> tuple[int, int] | None:
    """(width, height) of a PIL image or an HWC array; None for anything else (nothing to judge)."""
    if hasattr(image, "size") and isinstance(image.size, tuple):
        return tuple(image.size)
    shape = getattr(image, "shape", None)
    return (int(shape[1]), int(shape[0])) if shape is not None and len(shape) >= 2 else None


def sandbox_input_warnings(*image_sets: Sequence) -> list[str]:
    """The warning for identity scores of the sandbox evaluator on images that are not 64x64 sandbox renders."""
    sizes = {_image_size(im) for images in image_sets for im in images} - {None}
    return [SANDBOX_ON_REAL_PHOTOS] if sizes - {(SANDBOX_SIZE, SANDBOX_SIZE)} else []


def sandbox_scores(generated: Sequence, references: Sequence, class_noun: str,
                   metrics: Sequence[str] = ("ism", "fdfr")) -> dict:
    """Metrics of generated images (PIL or uint8 arrays) with the sandbox evaluator."""
    from noclone.sandbox.evaluator import load_default_evaluator

    evaluator = load_default_evaluator()
    result: dict = {"n_images": len(generated), "n_references": len(references), "backend": "sandbox",
                    "class_noun": class_noun}
    if "ism" in metrics:
        gen_emb, ref_emb = evaluator.embed_images(list(generated)), evaluator.embed_images(list(references))
        result["ism"] = M.ism(gen_emb, ref_emb)
        result["identity_match_rate"] = M.identity_match_rate(gen_emb, ref_emb, evaluator.threshold)
        result["threshold"] = float(evaluator.threshold)
    if "fdfr" in metrics:
        result["fdfr"] = M.fdfr(evaluator.detect(list(generated), class_noun))
    if "fid" in metrics:
        if len(generated) < 2 or len(references) < 2:
            raise NocloneError("fid needs at least 2 generated and 2 reference images")
        result["fid"] = M.frechet_distance(evaluator.features(list(generated)), evaluator.features(list(references)))
    return result


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """'ism, fdfr' or ['ism', 'fdfr'] -> a de-duplicated list of known metric names (error on unknown/empty)."""
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for m in items:
        m = str(m).strip().lower().replace("-", "_")
        if m == "clip":
            m = "clip_i"
        if m and m not in out:
            out.append(m)
    unknown = [m for m in out if m not in KNOWN_METRICS]
    if unknown:
        raise NocloneError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(KNOWN_METRICS)}")
    if not out:
        raise NocloneError(f"no metrics given; available: {', '.join(KNOWN_METRICS)}")
    return out


def _identity(face, gen: list, ref: list, class_noun: str, result: dict, details: dict) -> None:
    ref_emb, ref_found = face.embed(ref, class_noun)
    if not ref_found.any():
        raise NocloneError(f"ism: the {face.name} backend found no face in any of the {len(ref)} reference images")
    gen_emb, gen_found = face.embed(gen, class_noun)
    refs = ref_emb[ref_found]
    info = face.describe()
    if gen_found.any():
        cos = M._l2n(gen_emb[gen_found]) @ M._reference_center(refs)
        result["ism"] = float(cos.mean())
        matches = int((cos >= face.threshold).sum())
    else:
        result["ism"] = None
        matches = 0
    result["identity_match_rate"] = matches / len(gen)
    result["threshold"] = float(face.threshold)
    details["ism"] = {
        **info,
        "definition": "mean cosine(generated face embedding, normalised mean of normalised reference embeddings)",
        "averaged_over": ("all generated images (the sandbox embedding needs no detection)" if face.name == "sandbox"
                          else "generated images with a face (one face each: "
                          + ("the most confident" if face.name == "dlib" else "the biggest") + ")"),
        "n_generated_with_face": int(gen_found.sum()),
        "n_references_with_face": int(ref_found.sum()),
        **({"note": "no face found in any generated image"} if not gen_found.any() else {}),
    }
    details["identity_match_rate"] = {
        **info,
        "rule": "cosine to the reference centre >= threshold; a generated image without a face is not a match",
        "averaged_over": "all generated images",
        "n_matches": matches,
    }


def _stand_in_allowed(metric: str, backend: str, option: str) -> None:
    if backend != "sandbox":
        raise NocloneError(f"{metric} needs {option} DIR (a local Hugging Face model directory) with the "
                           f"{backend} backend; only the sandbox backend has a stand-in embedding")


def evaluate_images(gen: Sequence, ref: Sequence, metrics: Sequence[str] = ("ism", "fdfr"),
                    backend: str = "sandbox", class_noun: str = "person", *,
                    dino_model: str | Path | None = None, clip_model: str | Path | None = None,
                    inception: str | Path | None = None, allow_pickle: bool = False,
                    arcface_models: str | Path | None = None, identity_threshold: float | None = None,
                    kid_subset_size: int = 1000, face_backend=None) -> dict:
    """The metrics of generated images against reference images (PIL images); see the module docstring."""
    from noclone.eval.faces import get_backend

    metrics = parse_metrics(metrics)
    if backend not in BACKENDS:
        raise NocloneError(f"backend {backend!r} is not available; available: {', '.join(BACKENDS)}")
    gen, ref = list(gen), list(ref)
    if not gen:
        raise NocloneError("no generated images given")
    if not ref:
        raise NocloneError("no reference images given")
    result: dict = {k: None for k in ALWAYS_KEYS}
    result.update({"n_images": len(gen), "n_references": len(ref), "backend": backend, "class_noun": class_noun})
    details: dict = {}
    if "dino" in metrics and not dino_model:
        _stand_in_allowed("dino", backend, "--dino-model")
    if "clip_i" in metrics and not clip_model:
        _stand_in_allowed("clip_i", backend, "--clip-model")
    if ("fid" in metrics or "kid" in metrics) and (len(gen) < 2 or len(ref) < 2):
        raise NocloneError("fid/kid need at least 2 generated and 2 reference images")
    needs_face = "ism" in metrics or "fdfr" in metrics
    needs_sandbox = backend == "sandbox" or (("fid" in metrics or "kid" in metrics) and not inception) or \
        ("dino" in metrics and not dino_model) or ("clip_i" in metrics and not clip_model)
    evaluator = None
    if needs_sandbox:
        from noclone.sandbox.evaluator import load_default_evaluator

        evaluator = load_default_evaluator()
    face = face_backend
    if needs_face and face is None:
        face = get_backend(backend, arcface_models=arcface_models, threshold=identity_threshold, evaluator=evaluator)
    if face is not None:
        face.check_class(class_noun)
    # in the library, not the CLI, so API and bench users are told too; the JSON records it as well
    sandbox_identity = needs_face and getattr(face, "name", None) == "sandbox"
    result["warnings"] = sandbox_input_warnings(gen, ref) if sandbox_identity else []
    for message in result["warnings"]:
        _warn_once(message)

    if "ism" in metrics:
        _identity(face, gen, ref, class_noun, result, details)
    if "fdfr" in metrics:
        found = face.detected(gen, class_noun)
        result["fdfr"] = M.fdfr(found)
        details["fdfr"] = {"backend": face.name, "class_noun": class_noun, "n_detected": int(found.sum()),
                           "definition": "fraction of generated images in which no face/subject was detected"}
    if "brisque" in metrics:
        from noclone.eval.brisque import brisque_scores, load_brisque_model

        model = load_brisque_model()
        scores = brisque_scores(gen, model)
        result["brisque"] = float(scores.mean())
        result["brisque_std"] = float(scores.std())
        details["brisque"] = {"model": f"LIVE epsilon-SVR from {model.source}", "lower_is_better": True,
                              "averaged_over": "all generated images"}
    for metric, model_dir in (("dino", dino_model), ("clip_i", clip_model)):
        if metric not in metrics:
            continue
        if model_dir:
            from noclone.eval.dino import load_image_encoder, mean_pairwise_cosine

            encoder = load_image_encoder(model_dir, "dino" if metric == "dino" else "clip")
            result[metric] = mean_pairwise_cosine(encoder.embed(gen), encoder.embed(ref))
            details[metric] = {**encoder.describe(), "averaged_over": "all (generated, reference) pairs"}
        else:
            from noclone.eval.dino import mean_pairwise_cosine

            result[metric] = mean_pairwise_cosine(evaluator.embed_images(gen), evaluator.embed_images(ref))
            details[metric] = {"model": "sandbox evaluator identity embedding (stand-in for a real ViT)",
                               "averaged_over": "all (generated, reference) pairs"}
    if "fid" in metrics or "kid" in metrics:
        if inception:
            from noclone.eval.fid import inception_features, load_inception

            net = load_inception(inception, allow_pickle=allow_pickle)
            fa, fb = inception_features(net, gen), inception_features(net, ref)
            source = f"Inception-v3 pool3 (2048-d, {net.variant} variant) from {inception}"
        else:
            if backend != "sandbox":
                log.warning("fid/kid without --inception use the sandbox evaluator's features: not comparable "
                            "to published FIDs")
            fa, fb = evaluator.features(gen), evaluator.features(ref)
            source = f"sandbox evaluator pooled features ({fa.shape[1]}-d); pass --inception for real FID"
        if "fid" in metrics:
            result["fid"] = M.frechet_distance(fa, fb)
            details["fid"] = {"features": source, "n_generated": len(gen), "n_reference": len(ref)}
            if min(len(gen), len(ref)) < fa.shape[1]:
                details["fid"]["note"] = (f"fewer images than feature dimensions ({fa.shape[1]}): the covariances are "
                                          "singular and FID is strongly biased upwards; compare only like with like")
        if "kid" in metrics:
            from noclone.eval.fid import kid

            mean, std = kid(fa, fb, subset_size=kid_subset_size)
            result["kid"], result["kid_std"] = mean, std
            details["kid"] = {"features": source, "kernel": "(x.y/d + 1)^3", "estimator": "unbiased MMD^2",
                              "subset_size": min(int(kid_subset_size), len(gen), len(ref))}
    result["metrics"] = list(metrics)
    result["details"] = details
    return result


def evaluate_folders(generated: str | Path, reference: str | Path, metrics: Sequence[str] = ("ism", "fdfr"),
                     backend: str = "sandbox", class_noun: str = "person", json_out: str | Path | None = None,
                     *, dino_model: str | Path | None = None, clip_model: str | Path | None = None,
                     inception: str | Path | None = None, allow_pickle: bool = False,
                     arcface_models: str | Path | None = None, identity_threshold: float | None = None,
                     kid_subset_size: int = 1000) -> dict:
    """Load both folders (every image must load; empty folders are errors), evaluate, optionally write JSON."""
    metrics = parse_metrics(metrics)
    if backend not in BACKENDS:
        raise NocloneError(f"backend {backend!r} is not available; available: {', '.join(BACKENDS)}")
    gen = [im for _, im in load_image_folder(generated, min_count=1)]
    ref = [im for _, im in load_image_folder(reference, min_count=1)]
    result = evaluate_images(gen, ref, metrics, backend, class_noun, dino_model=dino_model, clip_model=clip_model,
                             inception=inception, allow_pickle=allow_pickle, arcface_models=arcface_models,
                             identity_threshold=identity_threshold, kid_subset_size=kid_subset_size)
    result.update({"generated": str(generated), "reference": str(reference)})
    if json_out:
        atomic_write_json(json_out, result)
    return result


def _requested(result: dict) -> list[str]:
    """The metrics a result was asked for (older results without `metrics`: those with a value)."""
    if result.get("metrics"):
        return [m for m in result["metrics"] if m in METRIC_KEYS]
    return [m for m, keys in METRIC_KEYS.items() if any(result.get(k) is not None for k in keys)]


def print_table(result: dict) -> None:
    """The result as a short table: the requested metrics and the image counts only (the JSON keeps every key)."""
    requested = _requested(result)
    keys = [k for m in requested for k in METRIC_KEYS[m] if k in result] + [k for k in COUNT_KEYS if k in result]
    rows = [(k, result[k]) for k in keys if isinstance(result[k], (int, float)) and not isinstance(result[k], bool)]
    width = max([len(k) for k in keys] + [8])
    print(f"backend: {result.get('backend')}   generated: {result.get('generated')}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    # a requested metric can still be undefined (e.g. ism when no generated image has a face): say so
    undefined = [m for m in requested if result.get(m) is None]
    if undefined:
        print(f"  {'(n/a)':<{width}}  {', '.join(undefined)}")
    details = result.get("details") or {}
    for metric, info in details.items():
        bits = []
        if "threshold" in info and metric == "identity_match_rate":
            bits.append(f"threshold {info['threshold']:g} ({info.get('threshold_measure', 'cosine')})")
        for key in ("model", "features", "note"):
            if key in info:
                bits.append(str(info[key]))
        if bits:
            print(f"  {metric}: {'; '.join(bits)}")
