"""The PyTorch stage's view of :mod:`engines._atomic` (the one place for output safety).

Artifacts are published like every other output: staged in a hidden sibling, marked as ours, moved
into place at the end, under an exclusive lock; the errors are :class:`OutputPathError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pqcad_deploy.engines._atomic import check_output_dir as _check_output_dir
from pqcad_deploy.engines._atomic import output_lock as _output_lock
from pqcad_deploy.engines._atomic import staged_directory
from pqcad_deploy.errors import OutputPathError

__all__ = ["ARTIFACT_KIND", "atomic_output_dir", "check_output_dir", "output_lock"]

ARTIFACT_KIND = "artifact"


def check_output_dir(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse an artifact output that may not be written (see :func:`engines._atomic.check_output_dir`)."""
    _check_output_dir(Path(path), overwrite=overwrite, kind=ARTIFACT_KIND, error=OutputPathError)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of an artifact output for a whole compress run (checkpoints included)."""
    with _output_lock(path, error=OutputPathError):
        yield


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes the artifact `path` only if the block finishes."""
    with staged_directory(path, overwrite=overwrite, error=OutputPathError, kind=ARTIFACT_KIND) as tmp:
        yield tmp
