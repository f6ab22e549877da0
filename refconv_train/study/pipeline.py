"""``refconv-study``: baseline (optional) -> selection on the holdout split -> every variant x seed on the report
split -> results.md / results.json / curves.png. Restartable; see runner.py."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

from ..errors import RefconvError
from .deploy import eval_command, eval_executable
from .deployed_phase import finish
from .metrics import RunMetrics, read_curve, read_run
from .plan import Run, aliases, baseline_run, check_configs, report_runs, select_runs
from .report import write_results
from .runner import child_env, partial_note, raise_on_failures, run_all, run_one
from .spec import Study, load_study


def baseline_eval_command(study: Study, base: Run) -> tuple[list[str], Path]:
    """refconv-eval of the baseline's last.pth on the report split (what every stage-2 run starts from)."""
    cfg = base.resolved()
    out = study.output / "report" / f"baseline_{study.report_split}.json"
    return [*eval_executable(), "--data", str(cfg["data.root"]), "--checkpoint", str(base.folder / "last.pth"),
            "--split", study.report_split, "--workers", str(cfg["data.workers"]), "--json", str(out)], out


def choose(study: Study) -> tuple[dict[str, float], dict[str, dict]]:
    """Each family's lr with the best final top-1 on the selection split (the first of the grid on a tie)."""
    chosen, detail = {}, {}
    for f in study.families:
        finals = {}
        for lr, c in zip(f.lrs, f.candidates()):
            curve, _ = read_curve(study.output / "select" / f"seed{study.select_seed}" / c.name)
            if not curve:
                raise RefconvError(f"selection candidate '{c.name}' has no result: run the selection first")
            finals[lr] = curve[-1]
        lr = max(finals, key=lambda x: finals[x])
        chosen[f.name] = lr
        detail[f.name] = {"lr": lr, "candidate": f"{f.name}_lr{lr}", "top1": finals[lr],
                          "grid": {str(k): v for k, v in finals.items()}}
    return chosen, detail


def _collect(runs: list[Run], cache: dict) -> dict[str, list[RunMetrics]]:
    out: dict[str, list[RunMetrics]] = {}
    for r in runs:
        out.setdefault(r.variant, [])
        if (r.folder / "DONE").is_file():
            m = read_run(r.folder, r.variant, r.seed, cache)
            if m is not None:
                out[r.variant].append(m)
    return out


def _settings(study: Study, split: str, seeds: tuple[int, ...]) -> list[str]:
    lines = [f"study file: {study.path}; stage-2 config: {study.config}; output: {study.output}",
             f"seeds: {', '.join(map(str, seeds))}; validated on the '{split}' split; budget: "
             + (f"{study.budget} epoch{'s' * (study.budget != 1)}" if study.budget else "as each variant sets")]
    if study.overrides:
        lines.append(f"overrides of every run: {' '.join(study.overrides)}")
    if study.quick:
        lines.append("QUICK MODE (--quick): one epoch of a few small steps per run; these numbers mean nothing")
    return lines


def _selection_lines(detail: dict[str, dict], split: str) -> list[str]:
    return [f"selection (seed 0, final {split} top-1): {f}: lr {d['lr']} ({d['candidate']}, {d['top1']:.2f}; grid "
            + ", ".join(f"{k}: {v:.2f}" for k, v in d["grid"].items()) + ")" for f, d in detail.items()]


def _baseline_lines(study: Study, base: Run, eval_json: Path | None) -> tuple[list[str], dict]:
    curve, _ = read_curve(base.folder)
    info: dict = {"folder": str(base.folder), "curve": curve}
    lines = []
    if curve:
        last = curve[-3:]
        lines.append(f"baseline ({base.folder}, {study.baseline.config}): {len(curve)} epoch{'s' * (len(curve) != 1)}; "
                     f"{study.select_split} "
                     f"top-1 of its last epochs {', '.join(f'{v:.2f}' for v in last)} "
                     f"(spread {max(last) - min(last):.2f})")
    if eval_json is not None and eval_json.is_file():
        top1 = json.loads(eval_json.read_text())["top1"]
        info[f"{study.report_split}_top1"] = top1
        lines.append(f"the baseline itself on the '{study.report_split}' split (the start of every run): top-1 "
                     f"{top1:.2f}")
    return lines, info


