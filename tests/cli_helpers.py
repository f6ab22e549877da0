"""Calling the command-line entry points in-process, and what every error must look like."""

from __future__ import annotations

import contextlib
import io


def call(main, argv: list) -> tuple[int, str, str]:
    """Run a CLI entry point in-process; return its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str) -> str:
    """Non-zero exit, and stderr is exactly one ``error: ...`` line (no traceback)."""
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
