"""Atomic directory output: build in a hidden temporary sibling, rename into place at the end.

A crash or an error half-way therefore never leaves a directory that looks like a valid result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pqcad_deploy.errors import OutputPathError

__all__ = ["atomic_output_dir", "check_output_dir"]


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output (unless overwrite) and an unwritable parent."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output {path} exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputPathError(f"output {path} already exists and is not empty; pass --overwrite to replace it.")
    parent = path.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OutputPathError(f"cannot write {path}: {probe} is not a writable directory.")


def _apply_umask(root: Path) -> None:
    """mkdtemp and some writers create private files; give the result the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes."""
    path = Path(path)
    check_output_dir(path, overwrite)
    try:
        path.resolve().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create the parent folder of {path}: {exc.strerror}.") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