def run_study(path: str | Path, phase: str = "all", seeds: list[int] | None = None, quick: bool = False,
              out: str | None = None, dry_run: bool = False, overrides: list[str] | None = None,
              results_only: bool = False) -> Path:
    """Run (or, ``dry_run``, print) a study; returns the folder of its last results.md. ``overrides`` apply to
    every run, after the study file's. ``results_only``: write the results of the runs finished so far and train
    nothing (safe while the study runs in another process; the selection must be finished)."""
    study = load_study(path).with_options(seeds=seeds, quick=quick, out=out, overrides=overrides)
    check_configs(study)
    base = baseline_run(study)
    selection = select_runs(study)
    if dry_run:
        return _dry_run(study, base, selection, phase)
    if results_only:
        return _results_only(study, base, selection)
    start = time.time()
    if base is not None:
        outcome = run_one(base, "baseline ")
        raise_on_failures([outcome], "baseline")
    chosen, detail = {}, {}
    if selection:
        raise_on_failures(run_all(selection, "select"), "selection")
        chosen, detail = choose(study)
        whats = {r.variant: r.what for r in selection}
        text = write_results(study.output / "select", f"{study.name}: selection, top-1 % on the "
                             f"'{study.select_split}' split", _settings(study, study.select_split, (0,)), whats,
                             _collect(selection, {}), [], {"selection": detail}, study.select_split,
                             footer=_selection_lines(detail, study.select_split))
        print(text, end="")
    if phase == "select":
        print(f"selection done in {time.time() - start:.0f} s: {study.output / 'select' / 'results.md'}")
        return study.output / "select"

    folder = _report_phase(study, base, chosen, detail, train=True)
    print(f"study done in {time.time() - start:.0f} s: {folder / 'results.md'}")
    return folder


def _results_only(study: Study, base: Run | None, selection: list[Run]) -> Path:
    chosen, detail = choose(study) if selection else ({}, {})  # an unfinished selection is a one-line error
    folder = _report_phase(study, base, chosen, detail, train=False)
    print(f"results of the runs finished so far: {folder / 'results.md'}")
    return folder


def _report_phase(study: Study, base: Run | None, chosen: dict[str, float], detail: dict[str, dict],
                  train: bool) -> Path:
    """Every variant x seed (``train``), or only those finished so far, then the results; returns their folder."""
    report = report_runs(study, chosen)
    if study.evaluate == "deployed":  # every run from its deployed file; no aliases (a start must have a folder)
        return finish(study, report, _settings(study, study.select_split, study.seeds)
                      + _selection_lines(detail, study.select_split), train)
    same = aliases(study, report)
    to_run = [r for r in report if r.variant not in same]
    eval_json = None
    if base is not None:
        cmd, eval_json = baseline_eval_command(study, base)
        if train and not eval_json.is_file():
            eval_json.parent.mkdir(parents=True, exist_ok=True)
            print(f"== {shlex.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
            if proc.returncode:
                tail = proc.stdout.strip().splitlines()[-1:] or [""]
                raise RefconvError(f"evaluating the baseline failed ({tail[0]}): {shlex.join(cmd)}")
    outcomes = run_all(to_run, "report") if train else []
    collected = _collect(to_run, {})
    for v, first in same.items():
        collected[v] = [RunMetrics(**{**m.as_dict(), "variant": v}) for m in collected.get(first, [])]
    whats = {v.name: v.what for v in study.variants}
    notes = {v: f"= {first}: the same runs" for v, first in same.items()}
    notes.update({v.name: f"lr {chosen[v.family]} chosen for {v.family}" for v in study.variants
                  if v.family and v.name not in notes})
    settings = _settings(study, study.report_split, study.seeds) + _selection_lines(detail, study.select_split)
    if not train:
        settings.append(partial_note(to_run))
    if study.goal is not None:
        settings.append(f"goal: a variant gains at least {study.goal:.2f} points over the stronger control, its "
                        f"95% interval above zero")
    extra: dict = {"selection": detail, "aliases": same, "seeds": list(study.seeds), "budget": study.budget}
    if base is not None:
        lines, extra["baseline"] = _baseline_lines(study, base, eval_json)
        settings += lines
    title = f"{study.name}: top-1 % on the '{study.report_split}' split"
    text = write_results(study.output / "report", title, settings, whats, collected, list(study.controls), extra,
                         study.report_split, notes, goal=study.goal)
    print(text, end="")
    raise_on_failures(outcomes, "report")
    return study.output / "report"


def _dry_run(study: Study, base: Run | None, selection: list[Run], phase: str) -> Path:
    runs = ([base] if base else []) + selection
    chosen = {}
    if phase == "all":
        try:
            chosen = choose(study)[0] if selection else {}
        except RefconvError:
            chosen = {}  # selection not finished: the report commands show a placeholder for the chosen lr
        runs += report_runs(study, chosen)
    for r in runs:
        print(shlex.join(r.command()))
        if r.phase == "report" and study.evaluate == "deployed":
            print(shlex.join(eval_command(r, study.report_split)))
    if base is not None and phase == "all":
        print(shlex.join(baseline_eval_command(study, base)[0]))
    return study.output
