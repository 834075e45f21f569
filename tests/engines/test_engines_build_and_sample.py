"""End to end on a tiny ONNX: build an ONNX Runtime engine, run it, sample from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from pqcad_deploy.engines._atomic import MARKER_FILE
from pqcad_deploy.engines.build import build_onnxruntime_engine
from pqcad_deploy.engines.ddim import DDIMSampler, ddim_timesteps
from pqcad_deploy.engines.errors import BuildError, ConfigError, ManifestError, RunnerError
from pqcad_deploy.engines.manifest import METADATA_KEY, read_onnx_manifest, sha256_file, verify_engine
from pqcad_deploy.engines.ort import OnnxRuntimeRunner
from pqcad_deploy.engines.images import nchw_to_nhwc, to_uint8
from pqcad_deploy.engines.sampler import denoise, initial_noise, sample_images, sampling_timesteps


@pytest.fixture
def engine_dir(make_tiny_onnx, tmp_path: Path) -> Path:
    out = tmp_path / "engine"
    build_onnxruntime_engine(make_tiny_onnx(), out)
    return out


def test_build_writes_checksummed_engine(make_tiny_onnx, tmp_path: Path, make_manifest) -> None:
    src = make_tiny_onnx()
    out = tmp_path / "engine"
    m = build_onnxruntime_engine(src, out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "engine.json", "model.onnx"]
    data = json.loads((out / "engine.json").read_text())
    assert data["backend"] == "onnxruntime" and data["model_file"] == "model.onnx"
    assert data["model_sha256"] == sha256_file(out / "model.onnx") == m.model_sha256
    assert data["source_onnx_sha256"] == sha256_file(src)
    assert data["student_timesteps"] == [900, 600, 300, 0] and "output_name" not in data
    assert m.onnx.output_name == "noise_pred"
    assert verify_engine(out) == m
    assert m.onnx == make_manifest()
    # the optimized model is still a model ONNX Runtime and onnx accept
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    # no temporary directories are left next to the engine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "tiny.onnx"]


def test_optimized_model_keeps_manifest_metadata(engine_dir: Path) -> None:
    # engine.json is authoritative, but the optimized model stays self-describing too
    props = {p.key for p in onnx.load(str(engine_dir / "model.onnx")).metadata_props}
    assert METADATA_KEY in props
    assert read_onnx_manifest(engine_dir / "model.onnx") == verify_engine(engine_dir).onnx


def test_build_refuses_foreign_onnx(foreign_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is not an ONNX written by pqcad-deploy export"):
        build_onnxruntime_engine(foreign_onnx, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_build_refuses_existing_nonempty_dir(make_tiny_onnx, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BuildError, match=re.escape(f"{out} already exists and is not empty; pass --overwrite")):
        build_onnxruntime_engine(make_tiny_onnx(), out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(BuildError, match="not written by pqcad-deploy"):  # --overwrite keeps a user's files
        build_onnxruntime_engine(make_tiny_onnx(), out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    build_onnxruntime_engine(make_tiny_onnx(), out)
    build_onnxruntime_engine(make_tiny_onnx(), out, overwrite=True)  # ours: replaced
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, "engine.json", "model.onnx"]
    # an existing empty directory is fine without overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    build_onnxruntime_engine(make_tiny_onnx(), empty)
    assert (empty / "engine.json").is_file()


def test_build_unwritable_parent(make_tiny_onnx, tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(BuildError, match=re.escape(f"cannot write {blocker / 'sub' / 'engine'}")):
        build_onnxruntime_engine(make_tiny_onnx(), blocker / "sub" / "engine")


def test_build_failure_leaves_nothing(make_tiny_onnx, tmp_path: Path, monkeypatch) -> None:
    import pqcad_deploy.engines.build as build

    def boom(*args, **kwargs):
        raise BuildError("simulated failure after the model was written")

    monkeypatch.setattr(build, "_smoke_test", boom)
    with pytest.raises(BuildError, match="simulated failure"):
        build_onnxruntime_engine(make_tiny_onnx(), tmp_path / "engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_build_bad_level(make_tiny_onnx, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="optimization_level='max' is not one of disabled, basic, extended, all"):
        build_onnxruntime_engine(make_tiny_onnx(), tmp_path / "e", optimization_level="max")


def test_runner_matches_reference_and_checks_inputs(engine_dir: Path, tiny_reference) -> None:
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx, intra_op_threads=1)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)
    t = np.array([900, 10], np.float32)
    with pytest.raises(RunnerError, match="is not active; use it as a context manager"):
        runner.infer({"sample": x, "timestep": t})
    with runner:
        assert runner.is_active
        out = runner.infer({"sample": x, "timestep": t})
        assert list(out) == ["noise_pred"]
        np.testing.assert_allclose(out["noise_pred"], tiny_reference(x, t), rtol=1e-6, atol=1e-6)
        assert runner.last_inference_time is not None and runner.last_inference_time > 0
        with pytest.raises(RunnerError, match=r"expects inputs \['sample', 'timestep'\], got \['sample'\]"):
            runner.infer({"sample": x})
        with pytest.raises(RunnerError, match="Input 'sample' must be a float32 numpy array, got float64"):
            runner.infer({"sample": x.astype(np.float64), "timestep": t})
        with pytest.raises(RunnerError, match=re.escape("Input 'sample' must have shape [batch, 3, 8, 8], got [2, 3, 4, 4]")):
            runner.infer({"sample": x[:, :, :4, :4].copy(), "timestep": t})
        with pytest.raises(RunnerError, match=re.escape("Input 'timestep' must have shape [2] (one per sample), got [1]")):
            runner.infer({"sample": x, "timestep": t[:1].copy()})
        with pytest.raises(RunnerError, match="already active"):
            runner.activate()
    assert not runner.is_active


def _expected_images(manifest, n: int, seed: int, tiny_reference) -> np.ndarray:
    """The sampling contract written out by hand with the reference model."""
    sampler = DDIMSampler({**manifest.scheduler_config})
    ts = list(manifest.student_timesteps)
    x = np.random.default_rng(seed).standard_normal((n, *manifest.image_shape), dtype=np.float32)
    for t, prev in zip(ts, [*ts[1:], -1]):
        x = sampler.step(tiny_reference(x, np.full((n,), t, np.float32)), t, prev, x)
    return np.transpose(np.round(np.clip(x / 2 + 0.5, 0, 1) * 255).astype(np.uint8), (0, 2, 3, 1))


def test_sample_images_contract(engine_dir: Path, tiny_reference) -> None:
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx)
    res = sample_images(runner, m, n=5, seed=123, batch_size=2, progress=False)
    assert res.images.shape == (5, 8, 8, 3) and res.images.dtype == np.uint8
    assert res.timesteps == (900, 600, 300, 0)
    assert res.seconds > 0 and res.images_per_second == pytest.approx(5 / res.seconds)
    assert 0 < res.model_seconds <= res.seconds
    assert not runner.is_active  # activated and released by sample_images
    expected = _expected_images(m.onnx, 5, 123, tiny_reference)
    assert np.abs(res.images.astype(int) - expected.astype(int)).max() <= 1
    assert res.images.std() > 10  # not a constant image


def test_sample_deterministic_and_batch_independent(engine_dir: Path) -> None:
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx)
    a = sample_images(runner, m, n=6, seed=7, batch_size=6, progress=False).images
    b = sample_images(runner, m, n=6, seed=7, batch_size=4, progress=False).images
    c = sample_images(runner, m, n=6, seed=7, batch_size=1, progress=False).images
    d = sample_images(runner, m, n=6, seed=8, batch_size=6, progress=False).images
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert (a != d).mean() > 0.5
    # the first images do not depend on how many are drawn
    e = sample_images(runner, m, n=2, seed=7, batch_size=2, progress=False).images
    np.testing.assert_array_equal(e, a[:2])


def test_denoise_on_slices_gives_the_images_of_one_sample_call(engine_dir: Path) -> None:
    """benchmarks/onnx_fid.py splits the noise over worker processes: the images must not change."""
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx)
    whole = sample_images(runner, m, n=7, seed=3, batch_size=7, progress=False)
    noise = initial_noise(7, m.onnx.image_shape, 3)
    timesteps = sampling_timesteps(m.onnx)
    parts = [denoise(runner, m.onnx, noise[a:b].copy(), timesteps, batch_size=2, progress=False)
             for a, b in ((0, 3), (3, 4), (4, 7))]
    images = nchw_to_nhwc(to_uint8(np.concatenate([x for x, _ in parts])))
    np.testing.assert_array_equal(images, whole.images)
    assert all(seconds > 0 for _, seconds in parts)


def test_onnx_fid_workers_sample_the_images_of_sample(make_tiny_onnx, tmp_path: Path) -> None:
    """benchmarks/onnx_fid.py (2 worker processes, 5 tasks, --no-fid) writes exactly sample_images' images."""
    from benchmarks.onnx_fid import main

    onnx_path = make_tiny_onnx()
    out = tmp_path / "fid"
    assert main(["--fp32", str(onnx_path), "--model", f"tiny={onnx_path}@own", "--n", "9", "--workers", "2",
                 "--chunk", "2", "--no-fid", "--out", str(out)]) == 0
    m = read_onnx_manifest(onnx_path)
    expected = sample_images(OnnxRuntimeRunner(onnx_path, m), m, 9, 0, progress=False).images
    np.testing.assert_array_equal(np.load(out / "tiny.npz")["images"], expected)
    row = json.loads((out / "results.json").read_text())["rows"]["tiny"]
    assert row["steps"] == len(m.student_timesteps) and row["own_timesteps"] and "fid" not in row
    assert (out / "tiny_grid.png").is_file()


