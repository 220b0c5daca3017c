"""Procedural renderer of the sandbox world: cartoon persons, dogs and cats at small sizes.

Identity is carried by bold, flat-coloured, large shapes (hair, fur, face shape, glasses, collar...)
so that a tiny generator trained for minutes can learn it at 64x64. A rendered "photo" adds the
nuisances personalization must see through: position, scale, rotation, expression, lighting,
background and occasional occlusion.

Everything is deterministic: identity traits are drawn from a generator seeded by a stable hash of
(class, identity) and photo nuisances from one seeded by (class, identity, photo).
Drawing is done in unit coordinates on a supersampled RGBA canvas (PIL ImageDraw polygons) that is
box-reduced to the output size, then composited in numpy over a background and lit.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
import operator
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from noclone.errors import NocloneError

__all__ = [
    "CLASSES",
    "identity_traits",
    "render",
    "render_background",
    "subject_mask",
    "render_array",
    "caption_attributes",
    "photo_attributes",
    "n_identities",
    "random_nonsubject",
]

CLASSES: tuple[str, ...] = ("person", "dog", "cat")

RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------
# Palettes (name -> sRGB). Names are what traits and captions use.
# --------------------------------------------------------------------------------------------

_VIVID: dict[str, RGB] = {
    "red": (222, 38, 48),
    "orange": (247, 140, 28),
    "yellow": (248, 212, 40),
    "green": (52, 168, 72),
    "teal": (28, 168, 170),
    "blue": (40, 88, 214),
    "purple": (136, 58, 192),
    "pink": (242, 108, 172),
}
_SKIN: dict[str, RGB] = {
    "porcelain": (255, 226, 210),
    "fair": (247, 208, 178),
    "light": (236, 186, 146),
    "beige": (222, 168, 122),
    "tan": (198, 138, 92),
    "olive": (172, 122, 78),
    "brown": (134, 86, 56),
    "dark": (88, 56, 40),
}
_HAIR: dict[str, RGB] = {
    "black": (32, 28, 32),
    "brown": (104, 64, 34),
    "auburn": (148, 50, 28),
    "ginger": (228, 112, 36),
    "blonde": (244, 208, 108),
    "white": (236, 236, 232),
    "blue": (38, 104, 228),
    "pink": (248, 108, 184),
    "green": (50, 184, 84),
    "purple": (132, 56, 196),
}
_EYE: dict[str, RGB] = {
    "brown": (112, 62, 26),
    "blue": (52, 128, 228),
    "green": (58, 166, 76),
    "hazel": (160, 120, 44),
    "grey": (128, 140, 152),
    "violet": (146, 76, 200),
}
_LIPS: dict[str, RGB] = {
    "pink": (228, 116, 130),
    "red": (204, 34, 50),
    "rose": (172, 78, 80),
    "berry": (118, 28, 72),
}
_FRAME: dict[str, RGB] = {
    "black": (26, 26, 30),
    "red": (214, 30, 40),
    "blue": (30, 80, 210),
    "gold": (222, 178, 48),
    "white": (246, 246, 246),
    "green": (36, 156, 66),
}
_SHIRT: dict[str, RGB] = {**_VIVID, "white": (242, 242, 238), "black": (38, 38, 44)}

_DOG_FUR: dict[str, RGB] = {
    "black": (36, 32, 32),
    "white": (244, 242, 236),
    "cream": (240, 222, 180),
    "golden": (222, 164, 66),
    "tan": (196, 140, 84),
    "brown": (128, 80, 44),
    "chocolate": (84, 48, 30),
    "grey": (142, 142, 148),
    "red": (188, 84, 38),
    "slate": (92, 104, 128),
}
_DOG_SEC: dict[str, RGB] = {
    "white": (246, 244, 240),
    "black": (32, 30, 30),
    "brown": (110, 66, 36),
    "tan": (206, 150, 90),
    "grey": (150, 150, 156),
    "cream": (242, 226, 188),
}
_DOG_EYE: dict[str, RGB] = {
    "dark brown": (70, 40, 20),
    "amber": (214, 140, 30),
    "blue": (70, 150, 230),
    "hazel": (150, 116, 48),
}
_NOSE: dict[str, RGB] = {"black": (28, 26, 28), "brown": (112, 62, 40), "pink": (238, 132, 150)}

_CAT_FUR: dict[str, RGB] = {
    "black": (38, 36, 40),
    "white": (246, 246, 244),
    "orange": (238, 142, 46),
    "cream": (242, 216, 170),
    "grey": (132, 134, 142),
    "silver": (196, 202, 214),
    "brown": (122, 84, 52),
    "lilac": (196, 172, 190),
    "golden": (218, 172, 84),
    "smoke": (78, 78, 92),
}
_CAT_SEC: dict[str, RGB] = {
    "black": (34, 32, 36),
    "white": (248, 248, 246),
    "orange": (236, 128, 34),
    "brown": (104, 66, 38),
    "grey": (112, 114, 124),
    "cream": (244, 220, 176),
}
_CAT_EYE: dict[str, RGB] = {
    "green": (86, 196, 76),
    "yellow": (246, 214, 40),
    "blue": (64, 150, 238),
    "amber": (232, 150, 30),
    "copper": (190, 96, 36),
}
_INNER_EAR: dict[str, RGB] = {"pink": (246, 160, 178), "dark": (70, 52, 56), "light": (250, 236, 224)}
_WHISKER: dict[str, RGB] = {"white": (250, 250, 250), "black": (24, 24, 26), "grey": (140, 140, 146)}

_DARK = (34, 26, 26)
_WHITE = (252, 252, 252)
_MOUTH = (92, 22, 34)
_TONGUE = (238, 104, 122)
_GOLD = (236, 190, 46)

# Trait spaces: ordered (name, options). Sampling order is fixed: never reorder (it changes identities).
_TRAITS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "person": (
        ("face_shape", ("round", "oval", "square", "long")),
        ("skin", tuple(_SKIN)),
        ("hair_style", ("short", "long", "bald", "mohawk", "bun", "afro", "side-part", "ponytail")),
        ("hair_color", tuple(_HAIR)),
        ("eye_color", tuple(_EYE)),
        ("eye_shape", ("round", "narrow", "big")),
        ("brows", ("thick", "thin", "faint")),
        ("nose", ("button", "pointed", "wide")),
        ("lips", tuple(_LIPS)),
        ("facial_hair", ("none", "moustache", "beard", "goatee")),
        ("glasses", ("none", "round", "square", "sunglasses")),
        ("glasses_color", tuple(_FRAME)),
        ("accessory", ("none", "earrings", "hat", "headband")),
        ("accessory_color", tuple(_VIVID)),
        ("shirt_color", tuple(_SHIRT)),
    ),
    "dog": (
        ("head_shape", ("round", "wide", "long", "square")),
        ("fur", tuple(_DOG_FUR)),
        ("pattern", ("none", "eye patch", "spots", "blaze", "mask")),
        ("pattern_color", tuple(_DOG_SEC)),
        ("pattern_layout", ("a", "b", "c", "d")),
        ("ears", ("floppy", "pointy", "folded")),
        ("ear_color", ("fur", "pattern", "dark")),
        ("snout", ("fur", "light", "white", "pattern")),
        ("nose_color", tuple(_NOSE)),
        ("eye_color", tuple(_DOG_EYE)),
        ("collar_color", tuple(_VIVID)),
        ("tongue", ("in", "out")),
    ),
    "cat": (
        ("head_shape", ("round", "wide", "pointed")),
        ("fur", tuple(_CAT_FUR)),
        ("pattern", ("none", "tabby", "patches", "tuxedo", "points")),
        ("pattern_color", tuple(_CAT_SEC)),
        ("pattern_layout", ("a", "b", "c", "d")),
        ("ears", ("pointy", "rounded", "folded")),
        ("inner_ear", tuple(_INNER_EAR)),
        ("eye_color", (*_CAT_EYE, "odd")),
        ("nose_color", tuple(_NOSE)),
        ("whiskers", tuple(_WHISKER)),
        ("collar_color", ("none", *_VIVID)),
        ("bell", ("no", "yes")),
    ),
}


# --------------------------------------------------------------------------------------------
# Validation and seeding
# --------------------------------------------------------------------------------------------


def _check_class(class_noun: object) -> str:
    if not isinstance(class_noun, str) or class_noun not in CLASSES:
        raise NocloneError(f"unknown sandbox class {class_noun!r}; expected one of {', '.join(CLASSES)}")
    return class_noun


def _check_index(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise NocloneError(f"{what} must be a non-negative integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise NocloneError(f"{what} must be a non-negative integer, got {value!r}") from None
    if v < 0:
        raise NocloneError(f"{what} must be a non-negative integer, got {v}")
    return v


def _check_size(size: object) -> int:
    if isinstance(size, bool):
        raise NocloneError(f"size must be an integer in [16, 1024], got {size!r}")
    try:
        s = operator.index(size)  # type: ignore[arg-type]
    except TypeError:
        raise NocloneError(f"size must be an integer in [16, 1024], got {size!r}") from None
    if s < 16 or s > 1024:
        raise NocloneError(f"size must be an integer in [16, 1024], got {s}")
    return s


def _rng(*parts: object) -> np.random.Generator:
    key = "/".join(str(p) for p in ("noclone.sandbox.render", *parts)).encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


# --------------------------------------------------------------------------------------------
# Public: traits, captions, counts
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _traits(class_noun: str, identity: int) -> tuple[tuple[str, str], ...]:
    rng = _rng("identity", class_noun, identity)
    return tuple((name, opts[int(rng.integers(len(opts)))]) for name, opts in _TRAITS[class_noun])


def identity_traits(class_noun: str, identity: int) -> dict[str, object]:
    """The identity's visual traits (trait name -> option name), deterministic in (class, identity)."""
    c = _check_class(class_noun)
    i = _check_index(identity, "identity")
    return dict(_traits(c, i))


