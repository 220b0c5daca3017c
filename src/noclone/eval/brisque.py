"""BRISQUE (Mittal, Moorthy & Bovik 2012): a no-reference image quality score, lower is better.

The 36 natural-scene-statistics features are computed here in numpy/scipy:

* the image becomes grey in [0, 1] (ITU-R 709 luma weights 0.2125/0.7154/0.0721, as ``skimage.color.rgb2gray``);
* MSCN coefficients ``(I - mu) / (sigma + 1/255)`` with a 7x7 Gaussian window (sigma 7/6, zero padding);
* a fit of the MSCN coefficients gives (shape, variance) and an asymmetric generalised Gaussian (AGGD) fit of each
  of the four neighbour products (horizontal, vertical, main and secondary diagonal) gives (shape, mean, left
  variance, right variance): 18 features. For the MSCN pair the default follows the ``brisque`` package (AGGD
  shape, mean of left/right variances); the paper's symmetric GGD fit is ``mscn_fit="ggd"``;
* the same 18 at half resolution (bicubic, a = -0.75, no antialiasing, sampled at pixel pairs' midpoints: the
  ``cv2.resize(..., fx=0.5, fy=0.5, interpolation=INTER_CUBIC)`` of the ``brisque`` package's code path).

The features are scaled to [-1, 1] with the LIVE ranges and scored by the LIVE-trained epsilon-SVR (RBF kernel,
770 support vectors) that the ``brisque`` PyPI package ships (``models/svm.txt`` in libsvm's text format and
``models/normalize.pickle``). Both files are read here directly, the SVR evaluated in numpy, so neither libsvm,
OpenCV nor the package's own code (which fails on numpy 2) is needed: only its data files. Install them with
``pip install 'noclone[metrics]'``.

Shape parameters are solved to machine precision (``brentq`` on the moment ratio) rather than looked up on the
original's 0.001 grid; scores agree with the ``brisque`` package (patched for numpy 2) to well within 0.5
(tests/test_real_metrics.py).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, optimize, special

from noclone.errors import NocloneError

__all__ = [
    "BrisqueModel",
    "brisque_features",
    "brisque_score",
    "brisque_scores",
    "load_brisque_model",
    "to_gray",
]

MIN_SIDE = 16
_EXTRA_HINT = "pip install 'noclone[metrics]' (or: pip install --no-deps brisque==0.2.0)"


# ------------------------------------------------------------------------------------------------------- features


def to_gray(image) -> np.ndarray:
    """A PIL image or an array (HxW, HxWx3, HxWx4; uint8 0..255 or float 0..1) as float64 grey in [0, 1]."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float64) / 65535.0
    elif a.dtype == bool:
        a = a.astype(np.float64)
    else:
        a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 3:
        a = a @ np.array([0.2125, 0.7154, 0.0721])
    if a.ndim != 2:
        raise NocloneError(f"brisque: expected a grey or RGB image, got an array of shape {np.asarray(image).shape}")
    if not np.isfinite(a).all():
        raise NocloneError("brisque: image contains NaN or infinite values")
    if min(a.shape) < MIN_SIDE:
        raise NocloneError(f"brisque: image is {a.shape[1]}x{a.shape[0]} pixels; needs at least {MIN_SIDE} per side")
    return a


