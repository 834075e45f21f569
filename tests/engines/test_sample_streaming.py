"""`sample` streams: chunked noise, images written batch by batch, resume, grid cap, bounded memory."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqcad_deploy.engines._atomic import MARKER_FILE
from pqcad_deploy.engines.build import build_onnxruntime_engine
from pqcad_deploy.engines.errors import OutputError
from pqcad_deploy.engines.generate import GRID_FILE, SAMPLES_FILE, generate_to_directory, partial_dir
from pqcad_deploy.engines.manifest import verify_engine
from pqcad_deploy.engines.ort import OnnxRuntimeRunner
from pqcad_deploy.engines.sampler import NoiseStream, initial_noise, sample_images


@pytest.fixture
def engine(make_tiny_onnx, tmp_path: Path) -> Path:
    out = tmp_path / "engine"
    build_onnxruntime_engine(make_tiny_onnx(), out)
    return out


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 32, 32), (3, 7, 5)])
@pytest.mark.parametrize("chunks", [[7] * 5 + [2], [1] * 9, [16, 16, 1], [3, 3, 4]])
def test_chunked_noise_equals_the_all_at_once_draw(shape, chunks) -> None:
    """docs/CONTRACTS.md 4: the chunk draws of one generator are the all-at-once float32 draw, split."""
    n = sum(chunks)
    whole = initial_noise(n, shape, 11)
    stream = NoiseStream(shape, 11)
    np.testing.assert_array_equal(np.concatenate([stream.draw(k) for k in chunks]), whole)
    skipped = NoiseStream(shape, 11)
    skipped.skip(chunks[0])
    np.testing.assert_array_equal(skipped.draw(n - chunks[0]), whole[chunks[0]:])


def test_interrupted_run_keeps_images_and_resume_is_byte_identical(engine: Path, tmp_path: Path) -> None:
    full = generate_to_directory(engine, tmp_path / "full", 11, seed=3, batch_size=4, progress=False,
                                 npz=tmp_path / "full.npz")
    assert full.n == 11 and full.reused == 0
    out = tmp_path / "imgs"
    seen = []

    def stop_after_two(batch) -> None:
        seen.append(sorted(p.name for p in partial_dir(out).glob("*.png")))  # written before the run ends
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match=re.escape(f"8 of 11 images are kept in {partial_dir(out)}")) as info:
        generate_to_directory(engine, out, 11, seed=3, batch_size=4, progress=False, on_batch=stop_after_two)
    assert "--resume" in str(info.value)
    assert seen[0] == [f"{i:05d}.png" for i in range(4)]
    assert not out.exists()
    assert sorted(_pngs(partial_dir(out))) == [f"{i:05d}.png" for i in range(8)]
    assert json.loads((partial_dir(out) / SAMPLES_FILE).read_text())["seed"] == 3

    # without --resume the partial folder is refused; with it (another batch size) the run finishes
    with pytest.raises(OutputError, match="pass --resume to continue it or --overwrite to discard it"):
        generate_to_directory(engine, out, 11, seed=3, batch_size=4, progress=False)
    done = generate_to_directory(engine, out, 11, seed=3, batch_size=3, progress=False, resume=True,
                                 npz=tmp_path / "imgs.npz")
    assert done.reused == 8 and not partial_dir(out).exists()
    assert _pngs(out) == _pngs(tmp_path / "full")
    np.testing.assert_array_equal(np.load(tmp_path / "imgs.npz")["images"], np.load(tmp_path / "full.npz")["images"])
    assert (out / GRID_FILE).read_bytes() == (tmp_path / "full" / GRID_FILE).read_bytes()
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "samples"


def test_resume_refuses_other_seed_and_overwrite_discards(engine: Path, tmp_path: Path) -> None:
    out = tmp_path / "imgs"

    def stop(batch) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_to_directory(engine, out, 6, seed=1, batch_size=2, progress=False, on_batch=stop)
    with pytest.raises(OutputError, match=r"cannot --resume .*its seed is 1, this run's is 2"):
        generate_to_directory(engine, out, 6, seed=2, batch_size=2, progress=False, resume=True)
    with pytest.raises(OutputError, match="its timesteps is"):
        generate_to_directory(engine, out, 6, seed=1, steps=3, batch_size=2, progress=False, resume=True)
    assert sorted(_pngs(partial_dir(out))) == ["00000.png", "00001.png"]  # untouched by the refusals
    done = generate_to_directory(engine, out, 6, seed=2, batch_size=2, progress=False, overwrite=True)
    assert done.reused == 0 and not partial_dir(out).exists()
    ref = generate_to_directory(engine, tmp_path / "ref", 6, seed=2, batch_size=6, progress=False)
    assert _pngs(out) == _pngs(ref.out_dir)


def test_partial_folder_not_ours_is_refused(engine: Path, tmp_path: Path) -> None:
    partial_dir(tmp_path / "imgs").mkdir()
    (partial_dir(tmp_path / "imgs") / "notes.txt").write_text("mine")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputError, match="not written by pqcad-deploy sample"):
            generate_to_directory(engine, tmp_path / "imgs", 2, progress=False, **kw)
    assert (partial_dir(tmp_path / "imgs") / "notes.txt").read_text() == "mine"


def test_grid_is_capped_and_optional(engine: Path, tmp_path: Path) -> None:
    generate_to_directory(engine, tmp_path / "a", 70, batch_size=64, progress=False)
    grid = np.asarray(Image.open(tmp_path / "a" / GRID_FILE))
    assert grid.shape == (8 * 8, 8 * 8, 3)  # 64 tiles of 8 x 8, not 70
    first = np.asarray(Image.open(tmp_path / "a" / "00000.png"))
    np.testing.assert_array_equal(grid[:8, :8], first)
    generate_to_directory(engine, tmp_path / "b", 3, progress=False, grid=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [MARKER_FILE, "00000.png", "00001.png",
                                                                  "00002.png", SAMPLES_FILE]


def test_outputs_checked_before_sampling(engine: Path, tmp_path: Path, monkeypatch) -> None:
    import pqcad_deploy.engines.generate as generate

    monkeypatch.setattr(generate, "iter_sample_batches", lambda *a, **k: pytest.fail("sampled"))
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        generate_to_directory(engine, tmp_path / "o", 2, npz=tmp_path / "dir.npz", progress=False)
    (tmp_path / "mine.npz").write_bytes(b"not ours")
    with pytest.raises(OutputError, match="not written by pqcad-deploy"):
        generate_to_directory(engine, tmp_path / "o", 2, npz=tmp_path / "mine.npz", overwrite=True, progress=False)
    assert not partial_dir(tmp_path / "o").exists() and not (tmp_path / "o").exists()


def test_batch_size_never_changes_images_and_calls_are_padded(engine: Path) -> None:
    m = verify_engine(engine)
    runner = OnnxRuntimeRunner(engine / m.model_file, m.onnx)
    shapes = []
    real_infer = runner.infer

    def spy(feed):
        shapes.append(feed["sample"].shape[0])
        return real_infer(feed)

    runner.infer = spy
    a = sample_images(runner, m, 11, 5, batch_size=7, progress=False).images
    assert set(shapes) == {8}  # 7 and the last 4 both run as 8
    b = sample_images(runner, m, 11, 5, batch_size=16, progress=False).images
    np.testing.assert_array_equal(a, b)


def _peak(engine: Path, out: Path, n: int) -> int:
    tracemalloc.start()
    try:
        generate_to_directory(engine, out, n, batch_size=50, progress=False, grid=False, npz=out.with_suffix(".npz"))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_n(engine: Path, tmp_path: Path) -> None:
    small = _peak(engine, tmp_path / "s", 50)
    large = _peak(engine, tmp_path / "l", 1000)
    noise_bytes = 1000 * 8 * 8 * 3 * 4  # what holding all the float32 noise alone would take
    assert large < small + noise_bytes / 10, (small, large)
    assert np.load(tmp_path / "l.npz")["images"].shape == (1000, 8, 8, 3)


def test_streaming_a_range_gives_the_same_images_and_refuses_other_index_sets(engine: Path) -> None:
    """iter_sample_batches(range(start, n)) is what a resumed `sample` runs: images start..n-1 of the
    one-call result; a stepped range, a range past n or a list is refused before the runner runs."""
    from pqcad_deploy.engines.errors import ConfigError
    from pqcad_deploy.engines.sampler import iter_sample_batches

    m = verify_engine(engine)
    runner = OnnxRuntimeRunner(engine / m.model_file, m.onnx)
    whole = sample_images(runner, m, 5, 3, batch_size=2, progress=False).images
    batches = list(iter_sample_batches(runner, m, range(2, 5), 3, batch_size=2, progress=False))
    assert [b.start for b in batches] == [2, 4]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), whole[2:])
    for bad in (range(0, 4, 2), range(5, 3), [0, 1, 2]):
        with pytest.raises(ConfigError, match="range|start must be"):
            next(iter_sample_batches(None, m, bad, 3, progress=False))