def n_identities(class_noun: str) -> int:
    """Number of distinct trait combinations of the class (product of trait cardinalities)."""
    c = _check_class(class_noun)
    return math.prod(len(opts) for _, opts in _TRAITS[c])


def _a(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


_HAIR_PHRASE = {
    "short": "short {c} hair",
    "long": "long {c} hair",
    "mohawk": "{a} mohawk",
    "bun": "{c} hair in a bun",
    "afro": "{a} afro",
    "side-part": "{c} side-parted hair",
    "ponytail": "{a} ponytail",
}


def caption_attributes(class_noun: str, identity: int) -> list[str]:
    """2-4 short natural phrases naming the identity's most salient traits, most salient first."""
    c = _check_class(class_noun)
    t = dict(_traits(c, _check_index(identity, "identity")))
    out: list[str] = []
    if c == "person":
        style, acc = t["hair_style"], t["accessory"]
        hat = _a(f"{t['accessory_color']} hat") if acc == "hat" else None
        fh = t["facial_hair"]
        fh_phrase = _a(f"{t['hair_color']} {fh}" if style == "bald" or hat else fh) if fh != "none" else None
        if hat and style in ("short", "side-part", "bald"):  # the hat hides the hair
            out.append(hat)
            hat = None
        elif style == "bald":
            out.append("a bald head")
        else:
            out.append(_HAIR_PHRASE[style].format(c=t["hair_color"], a=_a(t["hair_color"])))
        if t["glasses"] == "sunglasses":
            out.append("sunglasses")
        elif t["glasses"] != "none":
            out.append(f"{t['glasses']} {t['glasses_color']} glasses")
        if hat:
            out.append(hat)
        elif acc == "headband":
            out.append(_a(f"{t['accessory_color']} headband"))
        if fh == "beard":
            out.append(fh_phrase)
        out.append(_a(f"{t['shirt_color']} shirt"))
        if fh in ("moustache", "goatee"):
            out.append(fh_phrase)
        if acc == "earrings":
            out.append(f"{t['accessory_color']} earrings")
    elif c == "dog":
        out.append(f"{t['fur']} fur")
        pat, pc = t["pattern"], t["pattern_color"]
        if pat != "none" and pc != t["fur"]:
            out.append(f"{pc} spots" if pat == "spots" else _a(f"{pc} {pat}"))
        out.append(f"{t['ears']} ears")
        out.append(_a(f"{t['collar_color']} collar"))
        if t["tongue"] == "out":
            out.append("its tongue out")
    else:
        out.append(f"{t['fur']} fur")
        pat, pc = t["pattern"], t["pattern_color"]
        if pat != "none" and pc != t["fur"]:
            out.append(
                {
                    "tabby": f"{pc} tabby stripes",
                    "patches": f"{pc} patches",
                    "tuxedo": _a(f"{pc} tuxedo"),
                    "points": _a(f"{pc} face and ears"),
                }[pat]
            )
        out.append("odd-colored eyes" if t["eye_color"] == "odd" else f"{t['eye_color']} eyes")
        if t["collar_color"] != "none":
            out.append(_a(f"{t['collar_color']} collar") + (" with a bell" if t["bell"] == "yes" else ""))
        elif t["ears"] == "folded":
            out.append("folded ears")
    return out[:4]


_BACKGROUND_WORDS = ("a plain background", "a gradient background", "a striped background", "a mottled background")


def photo_attributes(class_noun: str, identity: int, photo: int) -> list[str]:
    """Short phrases naming what varies from photo to photo (expression, gaze, tilt, light, background, occlusion),
    read from the same seeded draws `render` uses, so a caption can say what a photo shows beyond the identity."""
    c = _check_class(class_noun)
    ph = _Photo(c, _check_index(identity, "identity"), _check_index(photo, "photo"))
    out = [{"closed": "with a closed mouth", "smile": "smiling", "open": "with an open mouth"}[ph.mouth]]
    if ph.blink:
        out.append("with closed eyes")
    elif abs(ph.gaze[0]) > 0.5:
        out.append("looking left" if ph.gaze[0] < 0 else "looking right")
    if abs(ph.angle) > 6:
        out.append("tilted to the left" if ph.angle > 0 else "tilted to the right")
    if ph.bright < 0.88:
        out.append("in dim light")
    elif ph.bright > 1.08:
        out.append("in bright light")
    out.append("on " + _BACKGROUND_WORDS[int(np.random.default_rng(ph.bg).integers(4))])
    if ph.occlusion:
        out.append("partly hidden")
    return out


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------

_CIRCLE_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    got = _CIRCLE_CACHE.get(n)
    if got is None:
        t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
        got = (np.cos(t), np.sin(t))
        _CIRCLE_CACHE[n] = got
    return got


def _shade(c: Sequence[float], f: float) -> RGB:
    """Darken (f<1) or lighten toward white (f>1)."""
    if f <= 1.0:
        return (int(c[0] * f), int(c[1] * f), int(c[2] * f))
    g = min(f - 1.0, 1.0)
    return (int(c[0] + (255 - c[0]) * g), int(c[1] + (255 - c[1]) * g), int(c[2] + (255 - c[2]) * g))


def _close(a: Sequence[int], b: Sequence[int], tol: float = 60.0) -> bool:
    return sum((x - y) ** 2 for x, y in zip(a, b)) < tol * tol


def _clip_halfplane(pts: np.ndarray, nx: float, ny: float, d: float) -> np.ndarray:
    """Keep the part of polygon pts (N,2) where nx*x + ny*y <= d (one Sutherland-Hodgman pass)."""
    v = pts[:, 0] * nx + pts[:, 1] * ny - d
    out = []
    n = len(pts)
    for i in range(n):
        j = (i + 1) % n
        a, b, va, vb = pts[i], pts[j], v[i], v[j]
        if va <= 0:
            out.append(a)
        if (va <= 0) != (vb <= 0):
            t = va / (va - vb)
            out.append(a + (b - a) * t)
    return np.array(out) if out else np.zeros((0, 2))


class _Painter:
    """Draws unit-coordinate shapes through a similarity transform onto a supersampled RGBA canvas."""

    def __init__(self, canvas: int, tx: float = 0.0, ty: float = 0.0, scale: float = 1.0, angle: float = 0.0,
                 pivot: tuple[float, float] = (0.5, 0.5)) -> None:
        self.canvas = canvas
        # 4 independent bands (r, g, b, coverage) on black: box-reducing it gives premultiplied colour
        # directly (an "RGBA" image would be premultiplied and un-premultiplied by every reduce).
        self.img = Image.new("CMYK", (canvas, canvas), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.img)
        th = math.radians(angle)
        k = canvas * scale
        self.A = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]) * k
        p = np.asarray(pivot)
        self.b = canvas * (p + np.array([tx, ty])) - self.A @ p
        self.k = k
        self.silhouette: Image.Image | None = None

    def freeze_silhouette(self) -> None:
        """Shapes drawn after this call (whiskers...) get no cartoon outline."""
        self.silhouette = self.img.getchannel(3)

    def _xy(self, pts: np.ndarray) -> list[float]:
        return (pts @ self.A.T + self.b).ravel().tolist()

    def _n(self, r: float) -> int:
        rp = r * self.k
        return 16 if rp < 6 else 24 if rp < 14 else 36 if rp < 30 else 48 if rp < 60 else 72

    @staticmethod
    def ellipse_pts(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 48) -> np.ndarray:
        c, s = _unit_circle(n)
        x, y = rx * c, ry * s
        if angle:
            th = math.radians(angle)
            ca, sa = math.cos(th), math.sin(th)
            x, y = x * ca - y * sa, x * sa + y * ca
        return np.stack([cx + x, cy + y], axis=1)

    def poly(self, pts: np.ndarray | Sequence[Sequence[float]], color: RGB) -> None:
        pts = np.asarray(pts, dtype=float)
        if len(pts) >= 3:
            self.draw.polygon(self._xy(pts), fill=(*color, 255))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, color: RGB, angle: float = 0.0) -> None:
        self.poly(self.ellipse_pts(cx, cy, rx, ry, angle, self._n(max(rx, ry))), color)

    def chord(self, cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, color: RGB,
              angle: float = 0.0) -> None:
        """Region between the ellipse arc from t0 to t1 (radians, y down) and its chord."""
        n = max(8, int(self._n(max(rx, ry)) * abs(t1 - t0) / (2 * np.pi)) + 2)
        t = np.linspace(t0, t1, n)
        x, y = rx * np.cos(t), ry * np.sin(t)
        if angle:
            th = math.radians(angle)
            x, y = x * math.cos(th) - y * math.sin(th), x * math.sin(th) + y * math.cos(th)
        self.poly(np.stack([cx + x, cy + y], axis=1), color)

    def cap(self, cx: float, cy: float, rx: float, ry: float, y_cut: float, color: RGB, above: bool = True) -> None:
        """Part of the ellipse above (or below) the horizontal line y = y_cut."""
        s0 = float(np.clip((y_cut - cy) / ry, -1.0, 1.0))
        a = math.asin(s0)
        if above:
            self.chord(cx, cy, rx, ry, np.pi - a, 2 * np.pi + a, color)
        else:
            self.chord(cx, cy, rx, ry, a, np.pi - a, color)

    def rrect_pts(self, x0: float, y0: float, x1: float, y1: float, r: float) -> np.ndarray:
        r = max(0.0, min(r, (x1 - x0) / 2, (y1 - y0) / 2))
        if r == 0:
            return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)
        m = 6
        pts = []
        for (cx, cy, a0) in ((x1 - r, y0 + r, -np.pi / 2), (x1 - r, y1 - r, 0.0), (x0 + r, y1 - r, np.pi / 2),
                             (x0 + r, y0 + r, np.pi)):
            t = np.linspace(a0, a0 + np.pi / 2, m)
            pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
        return np.concatenate(pts)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: RGB, r: float = 0.0) -> None:
        self.poly(self.rrect_pts(x0, y0, x1, y1, r), color)

    def line(self, pts: Sequence[Sequence[float]] | np.ndarray, color: RGB, width: float, caps: bool = True) -> None:
        pts = np.asarray(pts, dtype=float)
        w = max(1, int(round(width * self.k)))
        self.draw.line(self._xy(pts), fill=(*color, 255), width=w, joint="curve")
        if caps and w >= 3:
            rr = width / 2
            for x, y in (pts[0], pts[-1]):
                self.ellipse(x, y, rr, rr, color)

    def arc(self, cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, color: RGB, width: float) -> None:
        n = max(6, int(self._n(max(rx, ry)) * abs(t1 - t0) / (2 * np.pi)) + 2)
        t = np.linspace(t0, t1, n)
        self.line(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1), color, width)

    def ring(self, pts: np.ndarray, color: RGB, width: float) -> None:
        self.line(np.concatenate([pts, pts[:1]]), color, width, caps=False)


