"""Running the CLI in-process for tests: `cli.main` as the console script runs it, its exit code and output.

One place for what test_cli, the checker's CLI tests and the resume tests each need (the PyTorch-stage
tests wrap it in one torch thread themselves).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def run_cli(*args: object) -> Outcome:
    """`pqcad_deploy.cli.main` with `args` (as strings); SystemExit becomes the exit code."""
    from pqcad_deploy import cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())