@functools.lru_cache(maxsize=None)
def _gaussian_1d(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()  # the normalised 2-D window is the outer product of this with itself


def _blur(image: np.ndarray) -> np.ndarray:
    """``convolve2d(image, window, 'same')`` with zero padding, done separably (the window is symmetric)."""
    g = _gaussian_1d()
    out = ndimage.correlate1d(image, g, axis=0, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, g, axis=1, mode="constant", cval=0.0)


def mscn(gray: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a [0, 1] grey image."""
    mu = _blur(gray)
    sigma = np.sqrt(np.abs(_blur(gray * gray) - mu * mu))
    return (gray - mu) / (sigma + 1.0 / 255.0)


def _solve_shape(ratio_fn, target: float) -> float:
    """The shape a in [0.05, 50] with ratio_fn(a) == target (ratio_fn increasing); clamped at the ends."""
    lo, hi = 0.05, 50.0
    f_lo, f_hi = ratio_fn(lo) - target, ratio_fn(hi) - target
    if f_lo >= 0:
        return lo
    if f_hi <= 0:
        return hi
    return float(optimize.brentq(lambda a: ratio_fn(a) - target, lo, hi, xtol=1e-10))


def _aggd_ratio(a: float) -> float:
    return special.gamma(2.0 / a) ** 2 / (special.gamma(1.0 / a) * special.gamma(3.0 / a))


def ggd_fit(x: np.ndarray) -> tuple[float, float]:
    """Generalised Gaussian fit by moment matching: (shape alpha, variance E[x^2])."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    var = float(np.mean(x * x))
    mean_abs = float(np.mean(np.abs(x)))
    if var <= 0 or mean_abs <= 0:
        return 50.0, 0.0  # a constant patch: degenerate, as flat as the fit allows
    # (E|x|)^2 / E[x^2] = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), increasing in a
    return _solve_shape(_aggd_ratio, mean_abs**2 / var), var


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalised Gaussian fit: (shape nu, mean eta, left variance, right variance).

    Left side is x < 0, right side x >= 0 (as the ``brisque`` package splits them).
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    left, right = x[x < 0], x[x >= 0]
    left_var = float(np.mean(left * left)) if left.size else 0.0
    right_var = float(np.mean(right * right)) if right.size else 0.0
    sq = float(np.mean(x * x))
    if sq <= 0 or left_var <= 0 or right_var <= 0:
        return 50.0, 0.0, left_var, right_var
    gamma_hat = np.sqrt(left_var) / np.sqrt(right_var)
    r_hat = float(np.mean(np.abs(x))) ** 2 / sq
    r_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    nu = _solve_shape(_aggd_ratio, r_norm)
    const = np.sqrt(special.gamma(1.0 / nu) / special.gamma(3.0 / nu))
    eta = (np.sqrt(right_var) - np.sqrt(left_var)) * const * special.gamma(2.0 / nu) / special.gamma(1.0 / nu)
    return nu, float(eta), left_var, right_var


def _scale_features(gray: np.ndarray, mscn_fit: str) -> list[float]:
    m = mscn(gray)
    if mscn_fit == "ggd":
        alpha, var = ggd_fit(m)
    else:
        alpha, _, left_var, right_var = aggd_fit(m)
        var = (left_var + right_var) / 2.0
    feats = [alpha, var]
    pairs = (
        m[:, :-1] * m[:, 1:],  # horizontal
        m[:-1, :] * m[1:, :],  # vertical
        m[:-1, :-1] * m[1:, 1:],  # main diagonal
        m[1:, :-1] * m[:-1, 1:],  # secondary diagonal
    )
    for p in pairs:
        feats.extend(aggd_fit(p))
    return feats


def half_scale(gray: np.ndarray) -> np.ndarray:
    """Half-size bicubic resampling (Keys a = -0.75, edge replication, no antialiasing).

    Output pixel i samples the source at 2i + 0.5, the midpoint of pixels 2i and 2i+1, with the taps
    (-0.09375, 0.59375, 0.59375, -0.09375) on pixels 2i-1 .. 2i+2; the output size is round-half-even(n / 2)
    per side. This is exactly what ``cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)`` does.
    """
    taps = np.array([-0.09375, 0.59375, 0.59375, -0.09375])

    def along(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        m = int(np.rint(n * 0.5))
        base = 2 * np.arange(m)
        out = 0.0
        for k, w in zip((-1, 0, 1, 2), taps):
            idx = np.clip(base + k, 0, n - 1)
            out = out + w * np.take(a, idx, axis=axis)
        return out

    return along(along(gray, 0), 1)


def brisque_features(image, mscn_fit: str = "aggd") -> np.ndarray:
    """The 36 BRISQUE features (18 at full and 18 at half resolution) of an RGB/grey image.

    ``mscn_fit="aggd"`` (default) takes the MSCN shape from the AGGD fit and its variance as the mean of the left and
    right variances, as the ``brisque`` package does; ``"ggd"`` is the paper's symmetric GGD fit (shape from
    E|x|^2/E[x^2], variance E[x^2]). They differ little on photos (< 1 point) but by up to ~6 points on scanned text.
    """
    if mscn_fit not in ("aggd", "ggd"):
        raise NocloneError(f"brisque: mscn_fit must be 'aggd' or 'ggd', got {mscn_fit!r}")
    gray = to_gray(image)
    return np.asarray(_scale_features(gray, mscn_fit) + _scale_features(half_scale(gray), mscn_fit),
                      dtype=np.float64)


# ------------------------------------------------------------------------------------------------------- the SVR


@dataclass(frozen=True)
class BrisqueModel:
    """An epsilon-SVR with an RBF kernel (libsvm text model) and the per-feature min/max scaling ranges."""

    support_vectors: np.ndarray  # [n_sv, 36]
    coefficients: np.ndarray  # [n_sv]
    rho: float
    gamma: float
    feature_min: np.ndarray  # [36]
    feature_max: np.ndarray  # [36]
    source: str = ""

    def scale(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        return -1.0 + 2.0 * (f - self.feature_min) / (self.feature_max - self.feature_min)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """SVR outputs for [N, 36] (or [36]) raw features: sum_i coef_i exp(-gamma |x - sv_i|^2) - rho."""
        x = self.scale(np.atleast_2d(features))
        d2 = (x * x).sum(1)[:, None] + (self.support_vectors**2).sum(1)[None, :] - 2.0 * x @ self.support_vectors.T
        return np.exp(-self.gamma * np.maximum(d2, 0.0)) @ self.coefficients - self.rho


def parse_libsvm_model(text: str, n_features: int = 36) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(support vectors [n, n_features], coefficients [n], rho, gamma) of a libsvm epsilon-SVR RBF text model."""
    header: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines) and lines[i].strip() != "SV":
        key, _, value = lines[i].strip().partition(" ")
        header[key] = value.strip()
        i += 1
    if i == len(lines):
        raise NocloneError("brisque model: no 'SV' section in the libsvm model file")
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise NocloneError(
            f"brisque model: expected an epsilon_svr with an rbf kernel, got {header.get('svm_type')}/"
            f"{header.get('kernel_type')}"
        )
    rows = [ln.split() for ln in lines[i + 1:] if ln.strip()]
    sv = np.zeros((len(rows), n_features))
    coef = np.empty(len(rows))
    for r, parts in enumerate(rows):
        coef[r] = float(parts[0])
        for item in parts[1:]:
            idx, _, val = item.partition(":")
            j = int(idx) - 1
            if not 0 <= j < n_features:
                raise NocloneError(f"brisque model: feature index {idx} out of range 1..{n_features}")
            sv[r, j] = float(val)
    if "total_sv" in header and int(header["total_sv"]) != len(rows):
        raise NocloneError(f"brisque model: header says {header['total_sv']} support vectors, file has {len(rows)}")
    return sv, coef, float(header["rho"]), float(header["gamma"])


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain containers and numbers only: any class or function reference is refused."""

    def find_class(self, module, name):  # noqa: D401 - pickle API
        raise NocloneError(f"brisque scaling file refers to {module}.{name}; only plain lists and dicts are accepted")


def _package_model_dir() -> Path:
    try:
        spec = importlib.util.find_spec("brisque")  # locates the package without importing it (it needs cv2)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise NocloneError(f"the BRISQUE metric needs the LIVE model shipped in the 'brisque' package: {_EXTRA_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@functools.lru_cache(maxsize=4)
def _load_model(model_dir: str | None) -> BrisqueModel:
    folder = Path(model_dir) if model_dir else _package_model_dir()
    svm_file, norm_file = folder / "svm.txt", folder / "normalize.pickle"
    for f in (svm_file, norm_file):
        if not f.is_file():
            raise NocloneError(f"{f}: BRISQUE model file missing ({_EXTRA_HINT})")
    sv, coef, rho, gamma = parse_libsvm_model(svm_file.read_text())
    try:
        params = _NoGlobals(io.BytesIO(norm_file.read_bytes())).load()
        lo = np.asarray(params["min_"], dtype=np.float64).reshape(-1)
        hi = np.asarray(params["max_"], dtype=np.float64).reshape(-1)
    except NocloneError:
        raise
    except Exception as exc:
        raise NocloneError(f"{norm_file}: cannot read the BRISQUE scaling ranges ({exc})") from None
    if lo.shape != (36,) or hi.shape != (36,) or not (hi > lo).all():
        raise NocloneError(f"{norm_file}: expected 36 feature ranges with max > min")
    return BrisqueModel(sv, coef, rho, gamma, lo, hi, source=str(folder))


def load_brisque_model(model_dir: str | Path | None = None) -> BrisqueModel:
    """The LIVE BRISQUE SVR: from ``model_dir`` (holding svm.txt and normalize.pickle) or the installed package."""
    return _load_model(str(model_dir) if model_dir else None)


def brisque_score(image, model: BrisqueModel | None = None) -> float:
    """BRISQUE score of one image (PIL or array); about 0 for pristine photos, rising towards 100 with distortion."""
    model = model or load_brisque_model()
    return float(model.predict(brisque_features(image))[0])


def brisque_scores(images, model: BrisqueModel | None = None) -> np.ndarray:
    """BRISQUE score of each image, float64 [N]."""
    images = list(images)
    if not images:
        raise NocloneError("brisque: no images given")
    model = model or load_brisque_model()
    return model.predict(np.stack([brisque_features(im) for im in images]))