# --------------------------------------------------------------------------------------------
# Per-photo nuisances
# --------------------------------------------------------------------------------------------


_BASE_SCALE = 0.9  # canonical drawings fill ~80% of the height; photos show them at 0.9 x (0.85..1.1)


class _Photo:
    __slots__ = ("tx", "ty", "scale", "angle", "mouth", "blink", "gaze", "pupil", "bright", "tint", "grad",
                 "bg", "occlusion", "occ_rng")

    def __init__(self, class_noun: str, identity: int, photo: int) -> None:
        r = _rng("photo", class_noun, identity, photo)
        self.tx = float(r.uniform(-0.1, 0.1))
        self.ty = float(r.uniform(-0.06, 0.1))
        self.scale = float(r.uniform(0.85, 1.1)) * _BASE_SCALE
        self.angle = float(r.uniform(-10.0, 10.0))
        self.mouth = str(r.choice(["closed", "smile", "open"], p=[0.35, 0.4, 0.25]))
        self.blink = bool(r.random() < 0.12)
        self.gaze = (float(r.uniform(-1, 1)), float(r.uniform(-0.6, 0.6)))
        self.pupil = float(r.uniform(0.0, 1.0))
        self.bright = float(r.uniform(0.8, 1.15))
        self.tint = r.uniform(-0.07, 0.07, size=3)
        self.grad = (float(r.uniform(0, 2 * np.pi)), float(r.uniform(0.0, 0.16)))
        self.bg = int(r.integers(1 << 62))
        self.occlusion = bool(r.random() < 0.1)
        self.occ_rng = int(r.integers(1 << 62))


