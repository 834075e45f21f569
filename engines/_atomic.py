"""Atomic writes for files and directories.

A crash or an error half-way through writing must never leave something that looks valid: a PNG
that is truncated, or an engine directory with an ``engine.json`` but a partial model. Everything is
first written under a temporary name in the *same* directory (so the final rename stays on one file
system and is atomic) and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

__all__ = ["atomic_file", "staged_directory", "ensure_writable_dir"]


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Create ``path`` (and parents) and return it, or raise one clear sentence.

    Raises:
        OutputError: the directory cannot be created or is not writable.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"Cannot create the {what} directory {path} ({exc.strerror or exc}); choose a writable location."
        ) from exc
    if not os.access(path, os.W_OK):
        raise OutputError(f"The {what} directory {path} is not writable; choose a writable location.")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    Raises:
        OutputError: the parent directory cannot be created or written.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"Cannot write {path} ({exc.strerror or exc}); choose a writable location.") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike[str], *, overwrite: bool, error: type[Exception]) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``out_dir``; on success move it to ``out_dir``.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; with ``overwrite`` the old
    directory is moved aside and deleted only after the new one is in place.

    Args:
        out_dir: the final directory.
        overwrite: replace an existing non-empty ``out_dir``.
        error: the exception class to raise (e.g. ``BuildError``), so callers keep their family.

    Raises:
        error: ``out_dir`` exists and is not an empty directory (without ``overwrite``), or the
            parent directory cannot be written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise error(f"{out_dir} exists and is a file; choose a directory path for the engine.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise error(f"{out_dir} already exists and is not empty; pass overwrite=True (--overwrite) or choose another directory.")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise error(f"Cannot write to {parent} ({exc.strerror or exc}); choose a writable output directory.") from exc
    try:
        yield tmp
        trash = None
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
