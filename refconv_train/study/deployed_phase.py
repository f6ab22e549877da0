"""The report phase of an ``evaluate: deployed`` study: every variant x seed trained in order (one-stage runs
first, then the second stages from their own seed's start), each finished run evaluated from its deployed file,
then the cost report. Restartable like the rest: finished runs and evaluations are kept, a run whose start failed
is not tried. ``--results-only`` writes the report of the runs finished so far and trains nothing."""

from __future__ import annotations

from pathlib import Path

from .cost_report import write_cost_report
from .deploy import evaluate_deployed
from .links import start_of
from .plan import Run
from .runner import Outcome, folder_state, partial_note, raise_on_failures, run_one
from .spec import Study


def run_deployed(study: Study, runs: list[Run], settings: list[str], train: bool = True) -> tuple[str, list[Outcome]]:
    """``train=False`` (``--results-only``): the report of the runs finished so far; nothing is trained (finished
    runs are still evaluated from their deployed file, once)."""
    states = {r.folder: folder_state(r) for r in runs}
    outcomes: dict[Path, Outcome] = {}
    for i, r in enumerate(runs, 1):
        if not train:
            if states[r.folder] == "done" and (why := evaluate_deployed(r, study.report_split)):
                print(f"   {r.folder}: {why}", flush=True)
            continue
        start = start_of(r, runs, study)
        if start is not None and outcomes[start.folder].status == "failed":
            print(f"== report {i}/{len(runs)} {r.folder}: not run, its start {start.folder} failed", flush=True)
            outcomes[r.folder] = Outcome(r, "failed", f"its start {start.folder} failed")
            continue
        o = run_one(r, f"report {i}/{len(runs)} ")
        if o.status != "failed" and (why := evaluate_deployed(r, study.report_split)):
            print(f"   failed, {why}", flush=True)
            o = Outcome(r, "failed", why)
        outcomes[r.folder] = o
    if not train:
        settings = [*settings, partial_note(runs)]
    settings = [*settings, f"evaluate: deployed: the runs validate on '{study.select_split}' every epoch; each "
                f"run's top-1 is refconv-eval of its deployed file (fused.pth with a method, else last.pth) on "
                f"'{study.report_split}'"]
    text = write_cost_report(study, runs, study.output / "report", settings)
    return text, list(outcomes.values())


def finish(study: Study, runs: list[Run], settings: list[str], train: bool = True) -> Path:
    text, outcomes = run_deployed(study, runs, settings, train)
    print(text, end="")
    raise_on_failures(outcomes, "report")
    return study.output / "report"
