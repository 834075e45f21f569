"""Reference statistics: caching, cache validation and the script entry, with a fake network."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pqcad_deploy.eval.errors import StatisticsError
from pqcad_deploy.eval.fid import FidStatistics
from pqcad_deploy.eval.images_io import FASHION_MNIST_FILES
from pqcad_deploy.eval.reference_stats import main, reference_statistics


class _FakeExtractor:
    def __init__(self, sha: str = "w") -> None:
        self.sha, self.calls = sha, 0

    def description(self) -> dict[str, str]:
        return {"preprocessing": "p", "weights_sha256": self.sha}

    def __call__(self, images, batch_size=None, progress=False):
        self.calls += 1
        x = images.reshape(images.shape[0], -1).astype(np.float64) / 255
        return np.stack([x.mean(1), x.std(1), x.max(1)], axis=1)


@pytest.fixture()
def data_dir(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    header = np.array([0x803, *raw.shape], ">u4").tobytes()
    with gzip.open(tmp_path / FASHION_MNIST_FILES["train"], "wb") as fh:
        fh.write(header + raw.tobytes())
    return tmp_path


def test_compute_then_cache(data_dir, tmp_path):
    cache = tmp_path / "out" / "ref.npz"
    ext = _FakeExtractor()
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
    reference_statistics(cache, data_dir=data_dir, extractor=_FakeExtractor(), progress=False)
    other = _FakeExtractor(sha="new-weights")
    with pytest.raises(StatisticsError, match="weights_sha256.*recompute"):
        reference_statistics(cache, data_dir=data_dir, extractor=other, progress=False)
    with pytest.raises(StatisticsError, match="limit"):
        reference_statistics(cache, data_dir=data_dir, extractor=_FakeExtractor(), limit=5, progress=False)
    stats = reference_statistics(cache, data_dir=data_dir, extractor=other, recompute=True, progress=False)
    assert other.calls == 1 and FidStatistics.load(cache).description["weights_sha256"] == "new-weights"
    assert stats.count == 12


def test_main_reports_missing_dataset(tmp_path, capsys, fid_weights):
    code = main(["--out", str(tmp_path / "r.npz"), "--data-dir", str(tmp_path / "none"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "apt-get install" in err
