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

from pqcad_deploy import engines

from _boundaries import OPTIONAL_BACKENDS, is_pytorch_stage

ROOT = Path(__file__).resolve().parents[1]
ENGINES_DIR = Path(engines.__file__).resolve().parent
CLI_FILE = ROOT / "cli.py"
ENGINES_PREFIX = "pqcad_deploy.engines."

SCRIPT = r"""
import importlib, io, json, pkgutil, sys, contextlib

sys.path.insert(0, "tests")
from _boundaries import OPTIONAL_BACKENDS, block_imports, is_pytorch_stage

def blocked(name):
    return is_pytorch_stage(name) or name.split(".")[0] in OPTIONAL_BACKENDS

block_imports(blocked)
from pqcad_deploy import engines
modules = sorted(m.name for m in pkgutil.walk_packages(engines.__path__, "pqcad_deploy.engines."))
for name in modules:
    importlib.import_module(name)
from pqcad_deploy import cli

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
    "loaded": sorted(k for k in sys.modules if blocked(k)),
}))
"""


@pytest.fixture(scope="module")
def blocked_run() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_engines_module_and_cli_import_without_the_pytorch_stage(blocked_run: dict) -> None:
    expected = sorted(m.name for m in pkgutil.walk_packages(engines.__path__, ENGINES_PREFIX))
    assert blocked_run["modules"] == expected
    # discovery really found the package (guards against an empty walk passing vacuously)
    assert {ENGINES_PREFIX + m for m in ("manifest", "build", "generate", "sampler")} <= set(expected)
    assert blocked_run["loaded"] == []


def test_help_of_every_command_works_without_the_pytorch_stage(blocked_run: dict) -> None:
    assert blocked_run["commands"] == sorted(["compress", "export", "build-engine", "check", "sample", "eval", "analyze"])
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
    return [f"line {line}: {name}" for line, name in found if is_pytorch_stage(name)]


def test_imported_names_sees_lazy_and_dynamic_imports() -> None:
    source = (
        "import os\n"
        "from .manifest import x\n"
        "def f():\n"
        "    import torch.nn as nn\n"
        "    from pqcad_deploy.errors import PqcadError\n"
        "    importlib.import_module('pqcad_deploy.converters.qdq')\n"
        "    from pqcad_deploy.engines.manifest import OnnxManifest\n"
        "    return __import__('numpy')\n"
    )
    assert _forbidden(_imported_names(ast.parse(source))) == [
        "line 4: torch.nn", "line 5: pqcad_deploy.errors", "line 6: pqcad_deploy.converters.qdq"]


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


# ------------------------------------------------------------------------------------- the namespace

TOP_LEVEL_NAMES = ("engines", "converters", "cli")  # the repository's folders / file, never import names


def test_the_namespace_package_imports_nothing() -> None:
    """Importing `pqcad_deploy.engines` runs `pqcad_deploy/__init__.py` first: it must stay empty of imports."""
    init = ROOT / "pqcad_deploy" / "__init__.py"
    assert _imported_names(ast.parse(init.read_text())) == []


def test_the_runtime_folders_are_installed_inside_the_namespace() -> None:
    """engines/, converters/ and cli.py install as pqcad_deploy.engines / .converters / .cli (links in the
    package folder, which setuptools follows), so no top-level `engines` or `cli` lands in site-packages."""
    package = ROOT / "pqcad_deploy"
    for name, target in (("engines", "../engines"), ("converters", "../converters"), ("cli.py", "../cli.py")):
        assert (package / name).is_symlink() and str((package / name).readlink()) == target, name
    assert Path(engines.__file__).resolve() == ROOT / "engines" / "__init__.py"
    import pqcad_deploy.cli as cli_module

    assert Path(cli_module.__file__).resolve() == CLI_FILE


def test_nothing_imports_the_top_level_names() -> None:
    """Every import goes through the namespace: a top-level `engines` beside `pqcad_deploy.engines` would
    load the same files twice as two modules (two registries, two error classes)."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / f for f in tracked.stdout.split() if not (ROOT / f).is_symlink()]
    assert ROOT / "cli.py" in files and ROOT / "engines" / "generate.py" in files
    offences = {}
    for path in files:
        names = _imported_names(ast.parse(path.read_text(), filename=str(path)))
        bad = [f"line {line}: {name}" for line, name in names if name.split(".")[0] in TOP_LEVEL_NAMES]
        if bad:
            offences[str(path.relative_to(ROOT))] = bad
    assert offences == {}
