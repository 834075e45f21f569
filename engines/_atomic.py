"""Output safety, in one place: atomic writes, ownership markers, locks and the user's file modes.

Three promises every verb makes about what it writes (README, "CLI reference"):

* **Nothing half-written looks valid.** Files are written under a temporary name in the same
  directory and renamed at the end; directories are assembled in a hidden temporary sibling and
  renamed into place (:func:`staged_directory`, :func:`publish_directory`).
* **``--overwrite`` never removes what the tool did not write.** Every directory the tool publishes
  carries :data:`MARKER_FILE`, which names its kind and lists every file in it. An existing
  directory is replaced only when its marker is of the same kind and covers everything in it; a
  folder holding anything else (a user's photos, notes dropped into an engine directory) is refused
  with one line naming what is there. Files are replaced only when the caller's ``is_ours`` check
  recognises them (our ONNX manifest, our npz layout, our JSON). The check runs before the work and
  again right before the old output is moved aside, so files added during a long run are safe too.
* **One writer per output.** :func:`output_lock` takes an exclusive ``flock`` on a hidden
  ``.NAME.lock`` beside the output for the whole run; a second run on the same output is refused at
  once instead of racing on checkpoints or renames. The kernel drops the lock if the process dies.

Outputs get the modes any other file the user creates would get (``0666 & ~umask`` for files,
``0777 & ~umask`` for directories): ``mkstemp`` / ``mkdtemp`` create private ``0600`` / ``0700``
entries, which would otherwise leak into the results.

This module is torch-free: ``pqcad_deploy.fsutil`` wraps it for the PyTorch stage.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError

__all__ = [
    "MARKER_FILE",
    "OUTPUT_KINDS",
    "atomic_file",
    "check_output_dir",
    "check_output_file",
    "directory_kind",
    "ensure_writable_dir",
    "output_lock",
    "publish_directory",
    "staged_directory",
]

MARKER_FILE = ".pqcad-deploy.json"
"""Written into every directory the tool publishes: ``{"tool", "kind", "files"}``."""
OUTPUT_KINDS: tuple[str, ...] = ("artifact", "engine", "samples", "analysis", "parts")
"""parts: a latent export's ``NAME.parts/`` beside ``NAME.onnx`` (engines.parts)."""
_TOOL = "pqcad-deploy"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_user_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory tree) the modes the user's umask gives new files."""
    mask = _umask()
    if path.is_file():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _no_space(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wraps it in its own exception (safetensors, ONNX Runtime)."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _refuse_cwd(path: Path, error: type[Exception], what: str) -> None:
    """An empty path, the current directory or one of its parents is never an output."""
    if str(path) in ("", "."):
        raise error(f"the {what} path is empty or the current directory; name a new directory or file.")
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise error(f"{path} is the current directory or one of its parents; name a new {what} directory.")


def _first_existing(path: Path) -> Path:
    probe = path.resolve().parent
    while not probe.exists():
        probe = probe.parent
    return probe


def _check_parent_writable(path: Path, error: type[Exception]) -> None:
    """Create and remove a temporary file where ``path`` would go (``os.access`` says yes to root on /proc)."""
    probe = _first_existing(path)
    reason = "not a directory"
    if probe.is_dir():
        try:
            fd, name = tempfile.mkstemp(prefix=".pqcad-probe.", dir=probe)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        else:
            os.close(fd)
            os.unlink(name)
            return
    raise error(f"cannot write {path}: {probe} is not a writable directory ({reason}); choose another location.")


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != _TOOL or not isinstance(data.get("files"), list):
        return None
    return data


def directory_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind recorded in a directory's marker ("artifact", "engine", "samples", "analysis"), or None."""
    marker = _read_marker(Path(path))
    return None if marker is None else str(marker.get("kind"))


def _listing(path: Path) -> list[str]:
    """Every file below ``path`` as a sorted POSIX relative path (symlinks count as files)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = Path(dirpath).relative_to(path)
        out += [(rel / f).as_posix() for f in filenames]
        out += [(rel / d).as_posix() + "/" for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        if not filenames and not dirnames and dirpath != str(path):
            out.append(rel.as_posix() + "/")  # an empty folder is content too
    return sorted(out)


def _examples(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_ours(path: Path, kind: str, error: type[Exception]) -> None:
    """Refuse to replace ``path`` unless it is a pqcad-deploy ``kind`` output holding only its own files."""
    marker = _read_marker(path)
    if marker is None:
        found = _listing(path)
        raise error(f"{path} was not written by pqcad-deploy (no {MARKER_FILE}; it holds {_examples(found)}); "
                    "--overwrite replaces only pqcad-deploy outputs: choose another directory or move it away yourself.")
    if marker.get("kind") != kind:
        article = "an" if kind[:1] in "aeiou" else "a"
        raise error(f"{path} is a pqcad-deploy {marker.get('kind')} directory, not {article} {kind} one; "
                    "choose another directory.")
    foreign = sorted(set(_listing(path)) - set(marker["files"]) - {MARKER_FILE})
    if foreign:
        raise error(f"{path} holds files pqcad-deploy did not write ({_examples(foreign)}); --overwrite will not "
                    "delete them: move them away or choose another directory.")


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool, kind: str,
                     error: type[Exception] = OutputError) -> Path:
    """Check, before any work, that ``path`` can become a ``kind`` output directory.

    Raises:
        error: ``path`` is empty, the current directory or a parent of it; an existing file; a non-empty
            directory without ``overwrite``; with ``overwrite``, a directory that is not a pqcad-deploy
            ``kind`` output holding only its own files; or its parent is not writable.
    """
    path = Path(path)
    _refuse_cwd(path, error, kind)
    if path.exists() and not path.is_dir():
        raise error(f"{path} exists and is not a directory; choose a directory path for the {kind}.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise error(f"{path} already exists and is not empty; pass --overwrite to replace a pqcad-deploy "
                        "output, or choose another directory.")
        _check_ours(path, kind, error)
    _check_parent_writable(path, error)
    return path


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool, error: type[Exception] = OutputError,
                      is_ours: Callable[[Path], bool], what: str) -> Path:
    """Check, before any work, that ``path`` can be written as a ``what`` file.

    Args:
        is_ours: recognises a file this tool wrote (e.g. an ONNX with our manifest); only such a file
            is replaced by ``overwrite``.

    Raises:
        error: ``path`` is empty or a directory; it exists (without ``overwrite``, or not ours); or its
            parent is not writable.
    """
    path = Path(path)
    if str(path) in ("", "."):
        raise error(f"the {what} path is empty; name a file.")
    if path.is_dir():
        raise error(f"{path} is a directory; give a file path for the {what}.")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise error(f"{path} already exists; pass --overwrite to replace it, or choose another path.")
        if not path.is_file() or not is_ours(path):
            raise error(f"{path} was not written by pqcad-deploy (it is not a {what}); --overwrite replaces only "
                        "pqcad-deploy outputs: choose another path.")
    _check_parent_writable(path, error)
    return path


def ensure_writable_dir(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Create ``path`` (and parents) and return it, or raise one clear sentence.

    Raises:
        OutputError: the directory cannot be created or is not writable.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the {what} directory {path} ({exc.strerror or exc}); "
                          "choose a writable location.") from exc
    if not os.access(path, os.W_OK):
        raise OutputError(f"The {what} directory {path} is not writable; choose a writable location.")
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], error: type[Exception] = OutputError) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success give it the user's modes and rename it onto ``path``.

    Raises:
        error: the parent directory cannot be created or written, or the disk filled up.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise error(f"cannot write {path} ({exc.strerror or exc}); choose a writable location.") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            _apply_user_modes(tmp)
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a full disk
            if _no_space(exc):
                raise error(f"no space left on the device while writing {path}; free some space and rerun.") from exc
            raise
    finally:
        if tmp.exists():
            tmp.unlink()


_HELD: dict[str, list] = {}  # resolved lock path -> [fd, depth]: re-entrant within one process


def _lock_path(path: Path) -> Path:
    resolved = path.resolve()
    return resolved.parent / f".{resolved.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str], *, error: type[Exception] = OutputError) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` for the block (re-entrant in one process).

    Raises:
        error: another process holds it (a second run on the same output), or the lock cannot be created.
    """
    lock = _lock_path(Path(path))
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create the folder of {path} ({exc.strerror or exc}); choose a writable location.") from exc
    fd = _acquire(lock, path, error)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding it: a waiter that opened the old inode re-checks and retries
        os.close(fd)


def _acquire(lock: Path, path: str | os.PathLike[str], error: type[Exception]) -> int:
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as exc:
            raise error(f"cannot lock {path} ({exc.strerror or exc}); choose a writable location.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise error(f"another pqcad-deploy run is writing {path} (it holds {lock}); wait for it to finish "
                        "or choose another output.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and flock: take the new one
    raise error(f"cannot lock {path}: its lock file {lock} keeps changing; is another run starting and stopping?")


def publish_directory(staged: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool,
                      error: type[Exception] = OutputError, kind: str) -> None:
    """Mark ``staged`` as a ``kind`` output and move it to ``out_dir``, replacing an old output of ours.

    The marker lists every file, the tree gets the user's modes, an existing ``out_dir`` is checked
    again (files may have been added during the run) and moved aside before the rename, and deleted
    only once the new directory is in place.

    Raises:
        error: ``out_dir`` exists and may not be replaced (see :func:`check_output_dir`).
    """
    staged, out_dir = Path(staged), Path(out_dir)
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    marker = {"tool": _TOOL, "kind": kind, "files": [f for f in _listing(staged) if f != MARKER_FILE]}
    (staged / MARKER_FILE).write_text(json.dumps(marker, sort_keys=True, indent=1) + "\n")
    _apply_user_modes(staged)
    trash = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise error(f"{out_dir} appeared while this run was writing; pass --overwrite or choose another directory.")
        _check_ours(out_dir, kind, error)
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.resolve().parent))
        os.replace(out_dir, trash / "old")
    elif out_dir.is_dir():
        out_dir.rmdir()  # an empty directory, e.g. made by the user for us
    elif out_dir.exists() or out_dir.is_symlink():
        raise error(f"{out_dir} exists and is not a directory; choose a directory path for the {kind}.")
    os.replace(staged, out_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike[str], *, overwrite: bool, error: type[Exception] = OutputError,
                     kind: str) -> Iterator[Path]:
    """Yield an empty hidden temporary sibling of ``out_dir``; publish it as ``out_dir`` if the block succeeds.

    Holds :func:`output_lock` on ``out_dir`` throughout. A failed block leaves nothing behind; a full
    disk inside the block is reported as such.

    Raises:
        error: ``out_dir`` may not be written (:func:`check_output_dir`), another run holds it, or the
            disk filled up.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite, kind=kind, error=error)
    with output_lock(out_dir, error=error):
        parent = out_dir.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
        except OSError as exc:
            raise error(f"Cannot write to {parent} ({exc.strerror or exc}); choose a writable output directory.") from exc
        try:
            try:
                yield tmp
                publish_directory(tmp, out_dir, overwrite=overwrite, error=error, kind=kind)
            except Exception as exc:  # noqa: BLE001 - re-raised unless it is a full disk
                if _no_space(exc):
                    raise error(f"no space left on the device while writing {out_dir}; free some space "
                                "and rerun.") from exc
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