def test_onnx_fid_resumes_from_finished_chunks(make_tiny_onnx, tmp_path: Path) -> None:
    """A row stopped by a time limit keeps its finished chunks: only the others are sampled again."""
    from benchmarks.onnx_fid import sample

    onnx_path = make_tiny_onnx()
    m = read_onnx_manifest(onnx_path)
    expected = sample_images(OnnxRuntimeRunner(onnx_path, m), m, 9, 0, progress=False).images
    partial = tmp_path / "row.partial.npz"
    kept = expected.copy()
    kept[:4] = 255  # chunks 0 and 1 (chunk 2) marked finished with a sentinel: they must not be redone
    done = np.zeros(9, dtype=bool)
    done[:4] = True
    np.savez(partial, images=kept, done=done, chunk=2)
    images, _ = sample(str(onnx_path), str(onnx_path), tuple(m.student_timesteps), 9, 0, 1, "row", chunk=2,
                       partial=partial)
    assert (images[:4] == 255).all()
    np.testing.assert_array_equal(images[4:], expected[4:])
    assert np.load(partial)["done"].all()


def test_sample_with_steps_uses_uniform_grid(engine_dir: Path) -> None:
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx)
    with runner:
        res = sample_images(runner, m, n=1, seed=0, steps=10, progress=False)
        assert runner.is_active  # a runner activated by the caller stays active
    assert res.timesteps == tuple(int(t) for t in ddim_timesteps(m.onnx.scheduler_config, 10))
    assert res.timesteps == (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)


