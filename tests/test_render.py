"""Tests of the sandbox renderer: determinism, API contracts, masks, captions, errors, identity separability."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from noclone.errors import NocloneError
from noclone.sandbox import render as R


def _fresh_render(c, i, p, size=64):
    R._scene.cache_clear()
    return np.asarray(R.render(c, i, p, size))


def test_classes_and_identity_counts():
    assert R.CLASSES == ("person", "dog", "cat")
    for c in R.CLASSES:
        n = R.n_identities(c)
        assert isinstance(n, int) and n >= 100_000
        assert n == math.prod(len(opts) for _, opts in R._TRAITS[c])


@pytest.mark.parametrize("c", R.CLASSES)
def test_render_is_deterministic_and_photos_differ(c):
    a = _fresh_render(c, 123, 4)
    b = _fresh_render(c, 123, 4)
    assert np.array_equal(a, b)
    for p in (5, 6, 7):
        assert not np.array_equal(a, _fresh_render(c, 123, p))
    assert not np.array_equal(a, _fresh_render(c, 124, 4))


@pytest.mark.parametrize("c", R.CLASSES)
def test_traits_deterministic_json_and_distinct(c):
    t = R.identity_traits(c, 77)
    assert t == R.identity_traits(c, 77)
    assert json.loads(json.dumps(t)) == t
    rng = np.random.default_rng(1)
    n_traits = len(t)
    diffs = []
    for _ in range(60):
        i, j = (int(x) for x in rng.choice(3_000_000, 2, replace=False))
        ti, tj = R.identity_traits(c, i), R.identity_traits(c, j)
        assert set(ti) == set(tj)
        diffs.append(sum(ti[k] != tj[k] for k in ti))
    assert min(diffs) >= 2
    assert np.mean(diffs) >= 0.6 * n_traits


def test_shapes_and_dtypes():
    for c in R.CLASSES:
        for size in (16, 64, 100):
            im = R.render(c, 3, 1, size)
            assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (size, size)
            bg = R.render_background(c, 3, 1, size)
            assert bg.mode == "RGB" and bg.size == (size, size)
            m = R.subject_mask(c, 3, 1, size)
            assert m.dtype == np.float32 and m.shape == (size, size)
            assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() > 0.99
    arr = R.render_array("dog", [1, 2, 3], [0, 5, 0], size=32)
    assert arr.dtype == np.uint8 and arr.shape == (3, 32, 32, 3)
    assert np.array_equal(arr[1], np.asarray(R.render("dog", 2, 5, 32)))
    assert R.render_array("cat", [], [], 64).shape == (0, 64, 64, 3)
    # returned arrays are private copies
    m = R.subject_mask("cat", 3, 1)
    m[:] = 0
    assert R.subject_mask("cat", 3, 1).max() > 0.99


@pytest.mark.parametrize("c", R.CLASSES)
def test_background_differs_only_under_mask(c):
    under = []
    for i, p in [(0, 0), (11, 3), (2_000_001, 9)] + [(5, k) for k in range(40) if R._Photo(c, 5, k).occlusion][:2]:
        img = np.asarray(R.render(c, i, p), dtype=np.float32)
        bg = np.asarray(R.render_background(c, i, p), dtype=np.float32)
        m = R.subject_mask(c, i, p)
        diff = np.abs(img - bg).max(axis=2)
        # compositing: |img - bg| <= mask * 255 * max lighting gain (+ rounding)
        assert np.all(diff <= m * 255.0 * 1.3 + 1.0)
        assert np.all(diff[m == 0] == 0)
        assert 0.12 < m.mean() < 0.7
        under.append(diff[m > 0.95].mean())
    assert np.mean(under) > 20.0


@pytest.mark.parametrize("c", R.CLASSES)
def test_subject_fills_a_good_part_of_the_frame(c):
    extents = []
    for p in range(24):
        m = R.subject_mask(c, 9, p) > 0.5
        rows = np.flatnonzero(m.any(axis=1))
        extents.append((rows[-1] + 1 - rows[0]) / m.shape[0])
    assert 0.55 <= np.mean(extents) <= 0.85
    assert min(extents) >= 0.4


def test_caption_attributes():
    for c in R.CLASSES:
        for i in range(40):
            caps = R.caption_attributes(c, i)
            assert 2 <= len(caps) <= 4
            assert all(isinstance(s, str) and s.strip() == s and s for s in caps)
            assert not any(s.startswith("a ") and s[2] in "aeiou" for s in caps)
    t = R.identity_traits("person", 0)
    assert any(str(t["hair_color"]) in s or "bald" in s for s in R.caption_attributes("person", 0))


def test_errors():
    with pytest.raises(NocloneError):
        R.render("horse", 0, 0)
    with pytest.raises(NocloneError):
        R.identity_traits("Dog", 0)
    with pytest.raises(NocloneError):
        R.render("dog", -1, 0)
    with pytest.raises(NocloneError):
        R.render("dog", 0, -3)
    with pytest.raises(NocloneError):
        R.render("dog", 0, 0, size=15)
    with pytest.raises(NocloneError):
        R.render_background("dog", 0, 0, size=1025)
    with pytest.raises(NocloneError):
        R.subject_mask("cat", 1.5, 0)
    with pytest.raises(NocloneError):
        R.n_identities("bird")
    with pytest.raises(NocloneError):
        R.caption_attributes("cat", -2)
    with pytest.raises(NocloneError):
        R.render_array("cat", [1, 2], [0])
    with pytest.raises(NocloneError):
        R.random_nonsubject(-1)
    with pytest.raises(NocloneError):
        R.random_nonsubject(0, size=8)


def test_random_nonsubject():
    a = np.asarray(R.random_nonsubject(3))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, np.asarray(R.random_nonsubject(3)))
    assert not np.array_equal(a, np.asarray(R.random_nonsubject(4)))
    assert R.random_nonsubject(5, 40).size == (40, 40)


def _subject_hist(img, m):
    idx = (img // 64).astype(np.int64)
    idx = idx[..., 0] * 16 + idx[..., 1] * 4 + idx[..., 2]
    return np.bincount(idx.ravel(), weights=m.ravel(), minlength=64) / m.sum()


@pytest.mark.parametrize("c", R.CLASSES)
def test_identity_separability(c):
    """Two photos of one identity are closer than photos of two identities (same photo index)."""
    rng = np.random.default_rng(7)
    same, diff, hsame, hdiff = [], [], [], []
    for _ in range(50):
        i, j = (int(x) for x in rng.choice(1_000_000, 2, replace=False))
        p, q = (int(x) for x in rng.choice(1000, 2, replace=False))
        a = np.asarray(R.render(c, i, p), dtype=np.float32)
        b = np.asarray(R.render(c, i, q), dtype=np.float32)
        e = np.asarray(R.render(c, j, p), dtype=np.float32)
        same.append(np.abs(a - b).mean())
        diff.append(np.abs(a - e).mean())
        ha = _subject_hist(a, R.subject_mask(c, i, p))
        hsame.append(np.abs(ha - _subject_hist(b, R.subject_mask(c, i, q))).sum())
        hdiff.append(np.abs(ha - _subject_hist(e, R.subject_mask(c, j, p))).sum())
    assert np.mean(same) < 0.95 * np.mean(diff)
    assert np.mean(hsame) < 0.7 * np.mean(hdiff)
    assert np.mean(np.array(hsame) < np.array(hdiff)) >= 0.75
