"""The lazy-import helper turns a missing optional package into one actionable sentence."""

from __future__ import annotations

import pytest

from pqcad_deploy.engines._lazy import lazy_import
from pqcad_deploy.engines.errors import BackendUnavailableError, EngineError


def test_missing_package_message() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        lazy_import("pqcad_surely_missing_pkg", "install it with `pip install pqcad-surely-missing`", label="Missing")
    assert str(info.value) == (
        "Missing is not installed on this machine: No module named 'pqcad_surely_missing_pkg'; "
        "install it with `pip install pqcad-surely-missing`."
    )
    assert isinstance(info.value, EngineError)
    assert isinstance(info.value.__cause__, ImportError)


def test_present_package_is_returned() -> None:
    mod = lazy_import("json", "unused")
    assert mod.dumps([1]) == "[1]"
