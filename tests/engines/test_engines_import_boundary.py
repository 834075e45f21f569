"""`engines` must import without torch, pqcad_deploy, converters, and without its optional backends."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import engines

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, json, pkgutil, sys

BLOCKED = ("torch", "pqcad_deploy", "converters", "tensorrt", "onnxruntime", "cuda")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the import-boundary test: {name}")
        return None

sys.meta_path.insert(0, Block())
import engines
mods = sorted(m.name for m in pkgutil.walk_packages(engines.__path__, "engines."))
for m in mods:
    importlib.import_module(m)
print(json.dumps({"modules": mods, "loaded": sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED)}))
"""


def test_engines_imports_without_torch_or_backends() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = sorted(m.name for m in pkgutil.walk_packages(engines.__path__, "engines."))
    assert result["modules"] == expected
    assert {"engines.manifest", "engines.ddim", "engines.sampler", "engines.ort", "engines.build",
            "engines.tensorrt_build", "engines.tensorrt_runner", "engines.images", "engines.runner"} <= set(expected)
    assert result["loaded"] == []


def test_no_forbidden_import_statements() -> None:
    # belt and braces: a lazy `import torch` inside a function would pass the test above
    for path in Path(engines.__file__).parent.glob("*.py"):
        text = path.read_text()
        for bad in ("import torch", "from torch", "import pqcad_deploy", "from pqcad_deploy", "import converters", "from converters"):
            assert bad not in text, f"{path.name} contains {bad!r}"