# --------------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------------


def _draw_person(p: _Painter, t: dict[str, str], ph: _Photo) -> None:
    skin = _SKIN[t["skin"]]
    skin_d = _shade(skin, 0.84)
    hair = _HAIR[t["hair_color"]]
    hair_d = _shade(hair, 0.8)
    style = t["hair_style"]
    cx, cy = 0.5, 0.47
    rx, ry = {"round": (0.2, 0.2), "oval": (0.172, 0.212), "square": (0.188, 0.195), "long": (0.155, 0.225)}[
        t["face_shape"]]
    top = cy - ry
    acc, acc_c = t["accessory"], _VIVID[t["accessory_color"]]

    # behind the head
    if style == "long":
        p.ellipse(cx, cy - 0.03, rx + 0.06, ry + 0.03, hair)
        p.rect(cx - rx - 0.06, cy - 0.03, cx + rx + 0.06, cy + 0.27, hair, r=0.05)
    elif style == "afro":
        p.ellipse(cx, cy - 0.07, rx + 0.12, ry + 0.07, hair)
    elif style == "ponytail":
        p.ellipse(cx + rx + 0.035, cy + 0.03, 0.055, 0.14, hair_d, angle=-18)
    elif style == "bun":
        p.ellipse(cx, top - 0.035, 0.08, 0.07, hair)

    # shoulders and neck
    shirt = _SHIRT[t["shirt_color"]]
    p.ellipse(cx, 0.93, 0.38, 0.16, shirt)
    p.rect(cx - 0.38, 0.93, cx + 0.38, 1.7, shirt)
    p.rect(cx - 0.06, cy + ry - 0.08, cx + 0.06, 0.8, skin_d)
    p.poly([(cx - 0.08, 0.785), (cx + 0.08, 0.785), (cx, 0.87)], skin_d)
    if style == "long":
        p.rect(cx - rx - 0.06, cy + 0.05, cx - rx + 0.02, cy + 0.34, hair, r=0.04)
        p.rect(cx + rx - 0.02, cy + 0.05, cx + rx + 0.06, cy + 0.34, hair, r=0.04)

    # ears and face
    for sx in (-1, 1):
        p.ellipse(cx + sx * rx, cy + 0.02, 0.036, 0.052, skin_d)
    if t["face_shape"] == "square":
        p.rect(cx - rx, cy - ry, cx + rx, cy + ry, skin, r=0.075)
    else:
        p.ellipse(cx, cy, rx, ry, skin)
    if acc == "earrings":
        for sx in (-1, 1):
            p.ellipse(cx + sx * (rx + 0.006), cy + 0.085, 0.022, 0.022, acc_c)

    # facial hair (under the mouth)
    fh = t["facial_hair"]
    if fh == "beard":
        p.cap(cx, cy + 0.005, rx * 1.03, ry * 1.06, cy + 0.03, hair, above=False)
    elif fh == "goatee":
        p.ellipse(cx, cy + ry - 0.045, 0.055, 0.05, hair)

    # front hair
    if style in ("short", "bun", "ponytail", "afro"):
        p.cap(cx, cy - 0.005, rx * 1.07, ry * 1.06, cy - 0.085, hair)
        if style == "short":
            for sx in (-1, 1):
                p.rect(cx + sx * rx - 0.02, cy - 0.1, cx + sx * rx + 0.02, cy + 0.0, hair, r=0.015)
    elif style == "long":
        p.cap(cx, cy - 0.005, rx * 1.1, ry * 1.07, cy - 0.09, hair)
        p.poly([(cx - 0.012, top - 0.004), (cx + 0.012, top - 0.004), (cx, cy - 0.09)], hair_d)
    elif style == "side-part":
        p.cap(cx, cy - 0.005, rx * 1.07, ry * 1.06, cy - 0.1, hair)
        p.chord(cx + 0.05, cy - 0.115, rx * 0.9, 0.075, 0.0, np.pi, hair, angle=14)
        p.line([(cx - rx * 0.35, top + 0.005), (cx - rx * 0.45, cy - 0.1)], hair_d, 0.012)
    elif style == "mohawk":
        w = 0.05
        spikes = [(cx - w, top + 0.05)]
        for i, yy in enumerate(np.linspace(-1, 1, 5)):
            spikes.append((cx + yy * w * 0.9, top - 0.13 + 0.02 * abs(yy)))
            if i < 4:
                spikes.append((cx + (yy + 0.25) * w * 0.9, top - 0.07))
        spikes.append((cx + w, top + 0.05))
        p.poly(spikes, hair)
        p.rect(cx - w, top - 0.07, cx + w, top + 0.06, hair, r=0.02)
    elif style == "bald":
        p.ellipse(cx - rx * 0.35, top + 0.05, 0.035, 0.018, _shade(skin, 1.25), angle=-20)

    # hat / headband over the hair
    if acc == "hat":
        y_cut = cy - 0.075
        p.cap(cx, cy - 0.02, rx * 1.12, ry * 1.08, y_cut, acc_c)
        p.rect(cx - rx * 1.12, y_cut - 0.035, cx + rx * 1.12, y_cut + 0.01, _shade(acc_c, 0.75), r=0.015)
        p.ellipse(cx, cy - 0.02 - ry * 1.08, 0.035, 0.035, _shade(acc_c, 1.4))
    elif acc == "headband":
        yb = cy - 0.115
        half = rx * math.sqrt(max(0.0, 1 - ((yb - cy) / ry) ** 2)) + 0.012
        p.rect(cx - half, yb - 0.024, cx + half, yb + 0.024, acc_c, r=0.02)

    # brows
    ey = cy + 0.015
    ex = 0.078 if rx > 0.165 else 0.068
    brow_c = _shade(hair, 0.75) if t["hair_color"] != "white" else (190, 190, 190)
    bw = {"thick": 0.024, "thin": 0.011, "faint": 0.0}[t["brows"]]
    if bw > 0:
        for sx in (-1, 1):
            lift = -0.01 if ph.mouth == "open" else 0.0
            p.line([(cx + sx * (ex - 0.035), ey - 0.06 + lift), (cx + sx * (ex + 0.03), ey - 0.066 + lift)],
                   brow_c, bw)

    # eyes
    ec = _EYE[t["eye_color"]]
    shape = t["eye_shape"]
    wx, wy, ir = {"round": (0.036, 0.036, 0.023), "narrow": (0.043, 0.02, 0.018), "big": (0.046, 0.05, 0.03)}[shape]
    gx, gy = ph.gaze
    for sx in (-1, 1):
        x = cx + sx * ex
        if ph.blink:
            p.arc(x, ey - 0.005, wx, wy * 0.6, 0.15, np.pi - 0.15, _DARK, 0.012)
            continue
        p.ellipse(x, ey, wx + 0.006, wy + 0.006, _shade(skin, 0.7))
        p.ellipse(x, ey, wx, wy, _WHITE)
        ix, iy = x + gx * (wx - ir) * 0.7, ey + gy * max(0.0, wy - ir) * 0.7
        p.ellipse(ix, iy, ir, min(ir, wy * 0.95), ec)
        p.ellipse(ix, iy, ir * 0.5, min(ir * 0.5, wy * 0.6), _DARK)
        p.ellipse(ix - ir * 0.35, iy - ir * 0.35, ir * 0.28, ir * 0.28, _WHITE)
        p.arc(x, ey, wx + 0.002, wy + 0.002, np.pi * 1.08, np.pi * 1.92, _DARK, 0.009)

    # nose
    ny = cy + 0.07
    nose = t["nose"]
    if nose == "button":
        p.ellipse(cx, ny, 0.022, 0.017, skin_d)
    elif nose == "pointed":
        p.line([(cx + 0.004, cy + 0.01), (cx - 0.022, ny + 0.012), (cx + 0.01, ny + 0.016)], _shade(skin, 0.7), 0.011)
    else:
        p.ellipse(cx, ny, 0.038, 0.02, skin_d)
        for sx in (-1, 1):
            p.ellipse(cx + sx * 0.016, ny + 0.004, 0.007, 0.006, _shade(skin, 0.55))

    # mouth
    lip = _LIPS[t["lips"]]
    my = cy + 0.125 if t["face_shape"] != "long" else cy + 0.135
    if fh in ("moustache", "goatee"):
        for sx in (-1, 1):
            p.ellipse(cx + sx * 0.03, my - 0.03, 0.036, 0.016, hair, angle=sx * 12)
    if fh == "beard":
        p.ellipse(cx, my + 0.005, 0.06, 0.035, skin)
        for sx in (-1, 1):
            p.ellipse(cx + sx * 0.03, my - 0.028, 0.038, 0.016, hair, angle=sx * 12)
    if ph.mouth == "closed":
        p.line([(cx - 0.04, my), (cx + 0.04, my)], lip, 0.016)
    elif ph.mouth == "smile":
        p.arc(cx, my - 0.022, 0.05, 0.035, 0.35, np.pi - 0.35, lip, 0.017)
    else:
        p.chord(cx, my - 0.01, 0.054, 0.046, 0.0, np.pi, lip)
        p.chord(cx, my - 0.006, 0.042, 0.036, 0.0, np.pi, _MOUTH)
        p.rect(cx - 0.034, my - 0.006, cx + 0.034, my + 0.004, _WHITE)

    # glasses (over the eyes)
    g = t["glasses"]
    if g != "none":
        fc = _FRAME[t["glasses_color"]]
        lw = 0.013
        gr = 0.052 if shape != "big" else 0.06
        for sx in (-1, 1):
            x = cx + sx * ex
            if g == "round":
                p.ring(p.ellipse_pts(x, ey, gr, gr, n=36), fc, lw)
            elif g == "square":
                p.ring(p.rrect_pts(x - gr, ey - gr * 0.8, x + gr, ey + gr * 0.8, 0.012), fc, lw)
            else:
                p.rect(x - gr - 0.006, ey - gr * 0.75 - 0.006, x + gr + 0.006, ey + gr * 0.75 + 0.006, fc, r=0.02)
                p.rect(x - gr + 0.004, ey - gr * 0.75 + 0.004, x + gr - 0.004, ey + gr * 0.75 - 0.004, (24, 24, 34),
                       r=0.018)
                p.ellipse(x - gr * 0.4, ey - gr * 0.3, 0.012, 0.008, (110, 110, 130))
            p.line([(x - sx * gr, ey - 0.005), (cx + sx * (rx + 0.005), ey - 0.015)], fc, lw * 0.8)
        p.line([(cx - ex + gr, ey - 0.01), (cx + ex - gr, ey - 0.01)], fc, lw)


