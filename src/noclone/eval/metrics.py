"""Pure metric functions (numpy): identity similarity, match rate, detection failure, Frechet distance, ROC.

Every function takes plain arrays and returns a Python float; empty inputs raise NocloneError.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from noclone.errors import NocloneError

__all__ = [
    "ism",
    "identity_match_rate",
    "fdfr",
    "frechet_distance",
    "roc_auc",
    "threshold_at_far",
    "false_accept_rate",
    "true_accept_rate",
]


def _embeddings(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise NocloneError(f"{name}: expected a non-empty [N, D] array of embeddings, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise NocloneError(f"{name}: embeddings contain NaN or infinite values")
    return a


def _l2n(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise NocloneError(f"{name}: no scores given")
    if not np.isfinite(a).all():
        raise NocloneError(f"{name}: scores contain NaN or infinite values")
    return a


def _reference_center(references) -> np.ndarray:
    ref = _l2n(_embeddings(references, "references"))
    return _l2n(ref.mean(axis=0))


def _cosines_to_references(generated, references) -> np.ndarray:
    gen = _embeddings(generated, "generated")
    center = _reference_center(references)
    if gen.shape[1] != center.shape[0]:
        raise NocloneError(
            f"generated embeddings have dimension {gen.shape[1]} but references have {center.shape[0]}"
        )
    return _l2n(gen) @ center


def ism(generated: np.ndarray, references: np.ndarray) -> float:
    """Identity Score Matching: mean over generated of cosine(gen_i, normalize(mean(normalized references)))."""
    return float(_cosines_to_references(generated, references).mean())


def identity_match_rate(generated: np.ndarray, references: np.ndarray, threshold: float) -> float:
    """Fraction of generated embeddings whose cosine to the normalized mean reference is >= threshold."""
    return float((_cosines_to_references(generated, references) >= float(threshold)).mean())


def fdfr(detected: np.ndarray) -> float:
    """Face (subject) Detection Failure Rate: the fraction of False in a boolean detection array."""
    d = np.asarray(detected).reshape(-1)
    if d.size == 0:
        raise NocloneError("fdfr: no detection results given")
    return float(1.0 - d.astype(bool).mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ([N, D] each, N >= 2).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)); if the product's square root is not finite,
    eps is added to both diagonals; a complex result with negligible imaginary part is reduced to its real part.
    """
    a = _embeddings(feats_a, "feats_a")
    b = _embeddings(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise NocloneError(f"frechet_distance: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise NocloneError("frechet_distance: each feature set needs at least 2 samples")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False))
    s2 = np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max() if covmean.size else 0.0
        if imag > 1e-3 * max(1.0, float(np.abs(np.diagonal(covmean).real).max())):
            raise NocloneError(f"frechet_distance: matrix square root has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def roc_auc(genuine_scores, impostor_scores) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) formula: P(genuine > impostor) + 0.5 P(tie)."""
    g = _scores(genuine_scores, "genuine_scores")
    i = _scores(impostor_scores, "impostor_scores")
    allv = np.concatenate([g, i])
    uniq, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: ranks of a tied block are start+1 .. start+count
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    avg_rank = starts + (counts + 1) / 2.0
    ranks = avg_rank[inverse]
    n_g, n_i = g.size, i.size
    u = ranks[:n_g].sum() - n_g * (n_g + 1) / 2.0
    return float(u / (n_g * n_i))


def threshold_at_far(impostor_scores, far: float = 0.01) -> float:
    """Lowest threshold t whose false-accept rate mean(impostor >= t) is at most far."""
    s = _scores(impostor_scores, "impostor_scores")
    if not 0.0 <= far < 1.0:
        raise NocloneError(f"threshold_at_far: far must be in [0, 1), got {far}")
    s = np.sort(s)[::-1]
    k = int(np.floor(far * s.size + 1e-9))  # at most k impostors may be accepted
    return float(np.nextafter(s[k], np.inf))


def false_accept_rate(impostor_scores, threshold: float) -> float:
    """Fraction of impostor scores >= threshold."""
    return float((_scores(impostor_scores, "impostor_scores") >= threshold).mean())


def true_accept_rate(genuine_scores, threshold: float) -> float:
    """Fraction of genuine scores >= threshold."""
    return float((_scores(genuine_scores, "genuine_scores") >= threshold).mean())
