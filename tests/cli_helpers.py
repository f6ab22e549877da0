"""Calling the command-line entry points in-process, and what every error must look like."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


def call(main, argv: list) -> tuple[int, str, str]:
    """Run a CLI entry point in-process; return its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, pattern: str = "") -> str:
    """Non-zero exit, no traceback, and stderr ends with the one ``error: ...`` line (log lines of a run that got
    going may precede it); returns that line. ``pattern``: a regular expression it must contain."""
    assert rc != 0
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-2000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    return lines[-1]


def train_args(data: Path, output: Path, num_classes: int, *extra: str) -> list[str]:
    """Overrides for a seconds-long CPU run of refconv-train (mobilenetv2_050 at 32 px, from scratch); ``extra``
    overrides come last and win. A RefConv run from scratch is the paper's random-base ablation
    (``refconv.base_init=random``: without it the config refuses to refocus untrained kernels) unless ``extra``
    sets ``model.pretrained``."""
    base = [] if any(e.startswith("model.pretrained=") for e in extra) else ["refconv.base_init=random"]
    return ["model.name=mobilenetv2_050", f"model.num_classes={num_classes}", "model.pretrained=false", *base,
            f"data.root={data}", "data.img_size=32", "data.batch_size=8", "data.workers=0", "train.device=cpu",
            f"train.output={output}", *extra]