def _draw_dog(p: _Painter, t: dict[str, str], ph: _Photo) -> None:
    fur = _DOG_FUR[t["fur"]]
    sec = _DOG_SEC[t["pattern_color"]]
    if _close(sec, fur):
        sec = _shade(fur, 0.55) if sum(fur) > 300 else _shade(fur, 1.6)
    pat = t["pattern"]
    cx, cy = 0.5, 0.47
    rx, ry = {"round": (0.2, 0.19), "wide": (0.235, 0.172), "long": (0.168, 0.21), "square": (0.198, 0.18)}[
        t["head_shape"]]
    dark = _shade(fur, 0.62) if sum(fur) > 150 else _shade(fur, 1.8)
    ear_c = {"fur": _shade(fur, 0.9), "pattern": sec, "dark": dark}[t["ear_color"]]
    lay = _rng("layout", "dog", t["pattern_layout"])

    # body + chest
    p.rect(cx - 0.1, cy + 0.05, cx + 0.1, 0.86, _shade(fur, 0.9))
    p.ellipse(cx, 1.02, 0.36, 0.27, fur)
    p.rect(cx - 0.36, 1.02, cx + 0.36, 1.7, fur)
    if pat in ("blaze", "mask"):
        p.ellipse(cx, 0.93, 0.1, 0.14, sec)
    elif pat == "spots":
        for _ in range(2):
            p.ellipse(cx + lay.uniform(-0.18, 0.18), lay.uniform(0.86, 0.98), 0.045, 0.04, sec)

    # ears behind head
    ears = t["ears"]
    if ears == "pointy":
        for sx in (-1, 1):
            p.poly([(cx + sx * (rx - 0.01), cy - 0.02), (cx + sx * (rx + 0.015), cy - ry - 0.13),
                    (cx + sx * (rx - 0.14), cy - ry + 0.03)], ear_c)
            p.poly([(cx + sx * (rx - 0.03), cy - 0.05), (cx + sx * (rx + 0.0), cy - ry - 0.08),
                    (cx + sx * (rx - 0.1), cy - ry + 0.04)], _shade(ear_c, 0.7))

    # head
    if t["head_shape"] == "square":
        p.rect(cx - rx, cy - ry, cx + rx, cy + ry, fur, r=0.08)
    else:
        p.ellipse(cx, cy, rx, ry, fur)
    ey = cy - 0.035
    ex = 0.085 if rx > 0.18 else 0.075
    side = 1 if t["pattern_layout"] in ("a", "c") else -1
    if pat == "mask":
        p.ellipse(cx, ey, rx * 0.92, 0.07, sec)
    elif pat == "eye patch":
        p.ellipse(cx + side * ex, ey, 0.068, 0.062, sec, angle=side * 20)
    elif pat == "blaze":
        p.rect(cx - 0.028, cy - ry + 0.01, cx + 0.028, cy + 0.06, sec, r=0.025)
    elif pat == "spots":
        for _ in range(3):
            a = lay.uniform(0, 2 * np.pi)
            rr = lay.uniform(0.45, 0.8)
            p.ellipse(cx + np.cos(a) * rx * rr, cy + np.sin(a) * ry * rr * 0.9 - 0.02, 0.042, 0.038, sec,
                      angle=float(lay.uniform(0, 180)))

    # muzzle
    snout = {"fur": _shade(fur, 1.25), "light": _shade(fur, 1.5), "white": (246, 244, 238), "pattern": sec}[
        t["snout"]]
    my = cy + 0.115 + (0.02 if t["head_shape"] == "long" else 0.0)
    mrx = 0.125 if t["head_shape"] != "long" else 0.11
    p.ellipse(cx, my, mrx, 0.095, snout)

    # floppy ears over the head side
    if ears == "floppy":
        for sx in (-1, 1):
            p.ellipse(cx + sx * (rx - 0.005), cy + 0.0, 0.068, 0.15, ear_c, angle=-sx * 16)
    elif ears == "folded":  # half-drop flaps: up from the crown, tips folded down and out
        for sx in (-1, 1):
            p.poly([(cx + sx * (rx - 0.16), cy - ry + 0.03), (cx + sx * (rx - 0.02), cy - ry - 0.045),
                    (cx + sx * (rx + 0.07), cy - ry + 0.1), (cx + sx * (rx - 0.03), cy - ry + 0.07)], ear_c)

    # eyes
    ec = _DOG_EYE[t["eye_color"]]
    gx, gy = ph.gaze
    for sx in (-1, 1):
        x = cx + sx * ex
        if ph.blink:
            p.arc(x, ey - 0.01, 0.032, 0.022, 0.2, np.pi - 0.2, _DARK, 0.013)
            continue
        p.ellipse(x, ey, 0.037, 0.037, _DARK)
        ix, iy = x + gx * 0.005, ey + gy * 0.004
        p.ellipse(ix, iy, 0.028, 0.028, ec)
        p.ellipse(ix, iy, 0.014, 0.014, (16, 12, 12))
        p.ellipse(ix - 0.01, iy - 0.01, 0.008, 0.008, _WHITE)

    # nose and mouth
    nc = _NOSE[t["nose_color"]]
    ny = my - 0.05
    p.ellipse(cx, ny, 0.052, 0.035, nc)
    p.ellipse(cx - 0.013, ny - 0.012, 0.012, 0.007, _shade(nc, 1.5))
    line_c = _DARK if sum(snout) > 200 else _shade(snout, 1.7)
    if ph.mouth == "open" or t["tongue"] == "out":
        p.chord(cx, my + 0.025, 0.055, 0.05, 0.0, np.pi, _MOUTH)
    if t["tongue"] == "out":
        ty = my + 0.085 + (0.01 if ph.mouth == "open" else 0.0)
        p.ellipse(cx, ty, 0.034, 0.046, _TONGUE)
        p.line([(cx, ty - 0.03), (cx, ty + 0.015)], _shade(_TONGUE, 0.75), 0.007)
    p.line([(cx, ny + 0.02), (cx, my + 0.025)], line_c, 0.01)
    lift = 0.35 if ph.mouth == "smile" else 0.0
    for sx in (-1, 1):  # the two halves of the "w" under the nose, corners lifted when smiling
        a0, a1 = (0.0, np.pi / 2 + lift) if sx < 0 else (np.pi / 2 - lift, np.pi)
        p.arc(cx + sx * 0.035, my + 0.005, 0.035, 0.022, a0, a1, line_c, 0.01)

    # collar
    cc = _VIVID[t["collar_color"]]
    p.rect(cx - 0.17, 0.735, cx + 0.17, 0.785, cc, r=0.02)
    p.ellipse(cx, 0.805, 0.026, 0.026, _GOLD)


