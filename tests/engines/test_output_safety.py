"""engines._atomic: --overwrite never removes what the tool did not write, one writer per output,
the user's file modes, a full disk reported as such, and nothing half-written left behind."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pqcad_deploy.engines._atomic import (MARKER_FILE, atomic_file, check_output_dir, check_output_file, directory_kind,
                             output_lock, staged_directory)
from pqcad_deploy.engines.errors import OutputError


def _publish(out: Path, files: dict[str, bytes], *, overwrite: bool = False, kind: str = "engine") -> None:
    with staged_directory(out, overwrite=overwrite, kind=kind) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_published_directory_lists_its_files_in_the_marker(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    _publish(out, {"model.onnx": b"m", "sub/engine.json": b"{}"})
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker == {"tool": "pqcad-deploy", "kind": "engine", "files": ["model.onnx", "sub/engine.json"]}
    assert directory_kind(out) == "engine"
    assert _siblings(out) == []  # no temporary directory and no lock file left


def test_overwrite_replaces_our_own_output(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    _publish(out, {"a.bin": b"old", "b.bin": b"old"})
    _publish(out, {"a.bin": b"new"}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "a.bin"]
    assert (out / "a.bin").read_bytes() == b"new"
    assert _siblings(out) == []


def test_overwrite_refuses_a_users_folder_and_keeps_every_file(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    (out / "2024").mkdir(parents=True)
    (out / "2024" / "beach.jpg").write_bytes(b"jpg")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"was not written by pqcad-deploy .*2024/beach.jpg, notes.txt"):
        _publish(out, {"x": b"x"}, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "2024" / "beach.jpg").read_bytes() == b"jpg"
    assert _siblings(out) == []


def test_overwrite_refuses_our_output_once_a_user_added_a_file(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    _publish(out, {"model.onnx": b"m"})
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files pqcad-deploy did not write \(my_notes.txt\)"):
        check_output_dir(out, overwrite=True, kind="engine")
    (out / "empty_folder").mkdir()
    with pytest.raises(OutputError, match=r"empty_folder/, my_notes.txt"):
        _publish(out, {"x": b"x"}, overwrite=True)
    assert (out / "my_notes.txt").exists()


def test_files_added_during_a_run_are_not_deleted(tmp_path: Path) -> None:
    """The ownership check runs again right before the old output is moved aside."""
    out = tmp_path / "eng"
    _publish(out, {"model.onnx": b"m"})
    with pytest.raises(OutputError, match="did not write"):
        with staged_directory(out, overwrite=True, kind="engine") as tmp:
            (tmp / "model.onnx").write_bytes(b"new")
            (out / "added_meanwhile.txt").write_text("mine")
    assert (out / "added_meanwhile.txt").exists() and (out / "model.onnx").read_bytes() == b"m"
    assert _siblings(out) == []


def test_overwrite_refuses_another_kind_of_output(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _publish(out, {"artifact.json": b"{}"}, kind="artifact")
    with pytest.raises(OutputError, match="is a pqcad-deploy artifact directory, not a samples one"):
        _publish(out, {"00000.png": b"p"}, overwrite=True, kind="samples")


def test_without_overwrite_an_existing_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    _publish(out, {"model.onnx": b"m"})
    with pytest.raises(OutputError, match="already exists and is not empty; pass --overwrite"):
        _publish(out, {"x": b"x"})


def test_an_existing_empty_directory_is_used(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    out.mkdir()
    _publish(out, {"model.onnx": b"m"})
    assert (out / "model.onnx").exists()


@pytest.mark.parametrize("make_path", [lambda d: Path(""), lambda d: Path("."), lambda d: d, lambda d: d.parent,
                                       lambda d: Path("..")])
def test_empty_current_and_parent_directories_are_refused(make_path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="current directory"):
        check_output_dir(make_path(tmp_path), overwrite=True, kind="samples")
    assert (tmp_path / "keep.txt").exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "eng"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pqcad_deploy.engines._atomic import output_lock\n"
                         f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=r"another pqcad-deploy run is writing .*eng"):
            _publish(out, {"x": b"x"})
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    _publish(out, {"x": b"x"})  # the kernel released the dead holder's lock
    assert (out / "x").exists()


def test_the_lock_is_reentrant_in_one_process_and_removed_afterwards(tmp_path: Path) -> None:
    out = tmp_path / "art"
    with output_lock(out):
        _publish(out, {"artifact.json": b"{}"}, kind="artifact")  # staged_directory re-takes it
        lock = tmp_path / ".art.lock"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not (tmp_path / ".art.lock").exists()


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_users_umask(mask: int, tmp_path: Path) -> None:
    with _umask(mask):
        _publish(tmp_path / "eng", {"model.onnx": b"m", "sub/x.json": b"{}"})
        with atomic_file(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"m")
    assert (tmp_path / "eng").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "eng" / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    for f in ("eng/model.onnx", "eng/sub/x.json", f"eng/{MARKER_FILE}", "model.onnx"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_output_files_are_replaced_only_when_recognised(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "thesis.onnx"
    ours.write_bytes(b"OURS")
    theirs.write_bytes(b"years of work")

    def is_ours(p: Path) -> bool:
        return p.read_bytes() == b"OURS"

    check_output_file(ours, overwrite=True, is_ours=is_ours, what="pqcad-deploy ONNX")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        check_output_file(ours, overwrite=False, is_ours=is_ours, what="pqcad-deploy ONNX")
    with pytest.raises(OutputError, match="was not written by pqcad-deploy .it is not a pqcad-deploy ONNX."):
        check_output_file(theirs, overwrite=True, is_ours=is_ours, what="pqcad-deploy ONNX")
    with pytest.raises(OutputError, match="is a directory; give a file path"):
        check_output_file(tmp_path, overwrite=True, is_ours=is_ours, what="pqcad-deploy ONNX")


def test_a_full_disk_is_reported_and_leaves_nothing(full_disk: Path) -> None:
    out = full_disk / "eng"
    with pytest.raises(OutputError, match=r"no space left on the device while writing .*eng"):
        _publish(out, {"model.onnx": b"x" * (1 << 20)})
    assert sorted(os.listdir(full_disk)) == []
    with pytest.raises(OutputError, match=r"no space left on the device while writing .*big.npz"):
        with atomic_file(full_disk / "big.npz") as tmp:
            tmp.write_bytes(b"x" * (1 << 20))
    assert sorted(os.listdir(full_disk)) == []
