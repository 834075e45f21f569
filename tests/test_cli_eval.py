"""`pqcad-deploy eval fid`: FID of image files and of an engine, and every user error.

FID computations are slow on the 2-core test machine (Inception ~0.2 s/image, scipy's 2048x2048
sqrtm 10-30 s), so the module runs four, on 8 or 4 images: the CLI on an .npz of real
Fashion-MNIST training images, the library on the same images, the CLI on the same images as a PNG
folder, and the CLI on a tiny engine; `sqrtm` is memoised by the exact bytes of its input (see
`memo_sqrtm`), so only two square roots are really taken. The error cases all fail before any
feature is computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from test_cli import FAST, assert_failed, one_torch_thread, run_main

REF_LABEL = "reference: fashion-mnist train 60000 images"
JSON_FIELDS = {"fid", "n", "steps", "seed", "source", "source_kind", "reference_path",
               "reference_description", "seconds"}


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fid_ready() -> None:
    """Skip the FID computations where the Inception weights or the dataset are not installed."""
    from pqcad_deploy.eval.errors import DatasetNotFoundError, WeightsNotFoundError
    from pqcad_deploy.eval.images_io import load_fashion_mnist
    from pqcad_deploy.eval.inception import find_fid_weights

    try:
        find_fid_weights()
        load_fashion_mnist("test")
    except (WeightsNotFoundError, DatasetNotFoundError) as exc:
        pytest.skip(f"FID prerequisites missing: {exc}")


@pytest.fixture(scope="module")
def memo_sqrtm() -> dict:
    """Memoise scipy.linalg.sqrtm by the exact bytes of its argument, for this module's FID tests.

    sqrtm is a pure function, so a cache keyed on the input's dtype, shape and bytes changes no
    result: a hit happens only when two paths built bit-identical covariance products (the .npz,
    the PNG folder and the library on the same images), and anything else is computed as usual.
    It saves ~15 s per repeated FID on the 2-core machine. Returns the hit/miss counters.
    """
    import hashlib

    import scipy.linalg

    real = scipy.linalg.sqrtm
    cache: dict[tuple, object] = {}
    counts = {"hits": 0, "misses": 0}

    def sqrtm(a, *args, **kwargs):
        arr = np.ascontiguousarray(a)
        key = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).hexdigest(), args, tuple(sorted(kwargs.items())))
        if key in cache:
            counts["hits"] += 1
        else:
            counts["misses"] += 1
            cache[key] = real(a, *args, **kwargs)
        return np.copy(cache[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scipy.linalg, "sqrtm", sqrtm)
        yield counts


@pytest.fixture(scope="module")
def real8(tmp_path_factory, fid_ready, memo_sqrtm) -> dict:
    """The first 8 Fashion-MNIST training images as an .npz and as a PNG folder."""
    from PIL import Image

    from pqcad_deploy.eval.images_io import load_fashion_mnist

    root = tmp_path_factory.mktemp("real8")
    images = load_fashion_mnist("train")[:8]
    np.savez(root / "real8.npz", images=images)
    folder = root / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0], mode="L").save(folder / f"{i:05d}.png")
    return {"images": images, "npz": root / "real8.npz", "pngs": folder, "root": root}


@pytest.fixture(scope="module")
def npz_run(real8: dict) -> tuple:
    """`eval fid` on the .npz, once: (outcome, the JSON it wrote)."""
    out = real8["root"] / "npz.json"
    result = run_main("eval", "fid", real8["npz"], "--json", out, "--quiet")
    assert result.code == 0, result.err
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    """A tiny engine of the builtin model: compress (fast, 10 steps) -> export -> build-engine."""
    root = tmp_path_factory.mktemp("engine")
    for args in (["compress", *FAST, "--out", root / "A"],
                 ["export", root / "A", "--onnx", root / "M.onnx", "--no-parity", "--target", "qdq"],
                 ["build-engine", root / "M.onnx", "-o", root / "E"]):
        result = run_main(*args)
        assert result.code == 0, f"{args[0]} failed: {result.err}"
    return root / "E"


# ----------------------------------------------------------------------------------------- FID values

def test_npz_of_real_images_matches_the_library(npz_run: tuple, real8: dict) -> None:
    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.fid_sources import default_reference_path

    result, data = npz_run
    assert JSON_FIELDS <= set(data)
    assert data["n"] == 8 and data["source_kind"] == "npz" and data["source"] == str(real8["npz"])
    assert data["steps"] is None and data["seed"] is None  # images on disk are not sampled
    assert Path(data["reference_path"]) == default_reference_path()
    assert data["reference_description"] == "fashion-mnist train 60000 images"
    assert data["seconds"] > 0
    assert math.isfinite(data["fid"]) and data["fid"] > 0

    ref = FidStatistics.load(default_reference_path())
    with one_torch_thread():  # as the CLI run, so the features are bit-identical
        expected = compute_statistics(real8["images"], progress=False).frechet_distance(ref)
    assert data["fid"] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert result.out == f"FID {expected:.2f} (8 images from {real8['npz']}, {REF_LABEL})\n"
    assert result.err == ""


def test_png_folder_gives_the_same_fid_as_the_npz(npz_run: tuple, real8: dict) -> None:
    out = real8["root"] / "pngs.json"
    result = run_main("eval", "fid", real8["pngs"], "--json", out, "--quiet")
    assert result.code == 0, result.err
    data = json.loads(out.read_text())
    assert data["source_kind"] == "png-folder" and data["n"] == 8
    assert abs(data["fid"] - npz_run[1]["fid"]) < 1e-6
    assert result.out.startswith(f"FID {npz_run[1]['fid']:.2f} (8 images from {real8['pngs']}, ")


def test_sample_output_folder_is_read_as_its_listed_images(npz_run: tuple, real8: dict) -> None:
    """A folder as `sample` publishes it (samples.json, marker, grid.png): exactly its n images are scored."""
    import shutil

    from PIL import Image

    folder = real8["root"] / "sampled"
    shutil.copytree(real8["pngs"], folder)
    Image.fromarray(np.zeros((64, 64), np.uint8), mode="L").save(folder / "grid.png")
    (folder / "samples.json").write_text(json.dumps({"tool": "pqcad-deploy", "format": "pqcad-samples", "n": 8}))
    (folder / ".pqcad-deploy.json").write_text(json.dumps({"tool": "pqcad-deploy", "kind": "samples",
                                                           "files": sorted(p.name for p in folder.iterdir())}))
    result = run_main("eval", "fid", folder, "--quiet")
    assert result.code == 0, result.err
    assert result.out.startswith(f"FID {npz_run[1]['fid']:.2f} (8 images from {folder}, ")


# 4 images give a rank-3 covariance: scipy warns that the product is singular (expected at this N)
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_engine_source_samples_then_scores(engine: Path, fid_ready, memo_sqrtm, tmp_path: Path) -> None:
    from pqcad_deploy.engines.generate import open_runner
    from pqcad_deploy.engines.sampler import sample_images

    out, npz = tmp_path / "e.json", tmp_path / "e.npz"
    result = run_main("eval", "fid", engine, "-n", 4, "--steps", 3, "--json", out, "--save-npz", npz, "--quiet")
    assert result.code == 0, result.err
    data = json.loads(out.read_text())
    assert data["source_kind"] == "engine" and data["n"] == 4 and data["steps"] == 3 and data["seed"] == 0
    assert math.isfinite(data["fid"]) and data["fid"] > 0
    assert data["images_npz"] == str(npz)
    assert result.out == f"FID {data['fid']:.2f} (4 images from {engine}, 3 DDIM steps, {REF_LABEL})\n"
    assert "evaluating" not in result.err  # a short evaluation is not announced
    # the saved images are exactly what the engine samples for that seed and step count
    runner, manifest = open_runner(engine)
    with runner:
        direct = sample_images(runner, manifest, 4, 0, steps=3, progress=False).images
    with np.load(npz) as saved:
        np.testing.assert_array_equal(saved["images"], direct)


# ----------------------------------------------------------------------------------------- errors

def _incompatible_reference(path: Path) -> Path:
    from pqcad_deploy.eval.fid import FidStatistics
    from pqcad_deploy.eval.fid_sources import default_reference_path

    shipped = FidStatistics.load(default_reference_path())
    other = FidStatistics(mu=shipped.mu, sigma=shipped.sigma, count=shipped.count,
                          description={**shipped.description, "preprocessing": "bicubic resize to 299"})
    return other.save(path, compact=True)


def _setup(case: str, tmp: Path) -> tuple[list[object], tuple[str, ...], int]:
    """(arguments after `eval fid`, fragments of the error line, exit code) of one error case."""
    from PIL import Image

    images = np.zeros((4, 32, 32, 1), np.uint8)
    np.savez(tmp / "ok.npz", images=images)
    if case == "missing-source":
        return [tmp / "nowhere"], ("nowhere", "does not exist"), 1
    if case == "directory-of-no-kind":
        (tmp / "misc").mkdir()
        (tmp / "misc" / "notes.txt").write_text("x")
        return [tmp / "misc"], ("misc", "no .png files", "engine.json", "artifact.json"), 1
    if case == "file-not-npz":
        (tmp / "a.txt").write_text("x")
        return [tmp / "a.txt"], ("a.txt", "not an .npz"), 1
    if case == "n-zero":
        return [tmp / "ok.npz", "-n", 0], ("-n", "0"), 2
    if case == "n-negative":
        return [tmp / "ok.npz", "-n", -3], ("-n", "-3"), 2
    if case == "n-too-many":
        return [tmp / "ok.npz", "-n", 5], ("-n 5", "(4)"), 1
    if case == "npz-without-images":
        np.savez(tmp / "x.npz", pictures=images)
        return [tmp / "x.npz"], ("x.npz", "no key 'images'"), 1
    if case == "steps-with-images":
        return [tmp / "ok.npz", "--steps", 3], ("--steps", "generated"), 1
    if case == "fp-with-images":
        return [tmp / "ok.npz", "--fp"], ("--fp", "artifact"), 1
    if case == "reference-not-stats":
        return [tmp / "ok.npz", "--ref", tmp / "ok.npz"], ("ok.npz", "pqcad-fid-stats"), 1
    if case == "reference-missing":
        return [tmp / "ok.npz", "--ref", tmp / "none.npz"], ("none.npz", "does not exist"), 1
    if case == "reference-incompatible":
        ref = _incompatible_reference(tmp / "other.npz")
        return [tmp / "ok.npz", "--ref", ref], ("not comparable", "preprocessing", "bicubic"), 1
    if case == "device":
        return [tmp / "ok.npz", "--device", "tpu"], ("--device", "cpu, cuda", "'tpu'"), 2
    if case == "unfinished-sample-folder":
        folder = tmp / "imgs.partial"  # what `sample -o imgs` writes until every image is there
        folder.mkdir()
        Image.fromarray(images[0, ..., 0], mode="L").save(folder / "00000.png")
        (folder / "samples.json").write_text(json.dumps({"tool": "pqcad-deploy", "format": "pqcad-samples", "n": 4}))
        return [folder], ("imgs.partial", "unfinished", "--resume"), 1
    if case == "json-exists":
        (tmp / "r.json").write_text("{}")
        return [tmp / "ok.npz", "--json", tmp / "r.json"], ("r.json", "--overwrite"), 1
    raise AssertionError(case)


ERROR_CASES = ("missing-source", "directory-of-no-kind", "file-not-npz", "n-zero", "n-negative", "n-too-many",
               "npz-without-images", "steps-with-images", "fp-with-images", "reference-not-stats",
               "reference-missing", "reference-incompatible", "device", "json-exists", "unfinished-sample-folder")


@pytest.mark.parametrize("case", ERROR_CASES)
def test_eval_fid_user_errors(case: str, tmp_path: Path) -> None:
    args, fragments, code = _setup(case, tmp_path)
    result = run_main("eval", "fid", *args, "--quiet")
    assert_failed(result, *fragments, code=code)
    assert result.out == ""
    if case == "json-exists":
        assert (tmp_path / "r.json").read_text() == "{}"


def test_engine_errors_are_one_line(tmp_path: Path) -> None:
    """A directory with a broken engine.json is an engine, and its error is the engine's."""
    (tmp_path / "E").mkdir()
    (tmp_path / "E" / "engine.json").write_text("{")
    result = run_main("eval", "fid", tmp_path / "E", "-n", 2, "--quiet")
    assert_failed(result, "engine.json", code=1)


def test_long_evaluations_are_announced_up_front(capsys) -> None:
    from pqcad_deploy.eval.fid_sources import _announce

    _announce("engine", "E", None, "cpu")
    err = capsys.readouterr().err
    assert err.startswith("evaluating 10000 images generated from E") and "about 28 min" in err and "-n" in err
    _announce("npz", "x.npz", None, "cpu")
    assert capsys.readouterr().err == ""