def _draw_cat(p: _Painter, t: dict[str, str], ph: _Photo) -> None:
    fur = _CAT_FUR[t["fur"]]
    sec = _CAT_SEC[t["pattern_color"]]
    if _close(sec, fur):
        sec = _shade(fur, 0.55) if sum(fur) > 300 else _shade(fur, 1.6)
    pat = t["pattern"]
    cx, cy = 0.5, 0.49
    shape = t["head_shape"]
    rx, ry = {"round": (0.195, 0.175), "wide": (0.228, 0.165), "pointed": (0.19, 0.18)}[shape]
    lay = _rng("layout", "cat", t["pattern_layout"])
    inner = _INNER_EAR[t["inner_ear"]]
    ear_c = sec if pat == "points" else fur

    # body
    p.rect(cx - 0.085, cy + 0.05, cx + 0.085, 0.86, _shade(fur, 0.9))
    p.ellipse(cx, 1.02, 0.33, 0.27, fur)
    p.rect(cx - 0.33, 1.02, cx + 0.33, 1.7, fur)
    if pat == "tuxedo":
        p.ellipse(cx, 0.93, 0.09, 0.15, sec)
    elif pat == "patches":
        p.ellipse(cx + (0.12 if t["pattern_layout"] in "ab" else -0.12), 0.93, 0.09, 0.08, sec)

    # ears
    ears = t["ears"]
    if ears in ("pointy", "rounded"):
        h = 0.15 if ears == "pointy" else 0.11
        for sx in (-1, 1):
            bx0, bx1 = cx + sx * (rx + 0.005), cx + sx * (rx - 0.15)
            tip = (cx + sx * (rx - 0.03), cy - ry - h)
            outer = np.array([(bx0, cy - 0.02), tip, (bx1, cy - ry + 0.02)])
            if ears == "rounded":
                p.ellipse(tip[0] - sx * 0.012, tip[1] + 0.035, 0.042, 0.04, ear_c)
            p.poly(outer, ear_c)
            cxm = outer.mean(axis=0)
            p.poly(cxm + (outer - cxm) * 0.58 + np.array([0, 0.012]), inner)

    # head
    if shape == "pointed":
        pts = p.ellipse_pts(cx, cy, rx, ry, n=48)
        below = pts[:, 1] > cy
        pts[below, 0] = cx + (pts[below, 0] - cx) * (1 - 0.35 * ((pts[below, 1] - cy) / ry) ** 1.5)
        pts[below, 1] += 0.025 * ((pts[below, 1] - cy) / ry) ** 2
        head = pts
    else:
        head = p.ellipse_pts(cx, cy, rx, ry, n=48)
        if shape == "wide":
            for sx in (-1, 1):
                p.poly([(cx + sx * (rx - 0.03), cy - 0.02), (cx + sx * (rx + 0.035), cy + 0.06),
                        (cx + sx * (rx - 0.01), cy + 0.1)], fur)
    p.poly(head, fur)

    # pattern on the head
    if pat == "tabby":
        for dx in (-0.045, 0.0, 0.045):
            p.ellipse(cx + dx, cy - ry + 0.045, 0.011, 0.05, sec, angle=dx * 300)
        for sx in (-1, 1):
            for k in range(2):
                p.ellipse(cx + sx * (rx - 0.05), cy + 0.02 + 0.04 * k, 0.038, 0.011, sec, angle=sx * (8 + 10 * k))
    elif pat == "patches":
        a = float(lay.uniform(0, 2 * np.pi))
        nx, ny = math.cos(a), math.sin(a)
        d = nx * cx + ny * cy + float(lay.uniform(0.02, 0.07))
        patch = _clip_halfplane(head, -nx, -ny, -d)
        if len(patch) >= 3:
            p.poly(patch, sec)
    elif pat == "tuxedo":
        wedge = _clip_halfplane(head, 0.0, -1.0, -(cy + 0.0))
        wedge = _clip_halfplane(wedge, 1.0, -0.8, cx - 0.8 * (cy - 0.02)) if len(wedge) else wedge
        wedge = _clip_halfplane(wedge, -1.0, -0.8, -cx - 0.8 * (cy - 0.02)) if len(wedge) else wedge
        if len(wedge) >= 3:
            p.poly(wedge, sec)
    elif pat == "points":
        p.ellipse(cx, cy + 0.045, 0.12, 0.1, sec)

    # folded ears sit on top of the head
    if ears == "folded":
        for sx in (-1, 1):
            p.poly([(cx + sx * (rx - 0.01), cy - ry + 0.06), (cx + sx * (rx - 0.02), cy - ry - 0.05),
                    (cx + sx * (rx - 0.14), cy - ry + 0.005)], ear_c)
            p.poly([(cx + sx * (rx - 0.03), cy - ry + 0.035), (cx + sx * (rx - 0.035), cy - ry - 0.015),
                    (cx + sx * (rx - 0.1), cy - ry + 0.01)], inner)

    # cheeks
    cheek = _shade(fur, 1.3) if pat != "points" else _shade(sec, 1.2)
    for sx in (-1, 1):
        p.ellipse(cx + sx * 0.036, cy + 0.085, 0.042, 0.032, cheek)

    # eyes
    eye = t["eye_color"]
    cols = (_CAT_EYE["blue"], _CAT_EYE["yellow"]) if eye == "odd" else (_CAT_EYE[eye], _CAT_EYE[eye])
    ey, ex = cy - 0.015, 0.085
    gx, _ = ph.gaze
    for i, sx in enumerate((-1, 1)):
        x = cx + sx * ex
        if ph.blink:
            p.arc(x, ey + 0.01, 0.04, 0.025, np.pi + 0.3, 2 * np.pi - 0.3, _DARK, 0.013)
            continue
        lens = p.ellipse_pts(x, ey, 0.052, 0.04, angle=-sx * 10, n=36)
        p.poly(lens, _DARK)
        p.ellipse(x, ey, 0.044, 0.033, cols[i], angle=-sx * 10)
        pw = 0.007 + 0.017 * ph.pupil
        p.ellipse(x + gx * 0.008, ey, pw, 0.03, (14, 12, 14))
        p.ellipse(x - 0.016, ey - 0.014, 0.008, 0.008, _WHITE)

    # nose, mouth, whiskers
    nc = _NOSE[t["nose_color"]]
    ny = cy + 0.06
    p.poly([(cx - 0.026, ny - 0.012), (cx + 0.026, ny - 0.012), (cx, ny + 0.016)], nc)
    line_c = _DARK if sum(cheek) > 220 else _shade(cheek, 1.8)
    if ph.mouth == "open":
        p.chord(cx, ny + 0.035, 0.032, 0.04, 0.0, np.pi, _MOUTH)
        p.ellipse(cx, ny + 0.055, 0.018, 0.012, _TONGUE)
    p.line([(cx, ny + 0.01), (cx, ny + 0.03)], line_c, 0.008)
    for sx in (-1, 1):
        p.arc(cx + sx * 0.02, ny + 0.026, 0.02, 0.018 if ph.mouth != "smile" else 0.024, 0.0, np.pi, line_c, 0.008)
    wc = _WHISKER[t["whiskers"]]
    p.freeze_silhouette()
    for sx in (-1, 1):
        for k in range(3):
            p.line([(cx + sx * 0.07, ny + 0.015 + 0.012 * k), (cx + sx * (rx + 0.09), ny - 0.03 + 0.04 * k)], wc,
                   0.008, caps=False)

    # collar
    if t["collar_color"] != "none":
        cc = _VIVID[t["collar_color"]]
        p.rect(cx - 0.15, 0.725, cx + 0.15, 0.772, cc, r=0.02)
        if t["bell"] == "yes":
            p.ellipse(cx, 0.8, 0.032, 0.032, _GOLD)
            p.line([(cx, 0.805), (cx, 0.828)], _shade(_GOLD, 0.5), 0.008, caps=False)


