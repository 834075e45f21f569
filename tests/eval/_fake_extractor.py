"""A cheap stand-in for the Inception network, for tests of caching and compatibility logic."""

from __future__ import annotations

import numpy as np


class FakeExtractor:
    """Stands in for InceptionFeatures in cache/compatibility tests: a few pixel moments as features."""

    def __init__(self, sha: str = "w") -> None:
        self.sha, self.calls = sha, 0

    def description(self) -> dict[str, str]:
        return {"preprocessing": "p", "weights_sha256": self.sha}

    def __call__(self, images, batch_size=None, progress=False):
        self.calls += 1
        x = images.reshape(images.shape[0], -1).astype(np.float64) / 255
        return np.stack([x.mean(1), x.std(1), x.max(1)], axis=1)
