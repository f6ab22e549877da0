"""Running a study's refconv-train runs, each in its own process (a crash stays in its run; peak memory is that
process's), restartable: a finished run (DONE, same config) is skipped, an unfinished one is run again and
refconv-train resumes it from its last.pth; a folder holding other settings is an error."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import config_to_dict, load_config
from ..errors import RefconvError
from .plan import Run, settings

# Idle OpenMP threads sleep instead of spinning (10-50x slower steps on 2 shared cores, measured); glibc keeps big
# activation buffers mapped between steps (faster on CPU, docs/performance.md).
CHILD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "1000000000",
             "MALLOC_TRIM_THRESHOLD_": "1000000000"}
DONE = "DONE"


@dataclass(frozen=True)
class Outcome:
    run: Run
    status: str  # skipped | done | failed
    detail: str = ""


def _differences(there: dict, now: dict, limit: int = 2) -> str:
    keys = [k for k in sorted(set(there) | set(now)) if there.get(k) != now.get(k)]
    text = ", ".join(f"{k}: {there.get(k)!r} there, {now.get(k)!r} now" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def folder_state(run: Run) -> str:
    """``new``, ``done`` or ``unfinished``; a folder whose config.yaml differs from this run's config is an error."""
    stored = run.folder / "config.yaml"
    if not stored.is_file():
        return "new"
    try:
        there = settings(config_to_dict(load_config(stored)))
    except RefconvError as e:
        raise RefconvError(f"{run.folder} holds a run this version cannot read ({e}): delete the folder to start "
                           f"over, or give the study another output") from None
    now = run.resolved()
    if there != now:
        raise RefconvError(f"{run.folder} holds a run with other settings ({_differences(there, now)}): delete the "
                           f"folder to start over, or give the study another output (--out)")
    return "done" if (run.folder / DONE).is_file() else "unfinished"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key, value in CHILD_ENV.items():
        env.setdefault(key, value)
    return env


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


def execute(run: Run) -> tuple[int, float, float]:
    """Run ``run`` as a child process (output appended to its train.log); returns exit status, seconds and the
    child's peak resident memory in MB (``ru_maxrss`` from ``os.wait4``)."""
    run.folder.mkdir(parents=True, exist_ok=True)
    cmd = run.command()
    (run.folder / "command.txt").write_text(shlex.join(cmd) + "\n")
    start = time.time()
    with open(run.folder / "train.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:  # the child got the SIGINT too: it writes last.pth and exits; wait for that
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, time.time() - start, usage.ru_maxrss / scale


def run_one(run: Run, index: str = "") -> Outcome:
    state = folder_state(run)
    if state == "done":
        print(f"== {index}{run.folder}: finished earlier, skipped", flush=True)
        return Outcome(run, "skipped")
    print(f"== {index}{run.folder}" + (" (resuming)" if state == "unfinished" else ""), flush=True)
    rc, seconds, peak_mb = execute(run)
    if rc != 0:
        log = run.folder / "train.log"
        detail = f"status {rc}: {_last_line(log)} (log: {log})"
        print(f"   failed, {detail}", flush=True)
        return Outcome(run, "failed", detail)
    record = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb, 1)}
    (run.folder / DONE).write_text(json.dumps(record) + "\n")
    print(f"   done in {seconds:.0f} s, peak memory {peak_mb:.0f} MB", flush=True)
    return Outcome(run, "done")


def run_all(runs: list[Run], label: str) -> list[Outcome]:
    """Every run in order (the folder checks of all of them first); a failed run does not stop the others."""
    for r in runs:
        folder_state(r)
    return [run_one(r, f"{label} {i}/{len(runs)} ") for i, r in enumerate(runs, 1)]


def partial_note(runs: list[Run]) -> str:
    """The settings line of a ``--results-only`` report: how many of its runs had finished."""
    done = sum((r.folder / DONE).is_file() for r in runs)
    return f"PARTIAL (--results-only): {done} of {len(runs)} runs finished when this was written"


def raise_on_failures(outcomes: list[Outcome], label: str) -> None:
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise RefconvError(f"{len(failed)} of {len(outcomes)} {label} runs failed; first: {failed[0].run.folder}, "
                           f"{failed[0].detail}; fix it and run the study again (finished runs are kept)")