_DRAW = {"person": _draw_person, "dog": _draw_dog, "cat": _draw_cat}


# --------------------------------------------------------------------------------------------
# Backgrounds, lighting, compositing (numpy at output size)
# --------------------------------------------------------------------------------------------


def _rand_color(r: np.random.Generator, smin: float = 0.05, smax: float = 0.7, vmin: float = 0.3,
                vmax: float = 0.95) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(float(r.random()), float(r.uniform(smin, smax)), float(r.uniform(vmin, vmax))),
                    dtype=np.float32)


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


def _background(r: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size,size,3] in [0,1]."""
    kind = int(r.integers(4))
    c1 = _rand_color(r)
    c2 = _rand_color(r)
    x, y = _grid(size)
    if kind == 0:
        img = np.broadcast_to(c1, (size, size, 3)).copy()
    elif kind == 1:
        img = c1 * (1 - y[..., None]) + c2 * y[..., None]
    elif kind == 2:
        a = float(r.uniform(0, np.pi))
        period = float(r.uniform(0.1, 0.3))
        u = (x * math.cos(a) + y * math.sin(a)) / period + float(r.random())
        tri = np.abs((u % 1.0) - 0.5) * 2.0  # 0..1 triangle wave
        px = period * size  # pixels per period
        m = np.clip((tri - 0.5) * px + 0.5, 0.0, 1.0)[..., None]
        c2 = c1 * 0.45 + c2 * 0.55
        img = c1 * (1 - m) + c2 * m
    else:
        g = int(r.integers(3, 8))
        noise = r.normal(0.0, 1.0, size=(g, g, 3)).astype(np.float32)
        noise = 0.6 * noise.mean(axis=2, keepdims=True) + 0.4 * noise
        up = np.stack([np.asarray(Image.fromarray(noise[..., i]).resize((size, size), Image.BICUBIC))
                       for i in range(3)], axis=2)
        fine = r.normal(0.0, 0.025, size=(size, size, 1)).astype(np.float32)
        img = c1 + 0.1 * up + fine
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _lighting(ph: _Photo, size: int) -> np.ndarray:
    c = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size) - np.float32(0.5)
    a, amp = ph.grad
    g = c[None, :] * np.float32(2 * amp * math.cos(a)) + c[:, None] * np.float32(2 * amp * math.sin(a) + 0.0)
    g += np.float32(1.0)
    return g[..., None] * (ph.bright * (1.0 + ph.tint)).astype(np.float32)


def _dilate(a: np.ndarray, r: int) -> np.ndarray:
    out = a.copy()
    for _ in range(r):
        m = out.copy()
        m[1:] = np.maximum(m[1:], out[:-1])
        m[:-1] = np.maximum(m[:-1], out[1:])
        m2 = m.copy()
        m2[:, 1:] = np.maximum(m2[:, 1:], m[:, :-1])
        m2[:, :-1] = np.maximum(m2[:, :-1], m[:, 1:])
        out = m2
    return out


def _supersample(size: int) -> int:
    return 4 if size <= 64 else 2 if size <= 512 else 1


def _layer(p: _Painter, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Premultiplied rgb [size,size,3], alpha [size,size] and outlined-silhouette alpha from a painter's canvas."""
    ss = p.canvas // size
    img = p.img.reduce(ss) if ss > 1 else p.img
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    a = arr[..., 3]
    sil = a
    if p.silhouette is not None:
        sil = np.asarray(p.silhouette.reduce(ss) if ss > 1 else p.silhouette, dtype=np.float32) * np.float32(1 / 255)
    return arr[..., :3], a, sil


def _rounded_rect_alpha(size: int, x0: float, y0: float, x1: float, y1: float, rad: float) -> np.ndarray:
    """Anti-aliased alpha of a rounded rectangle given in pixels."""
    px = np.arange(size, dtype=np.float32) + 0.5
    cxr, cyr = (x0 + x1) / 2, (y0 + y1) / 2
    hx, hy = (x1 - x0) / 2 - rad, (y1 - y0) / 2 - rad
    qx = np.abs(px[None, :] - cxr) - hx
    qy = np.abs(px[:, None] - cyr) - hy
    d = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - rad
    return np.clip(0.5 - d, 0.0, 1.0)


