"""Which module names are the PyTorch stage: what the torch-free runtime must never import.

Installed, every module lives under the project's namespace: the runtime is `pqcad_deploy.engines`
(the repository's engines/ folder) and `pqcad_deploy.cli` (cli.py); the PyTorch stage is every
other `pqcad_deploy` module (`pqcad_deploy.converters` among them) and torch / diffusers. The
namespace package itself is allowed: its `__init__` imports nothing (test_import_boundaries checks).
One definition for the import-boundary tests and their subprocesses (which put tests/ on sys.path).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

RUNTIME_PACKAGES: tuple[str, ...] = ("pqcad_deploy.engines", "pqcad_deploy.cli")
THIRD_PARTY_STAGE: tuple[str, ...] = ("torch", "diffusers")
OPTIONAL_BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime", "cuda")


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def is_pytorch_stage(name: str) -> bool:
    """True for a module the runtime must not import (see the module docstring)."""
    if name.split(".")[0] in THIRD_PARTY_STAGE:
        return True
    if name == "pqcad_deploy" or not _under(name, "pqcad_deploy"):
        return False
    return not any(_under(name, package) for package in RUNTIME_PACKAGES)


def block_imports(blocked: Callable[[str], bool]) -> None:
    """Make every later import of a module `blocked` names fail, as if it were not installed (the
    subprocesses of the boundary tests call this before importing the runtime)."""

    class Block:
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ImportError(f"blocked by the import-boundary test: {name}")
            return None

    sys.meta_path.insert(0, Block())
