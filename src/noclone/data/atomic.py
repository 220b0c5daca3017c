"""Atomic outputs: a file or a whole folder appears complete, or not at all.

Files are written to a hidden temporary sibling (same directory, hence same filesystem) and moved into place with
``os.replace``; folders are built in a hidden temporary sibling directory and renamed into place when the work
succeeds. A failure never leaves a half-written output or a stray temporary behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from noclone.errors import NocloneError

__all__ = ["atomic_output_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _dir_label(path: Path) -> str:
    text = str(path)
    return text if text.endswith(os.sep) else text + os.sep


def _fsync_dir(directory: Path) -> None:
    """Best effort: make a rename durable (POSIX); silently skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parent(path: Path) -> Path:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise NocloneError(f"{_dir_label(parent)}: is a file, expected a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NocloneError(f"{_dir_label(parent)}: cannot create directory ({exc.strerror or exc})") from None
    return parent


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then move it onto ``path`` in one step.

    The temporary file is created with mode 0o666 minus the umask (like a plain ``open``), so the final file gets
    ordinary permissions. On any failure the temporary file is removed and ``path`` is left as it was.
    Exceptions raised by ``write`` propagate unchanged (after clean-up); filesystem failures become NocloneError.
    """
    path = Path(path)
    if path.is_dir():
        raise NocloneError(f"{_dir_label(path)}: is a directory, expected a file")
    parent = _make_parent(path)
    while True:
        tmp = parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise NocloneError(f"{path}: cannot write ({exc.strerror or exc})") from None
        break
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, NocloneError):
            raise NocloneError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    _fsync_dir(parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: temporary file in the same directory, then ``os.replace``."""
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically.

    The object is serialized before anything touches the disk, so an unserializable object leaves no file.
    """
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise NocloneError(f"{path}: cannot write JSON ({exc})") from None
    atomic_write_text(path, text + "\n")


def _make_temp_dir(parent: Path, name: str, tag: str) -> Path:
    while True:
        candidate = parent / f".{name}.{tag}-{secrets.token_hex(6)}"
        try:
            os.mkdir(candidate, 0o777)  # umask applies, as for any mkdir
        except FileExistsError:
            continue
        except OSError as exc:
            reason = exc.strerror or exc
            raise NocloneError(f"{_dir_label(parent)}: cannot create a temporary directory ({reason})") from None
        return candidate


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise NocloneError(f"{out}: is a file, expected a directory")
        if not overwrite and any(out.iterdir()):
            raise NocloneError(f"{_dir_label(out)}: already exists and is not empty (pass overwrite to replace it)")


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build an output folder in a temporary sibling and rename it to ``out`` only if the block succeeds.

    Yields the temporary directory (same parent as ``out``, named like ``.<out name>.tmp-<random>``); write
    everything there. Refuses at entry, before any work, when ``out`` is an existing non-empty directory and
    ``overwrite`` is false, or when ``out`` is a file. On success the temporary directory becomes ``out`` (an
    existing ``out`` is replaced when ``overwrite`` is true, or when it is empty). On an exception the temporary
    directory is removed, ``out`` is left untouched, and the exception propagates. Parent directories are created.
    """
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise NocloneError(f"{out}: not usable as an output directory name")
    _check_out(out, overwrite)
    parent = _make_parent(out)
    tmp = _make_temp_dir(parent, out.name, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # The block succeeded: move the result into place.
    if not tmp.is_dir():
        raise NocloneError(f"{_dir_label(tmp)}: temporary output directory disappeared before it could become {out}")
    try:
        _check_out(out, overwrite)  # something may have appeared at `out` while the work ran
    except NocloneError as exc:
        raise NocloneError(f"{exc}; the finished output was kept in {_dir_label(tmp)}") from None
    old: Path | None = None
    try:
        if out.exists() or out.is_symlink():
            old = parent / f".{out.name}.old-{secrets.token_hex(6)}"
            os.rename(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)  # put the previous output back
                old = None
            raise
    except OSError as exc:
        if old is not None and not out.exists():
            try:
                os.replace(old, out)
                old = None
            except OSError:
                pass
        raise NocloneError(
            f"{out}: cannot move the finished output into place ({exc.strerror or exc}); "
            f"it was kept in {_dir_label(tmp)}"
        ) from None
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)