def _occluder(seed: int, alpha: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An object at a frame edge covering a modest part (< 15%) of the subject."""
    r = np.random.default_rng(seed)
    total = float(alpha.sum()) + 1e-6
    side = int(r.integers(3))  # 0 left, 1 right, 2 bottom
    target = float(r.uniform(0.05, 0.12))
    if side == 2:
        prof = alpha.sum(axis=1)[::-1].cumsum() / total  # rows from the bottom
        depth = int(np.searchsorted(prof, target))
        x0, x1 = r.uniform(-0.2, 0.3) * size, r.uniform(0.7, 1.2) * size
        box = (x0, size - depth, x1, size + size * 0.2)
    else:
        y0 = r.uniform(0.0, 0.45) * size
        y1 = size * 1.2 if r.random() < 0.5 else y0 + r.uniform(0.35, 0.6) * size
        yi0, yi1 = int(max(0, y0)), int(min(size, y1))
        cols = alpha[yi0:yi1].sum(axis=0)
        if side == 1:
            cols = cols[::-1]
        depth = int(np.searchsorted(cols.cumsum() / total, target))
        box = (-size * 0.2, y0, depth, y1) if side == 0 else (size - depth, y0, size * 1.2, y1)
    rad = min(box[2] - box[0], box[3] - box[1]) * (0.5 if r.random() < 0.5 else 0.15)
    occ_a = _rounded_rect_alpha(size, *box, max(rad, 0.5)).astype(np.float32)
    c = _rand_color(r, 0.1, 0.8, 0.2, 0.9)
    x, y = _grid(size)
    shade = 1.0 + 0.15 * (y - 0.5)[..., None] * (1 if r.random() < 0.5 else -1)
    rgb = np.clip(c * shade, 0, 1) * occ_a[..., None]
    return rgb.astype(np.float32), occ_a


@functools.lru_cache(maxsize=8)
def _scene(class_noun: str, identity: int, photo: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = dict(_traits(class_noun, identity))
    ph = _Photo(class_noun, identity, photo)
    canvas = size * _supersample(size)
    p = _Painter(canvas, ph.tx, ph.ty, ph.scale, ph.angle, pivot=(0.5, 0.62))
    _DRAW[class_noun](p, t, ph)
    fg, a, sil = _layer(p, size)
    # dark cartoon outline around the silhouette (part of the subject)
    ring = np.clip(_dilate(sil, max(1, round(size / 64))) - a, 0.0, 1.0) * 0.8
    fg = fg + ring[..., None] * np.array([0.1, 0.08, 0.08], dtype=np.float32)
    a = a + ring
    bg = _background(np.random.default_rng(ph.bg), size)
    img = bg * (1.0 - a[..., None]) + fg
    empty = bg
    if ph.occlusion:
        orgb, oa = _occluder(ph.occ_rng, a, size)
        img = img * (1.0 - oa[..., None]) + orgb
        empty = bg * (1.0 - oa[..., None]) + orgb
        a = a * (1.0 - oa)
    light = _lighting(ph, size)
    out = np.clip(img * light * 255.0 + 0.5, 0, 255).astype(np.uint8)
    back = np.clip(empty * light * 255.0 + 0.5, 0, 255).astype(np.uint8)
    mask = np.clip(a, 0.0, 1.0).astype(np.float32)
    for arr in (out, back, mask):
        arr.flags.writeable = False
    return out, back, mask


def _scene_checked(class_noun: str, identity: int, photo: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _scene(_check_class(class_noun), _check_index(identity, "identity"), _check_index(photo, "photo"),
                  _check_size(size))


# --------------------------------------------------------------------------------------------
# Public: rendering
# --------------------------------------------------------------------------------------------


def render(class_noun: str, identity: int, photo: int, size: int = 64) -> Image.Image:
    """The photo-th picture of the identity: an RGB image of size x size."""
    return Image.fromarray(np.array(_scene_checked(class_noun, identity, photo, size)[0]), "RGB")


def render_background(class_noun: str, identity: int, photo: int, size: int = 64) -> Image.Image:
    """The same photo without the subject (same background, lighting and occluder)."""
    return Image.fromarray(np.array(_scene_checked(class_noun, identity, photo, size)[1]), "RGB")


def subject_mask(class_noun: str, identity: int, photo: int, size: int = 64) -> np.ndarray:
    """float32 [size,size] in [0,1]: how much each pixel shows the subject (outline included, occluder excluded)."""
    return np.array(_scene_checked(class_noun, identity, photo, size)[2])


def render_array(class_noun: str, identities: Sequence[int], photos: Sequence[int], size: int = 64) -> np.ndarray:
    """uint8 [N,size,size,3]: image i renders (identities[i], photos[i])."""
    c = _check_class(class_noun)
    s = _check_size(size)
    ids, phs = list(identities), list(photos)
    if len(ids) != len(phs):
        raise NocloneError(f"render_array needs as many photos as identities, got {len(ids)} and {len(phs)}")
    out = np.empty((len(ids), s, s, 3), dtype=np.uint8)
    for k, (i, ph) in enumerate(zip(ids, phs)):
        out[k] = _scene(c, _check_index(i, "identity"), _check_index(ph, "photo"), s)[0]
    return out


def random_nonsubject(seed: int, size: int = 64) -> Image.Image:
    """A picture with no subject: a background plus unrelated shapes, blobs and stripes (detector negatives)."""
    sd = _check_index(seed, "seed")
    s = _check_size(size)
    r = _rng("nonsubject", sd)
    bg = _background(r, s)
    p = _Painter(s * _supersample(s))
    palettes = (list(_SKIN.values()) + list(_HAIR.values()) + list(_DOG_FUR.values()) + list(_CAT_FUR.values())
                + list(_VIVID.values()))
    for _ in range(int(r.integers(2, 9))):
        if r.random() < 0.5:
            col = palettes[int(r.integers(len(palettes)))]
        else:
            col = tuple(int(v * 255) for v in _rand_color(r, 0.1, 0.9, 0.15, 1.0))
        kind = int(r.integers(5))
        x, y = float(r.uniform(-0.1, 1.1)), float(r.uniform(-0.1, 1.1))
        if kind == 0:
            p.ellipse(x, y, float(r.uniform(0.04, 0.3)), float(r.uniform(0.04, 0.3)), col, float(r.uniform(0, 180)))
        elif kind == 1:
            w, h = float(r.uniform(0.05, 0.5)), float(r.uniform(0.05, 0.5))
            p.rect(x - w / 2, y - h / 2, x + w / 2, y + h / 2, col, r=float(r.uniform(0, 0.05)))
        elif kind == 2:
            n = int(r.integers(3, 8))
            ang = np.sort(r.uniform(0, 2 * np.pi, n))
            rad = r.uniform(0.05, 0.3, n)
            p.poly(np.stack([x + rad * np.cos(ang), y + rad * np.sin(ang)], axis=1), col)
        elif kind == 3:
            a = float(r.uniform(0, np.pi))
            d = np.array([math.cos(a), math.sin(a)])
            w = float(r.uniform(0.02, 0.12))
            for k in range(int(r.integers(1, 5))):
                o = np.array([x, y]) + np.array([-d[1], d[0]]) * k * w * 2.2
                p.line([o - d * 1.5, o + d * 1.5], col, w, caps=False)
        else:
            n = int(r.integers(5, 10))
            ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
            rad = float(r.uniform(0.06, 0.25)) * r.uniform(0.7, 1.3, n)
            pts = np.stack([x + rad * np.cos(ang), y + rad * np.sin(ang)], axis=1)
            for q in pts:
                p.ellipse(float(q[0]), float(q[1]), float(rad.mean() * 0.6), float(rad.mean() * 0.6), col)
            p.ellipse(x, y, float(rad.mean()), float(rad.mean()), col)
    fg, a, _ = _layer(p, s)
    img = bg * (1.0 - a[..., None]) + fg
    ph = _Photo("nonsubject", sd, 0)
    out = np.clip(img * _lighting(ph, s) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")
