"""`engines` must import without torch, pqcad_deploy, converters, and without its optional backends."""

from __future__ import annotations

from pathlib import Path

from pqcad_deploy import engines

# The subprocess check (every engines module and cli imported with torch, pqcad_deploy,
# converters and the optional backends blocked) lives in tests/test_import_boundaries.py.


def test_no_forbidden_import_statements() -> None:
    # belt and braces: a lazy `import torch` inside a function would pass the test above
    for path in Path(engines.__file__).parent.glob("*.py"):
        text = path.read_text()
        for bad in ("import torch", "from torch", "import pqcad_deploy", "from pqcad_deploy", "import converters", "from converters"):
            assert bad not in text, f"{path.name} contains {bad!r}"
