"""Reference statistics: caching, cache validation and the script entry, with a fake network."""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _fake_extractor import FakeExtractor  # noqa: E402

import gzip

import numpy as np
import pytest

from pqcad_deploy.eval.errors import StatisticsError
from pqcad_deploy.eval.fid import FidStatistics
from pqcad_deploy.eval.images_io import FASHION_MNIST_FILES
from pqcad_deploy.eval.reference_stats import main, reference_statistics




@pytest.fixture()
def data_dir(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    header = np.array([0x803, *raw.shape], ">u4").tobytes()
    with gzip.open(tmp_path / FASHION_MNIST_FILES["train"], "wb") as fh:
        fh.write(header + raw.tobytes())
    return tmp_path


def test_compute_then_cache(data_dir, tmp_path):
    cache = tmp_path / "out" / "ref.npz"
    ext = FakeExtractor()
    stats = reference_statistics(cache, data_dir=data_dir, extractor=ext, progress=False)
    assert cache.is_file() and stats.count == 12 and ext.calls == 1
    d = stats.description
    assert d["split"] == "train" and len(d["data_sha256"]) == 64 and d["weights_sha256"] == "w"
    assert "zero-padded" in d["source"] and d["preprocessing"] == "p"

    again = reference_statistics(cache, data_dir=data_dir, extractor=ext, progress=False)
    assert ext.calls == 1  # served from the cache
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    assert FidStatistics.load(cache).description == d


def test_stale_cache_is_refused_then_recomputed(data_dir, tmp_path):
    cache = tmp_path / "ref.npz"
    reference_statistics(cache, data_dir=data_dir, extractor=FakeExtractor(), progress=False)
    other = FakeExtractor(sha="new-weights")
    with pytest.raises(StatisticsError, match="weights_sha256.*recompute"):
        reference_statistics(cache, data_dir=data_dir, extractor=other, progress=False)
    with pytest.raises(StatisticsError, match="limit"):
        reference_statistics(cache, data_dir=data_dir, extractor=FakeExtractor(), limit=5, progress=False)
    stats = reference_statistics(cache, data_dir=data_dir, extractor=other, recompute=True, progress=False)
    assert other.calls == 1 and FidStatistics.load(cache).description["weights_sha256"] == "new-weights"
    assert stats.count == 12


def test_main_reports_missing_dataset(tmp_path, capsys, fid_weights):
    code = main(["--out", str(tmp_path / "r.npz"), "--data-dir", str(tmp_path / "none"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "apt-get install" in err