def test_sample_bad_arguments(engine_dir: Path) -> None:
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx)
    with pytest.raises(ConfigError, match="n must be a positive integer, got 0"):
        sample_images(runner, m, n=0, seed=0, progress=False)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got -1"):
        sample_images(runner, m, n=1, seed=0, batch_size=-1, progress=False)
    with pytest.raises(ConfigError, match="steps=5000 must be an integer between 1 and num_train_timesteps=1000"):
        sample_images(runner, m, n=1, seed=0, steps=5000, progress=False)
    assert not runner.is_active


def test_initial_noise_contract() -> None:
    noise = initial_noise(3, (1, 2, 2), seed=5)
    assert noise.dtype == np.float32 and noise.shape == (3, 1, 2, 2)
    np.testing.assert_array_equal(noise, np.random.default_rng(5).standard_normal((3, 1, 2, 2), dtype=np.float32))


def test_sample_progress_bar(engine_dir: Path, capsys) -> None:
    m = verify_engine(engine_dir)
    runner = OnnxRuntimeRunner(engine_dir / m.model_file, m.onnx)
    sample_images(runner, m, n=3, seed=0, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "8/8" in err  # 2 batches x 4 steps
    assert "img_per_s" in err


def test_runner_refuses_model_that_breaks_its_manifest(tmp_path: Path, tiny_model, make_manifest) -> None:
    path = tmp_path / "liar.onnx"
    onnx.save(tiny_model("noise_pred"), str(path))
    runner = OnnxRuntimeRunner(path, make_manifest("v_prediction"))
    with pytest.raises(RunnerError, match=re.escape("has inputs ['sample', 'timestep'] and outputs ['noise_pred'], but its manifest promises ['sample', 'timestep'] -> 'v_pred'")):
        runner.activate()
    assert not runner.is_active
