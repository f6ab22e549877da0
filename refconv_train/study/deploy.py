"""Reporting a run as a user deploys it: refconv-eval of its deployed file on the report split, once per run
(``<run>/deployed_<split>.json``; a study that resumes keeps it). The deployed file is the trainer's fused.pth for a
run with a method, the plain model's last.pth otherwise (``Method.deploys_fused``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from .. import methods
from .plan import Run
from .runner import child_env


def eval_executable() -> list[str]:
    exe = Path(sys.executable).parent / "refconv-eval"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "refconv_train.cli.eval"]


def deployed_file(run: Run) -> Path:
    method = methods.get(str(run.resolved().get("method", "refconv")))
    return run.folder / ("fused.pth" if method.deploys_fused else "last.pth")


def eval_json(run: Run, split: str) -> Path:
    return run.folder / f"deployed_{split}.json"


def eval_command(run: Run, split: str) -> list[str]:
    cfg = run.resolved()
    return [*eval_executable(), "--data", str(cfg["data.root"]), "--checkpoint", str(deployed_file(run)),
            "--split", split, "--workers", str(cfg["data.workers"]), "--json", str(eval_json(run, split))]


def evaluate_deployed(run: Run, split: str) -> str | None:
    """Evaluate a finished run's deployed file unless done before; returns None, or why it failed (one line)."""
    out = eval_json(run, split)
    if out.is_file():
        return None
    if not deployed_file(run).is_file():
        return f"{deployed_file(run)} is missing (a run with a method writes fused.pth when it ends)"
    cmd = eval_command(run, split)
    print(f"   {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    if proc.returncode:
        out.unlink(missing_ok=True)
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        return f"refconv-eval failed ({tail[0][:200]}): {shlex.join(cmd)}"
    return None


def deployed_top1(run: Run, split: str) -> float | None:
    try:
        return float(json.loads(eval_json(run, split).read_text())["top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
