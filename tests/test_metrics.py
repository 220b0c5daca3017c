import numpy as np
import pytest

from noclone.errors import NocloneError
from noclone.eval import metrics


def test_ism_hand_computed():
    # references normalize to e_x and e_y; their mean (0.5, 0.5) normalizes to (1, 1)/sqrt(2)
    refs = np.array([[2.0, 0.0], [0.0, 3.0]])
    gen = np.array([[1.0, 0.0], [5.0, 5.0], [0.0, -1.0]])
    expected = (1 / np.sqrt(2) + 1.0 - 1 / np.sqrt(2)) / 3
    assert metrics.ism(gen, refs) == pytest.approx(expected)


def test_identity_match_rate_hand_computed():
    refs = np.array([[2.0, 0.0], [0.0, 3.0]])
    gen = np.array([[1.0, 0.0], [5.0, 5.0], [0.0, -1.0], [1.0, 1.0]])
    # cosines: 0.7071, 1, -0.7071, 1
    assert metrics.identity_match_rate(gen, refs, 0.7) == pytest.approx(0.75)
    assert metrics.identity_match_rate(gen, refs, 0.9) == pytest.approx(0.5)
    assert metrics.identity_match_rate(gen, refs, -1.0) == pytest.approx(1.0)


def test_fdfr():
    assert metrics.fdfr(np.array([True, False, True, True])) == pytest.approx(0.25)
    assert metrics.fdfr([False, False]) == pytest.approx(1.0)
    assert metrics.fdfr(np.ones(7, dtype=bool)) == 0.0


def test_roc_auc_hand_computed():
    assert metrics.roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert metrics.roc_auc([0.1], [0.9]) == 0.0
    # pairs (g, i): (0.5,0.5) tie, (0.5,0.1) win, (0.3,0.5) loss, (0.3,0.1) win -> (2 + 0.5) / 4
    assert metrics.roc_auc([0.5, 0.3], [0.5, 0.1]) == pytest.approx(0.625)
    # all tied -> 0.5
    assert metrics.roc_auc([1, 1, 1], [1, 1]) == pytest.approx(0.5)


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    g = np.round(rng.normal(1, 1, 300), 1)
    i = np.round(rng.normal(0, 1, 200), 1)
    pairwise = ((g[:, None] > i[None, :]) + 0.5 * (g[:, None] == i[None, :])).mean()
    assert metrics.roc_auc(g, i) == pytest.approx(pairwise)


def test_threshold_at_far():
    imp = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    t = metrics.threshold_at_far(imp, far=0.1)
    assert 0.9 < t <= 1.0
    assert metrics.false_accept_rate(imp, t) == pytest.approx(0.1)
    t0 = metrics.threshold_at_far(imp, far=0.0)
    assert t0 > 1.0 and metrics.false_accept_rate(imp, t0) == 0.0
    t3 = metrics.threshold_at_far(imp, far=0.3)
    assert 0.7 < t3 <= 0.8
    assert metrics.true_accept_rate([0.75, 0.85, 0.2, 0.7], t3) == pytest.approx(0.5)


def test_frechet_distance_identical_and_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 4))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_diagonal_covariances():
    # build sets whose sample covariance is exactly diagonal: +-sigma along each axis
    def sym(mu, sig):
        d = len(mu)
        rows = []
        for k in range(d):
            e = np.zeros(d)
            e[k] = sig[k] * np.sqrt(d)
            rows += [mu + e, mu - e]
        return np.array(rows)

    mu1, s1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 0.5])
    mu2, s2 = np.array([1.0, 1.0, -1.0]), np.array([3.0, 0.5, 0.5])
    a, b = sym(mu1, s1), sym(mu2, s2)
    c1 = np.diag(np.cov(a, rowvar=False))
    c2 = np.diag(np.cov(b, rowvar=False))
    assert np.allclose(np.cov(a, rowvar=False), np.diag(c1))
    # diagonal closed form: |mu1-mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(c1) - np.sqrt(c2)) ** 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_singular_covariance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 16))  # rank-deficient covariances
    b = rng.normal(size=(6, 16))
    v = metrics.frechet_distance(a, b)
    assert np.isfinite(v) and v >= 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.ism(np.zeros((0, 4)), np.ones((2, 4))),
        lambda: metrics.ism(np.ones((2, 4)), np.zeros((0, 4))),
        lambda: metrics.identity_match_rate([], np.ones((2, 4)), 0.5),
        lambda: metrics.fdfr([]),
        lambda: metrics.frechet_distance(np.zeros((0, 3)), np.ones((4, 3))),
        lambda: metrics.frechet_distance(np.ones((1, 3)), np.ones((4, 3))),
        lambda: metrics.roc_auc([], [0.1]),
        lambda: metrics.roc_auc([0.1], []),
        lambda: metrics.threshold_at_far([]),
    ],
)
def test_empty_inputs_raise(call):
    with pytest.raises(NocloneError) as exc:
        call()
    assert "\n" not in str(exc.value)


def test_dimension_mismatch_raises():
    with pytest.raises(NocloneError):
        metrics.ism(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(NocloneError):
        metrics.frechet_distance(np.ones((3, 3)), np.ones((3, 4)))
