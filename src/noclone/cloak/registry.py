"""The cloak methods by name, and protecting a folder with one of them.

Kept apart from base.py because every method imports base.py: a registry there would import the methods that import
it. Here it imports them and none of them imports it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from noclone.cloak.base import MANIFEST_NAME, Cloak, _output_names, check_output_dir
from noclone.errors import NocloneError

log = logging.getLogger(__name__)


def cloak_methods() -> dict[str, type[Cloak]]:
    """Method name -> class (imported lazily: RID's networks are not needed by the others)."""
    from noclone.cloak.advdm import AdvDM
    from noclone.cloak.aspl import ASPL
    from noclone.cloak.fsmg import FSMG
    from noclone.cloak.photoguard import PhotoGuard
    from noclone.cloak.rid import RIDCloak

    return {c.name: c for c in (RIDCloak, ASPL, FSMG, AdvDM, PhotoGuard)}


def get_cloak(method: str, model=None, **settings) -> Cloak:
    """The cloak `method` ('rid', 'aspl', 'fsmg', 'advdm', 'photoguard') against `model` with settings/preset."""
    methods = cloak_methods()
    if method not in methods:
        raise NocloneError(f"unknown cloak method {method!r}; choose from {', '.join(methods)}")
    return methods[method](model, **settings)


def protect_folder(method: str, images_dir: str | Path, out_dir: str | Path, model=None, *,
                   overwrite: bool = False, **settings) -> Path:
    """Protect every photo of a folder into `out_dir` (PNGs, metadata stripped, atomic) with a cloak.json manifest."""
    from noclone import __version__
    from noclone.attacks.base import load_subject_images, subject_fingerprint
    from noclone.data.atomic import atomic_output_dir, atomic_write_json
    from noclone.data.images import file_sha256, save_image

    check_output_dir(images_dir, out_dir, overwrite)
    paths, images = load_subject_images(images_dir, min_count=1)
    started = time.perf_counter()
    cloak = get_cloak(method, model, **settings)
    loaded = time.perf_counter()
    protected = cloak.protect(images)
    done = time.perf_counter()
    names = _output_names(paths)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        outputs = []
        for name, image, original in zip(names, protected, images):
            save_image(image, tmp / name)
            diff = np.abs(np.asarray(image, np.int16) - np.asarray(original.convert("RGB"), np.int16))
            outputs.append({"file": name, "sha256": file_sha256(tmp / name), "size": list(image.size),
                            "linf_255": int(diff.max())})
        manifest = {
            **cloak.manifest(),
            "noclone_version": __version__,
            "inputs": [{"file": p.name, "sha256": h, "size": list(im.size)}
                       for p, h, im in zip(paths, subject_fingerprint(paths), images)],
            "outputs": outputs,
            "timings": {"setup_s": round(loaded - started, 3), "protect_s": round(done - loaded, 3),
                        "per_image_s": round((done - loaded) / len(images), 4)},
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    log.info("%d protected photos written to %s (%s, budget %.4f = %.1f/255)", len(images), out_dir, method,
             cloak.config.budget, cloak.config.budget * 255)
    return Path(out_dir)
