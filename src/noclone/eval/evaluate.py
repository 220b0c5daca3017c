"""`noclone evaluate`: identity and quality metrics of a folder of generated images against reference photos."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from noclone.data.atomic import atomic_write_json
from noclone.data.images import load_image_folder
from noclone.errors import NocloneError
from noclone.eval import metrics as M

log = logging.getLogger(__name__)

KNOWN_METRICS = ("ism", "fdfr", "fid")
BACKENDS = ("sandbox",)


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


def evaluate_folders(generated: str | Path, reference: str | Path, metrics: Sequence[str] = ("ism", "fdfr"),
                     backend: str = "sandbox", class_noun: str = "person", json_out: str | Path | None = None) -> dict:
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise NocloneError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(KNOWN_METRICS)}")
    if backend not in BACKENDS:
        raise NocloneError(f"backend {backend!r} is not available; available: {', '.join(BACKENDS)}")
    gen = [im for _, im in load_image_folder(generated, min_count=1)]
    ref = [im for _, im in load_image_folder(reference, min_count=1)]
    result = sandbox_scores(gen, ref, class_noun, metrics)
    result.update({"generated": str(generated), "reference": str(reference), "metrics": list(metrics)})
    if json_out:
        atomic_write_json(json_out, result)
    return result


def print_table(result: dict) -> None:
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    print(f"backend: {result.get('backend')}   generated: {result.get('generated')}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
