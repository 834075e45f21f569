"""The top-level import boundary: the runtime (`engines/` and `cli`) never needs the PyTorch stage.

A Jetson or CPU box installs numpy + onnxruntime only, so importing `cli` and every `engines`
module, and asking any command for `--help`, must work with torch, `pqcad_deploy` and `converters`
unimportable. tests/engines/test_engines_import_boundary.py covers `engines` alone (with the optional
backends blocked too) and a textual scan; this file adds `cli`, the `--help` of every command, and
an AST scan that also sees imports inside functions and `importlib.import_module("...")` calls.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import engines

ROOT = Path(__file__).resolve().parents[1]
ENGINES_DIR = Path(engines.__file__).resolve().parent
CLI_FILE = ROOT / "cli.py"
FORBIDDEN = ("torch", "pqcad_deploy", "converters")

SCRIPT = r"""
import importlib, io, json, pkgutil, sys, contextlib

BLOCKED = ("torch", "pqcad_deploy", "converters", "tensorrt", "onnxruntime", "cuda")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked by the import-boundary test: {name}")
        return None

sys.meta_path.insert(0, Block())
import engines
modules = sorted(m.name for m in pkgutil.walk_packages(engines.__path__, "engines."))
for name in modules:
    importlib.import_module(name)
import cli

helps = {}
for command in [None, *sorted(cli.cli.commands)]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(["--help"] if command is None else [command, "--help"])
        except SystemExit as exc:
            code = exc.code
    helps[command or ""] = {"code": code, "text": out.getvalue()}

print(json.dumps({
    "modules": modules,
    "commands": sorted(cli.cli.commands),
    "helps": helps,
    "loaded": sorted(k for k in sys.modules if k.split(".")[0] in BLOCKED),
}))
"""


@pytest.fixture(scope="module")
def blocked_run() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_engines_module_and_cli_import_without_the_pytorch_stage(blocked_run: dict) -> None:
    expected = sorted(m.name for m in pkgutil.walk_packages(engines.__path__, "engines."))
    assert blocked_run["modules"] == expected
    # discovery really found the package (guards against an empty walk passing vacuously)
    assert {"engines.manifest", "engines.build", "engines.generate", "engines.sampler"} <= set(expected)
    assert blocked_run["loaded"] == []


def test_help_of_every_command_works_without_the_pytorch_stage(blocked_run: dict) -> None:
    assert blocked_run["commands"] == sorted(["compress", "export", "build-engine", "sample", "eval", "analyze"])
    for command, help_ in blocked_run["helps"].items():
        assert help_["code"] == 0, command
        assert f"Usage: pqcad-deploy {command}".rstrip() in help_["text"], help_["text"]


# ------------------------------------------------------------------------------------- static checks

def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in the tree, including lazy ones.

    Relative imports (`from .x import y`) stay inside their package and are skipped; calls such as
    `importlib.import_module("torch")`, `__import__("torch")` or `lazy_import("torch", ...)` with a
    literal name count as imports.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "lazy_import", "find_spec"):
                found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(found: list[tuple[int, str]]) -> list[str]:
    return [f"line {line}: {name}" for line, name in found if name.split(".")[0] in FORBIDDEN]


def test_imported_names_sees_lazy_and_dynamic_imports() -> None:
    source = (
        "import os\n"
        "from .manifest import x\n"
        "def f():\n"
        "    import torch.nn as nn\n"
        "    from pqcad_deploy.errors import PqcadError\n"
        "    importlib.import_module('converters.qdq')\n"
        "    return __import__('numpy')\n"
    )
    assert _forbidden(_imported_names(ast.parse(source))) == [
        "line 4: torch.nn", "line 5: pqcad_deploy.errors", "line 6: converters.qdq"]


def test_no_engines_file_imports_the_pytorch_stage() -> None:
    files = sorted(ENGINES_DIR.rglob("*.py"))
    assert ENGINES_DIR / "generate.py" in files
    offences = {str(p.relative_to(ROOT)): bad for p in files
                if (bad := _forbidden(_imported_names(ast.parse(p.read_text(), filename=str(p)))))}
    assert offences == {}


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return node


def test_cli_keeps_the_pytorch_stage_inside_its_commands() -> None:
    tree = ast.parse(CLI_FILE.read_text(), filename=str(CLI_FILE))
    # module level: nothing heavy, so `pqcad-deploy --help` and the runtime commands stay light
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert _forbidden(_imported_names(ast.Module(body=top_level, type_ignores=[]))) == []
    # the runtime commands import engines only
    for name in ("sample", "build_engine"):
        assert _forbidden(_imported_names(_function(tree, name))) == [], name
    # the PyTorch commands do reach the PyTorch stage (so the scan above is not vacuous)
    assert _forbidden(_imported_names(_function(tree, "compress")))
    assert _forbidden(_imported_names(_function(tree, "export")))
