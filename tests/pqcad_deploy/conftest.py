"""Fixtures of the pqcad_deploy tests.

The test machine has 2 cores shared with other jobs: torch's intra-op thread pool then spends most of
its time spin-waiting (a fast-preset compress takes ~1.7 s on one thread and 12-24 s on two under
load), so these tests run torch on one thread and restore the setting afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
