"""The report of an ``evaluate: deployed`` study: per variant the deployed model's top-1 on the report split
(mean ± std over seeds), the paired difference to its ``reference`` with a 95% t interval, the training cost in
unit epochs (benchmark ratios and the runs' own seconds), peak memory and the holdout convergence of the last three
epochs; results.md, results.json, cost.png (top-1 against cost) and curves.png."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .cost import load_ratios, measured_cost, method_of, variant_cost
from .deploy import deployed_top1
from .links import chain
from .metrics import read_curve, read_run
from .plan import Run
from .report import plot_curves
from .spec import Study
from .stats import mean_std, paired_difference

CONVERGED = 0.5  # points: the holdout spread of the unit's last three epochs under which it counts as converged
NOTE = ("top-1: refconv-eval of each run's deployed file (fused.pth with a method, else last.pth) on the report "
        "split, mean ± sample std over seeds. Δ: paired by seed against the variant's reference, mean and 95% t "
        "interval. cost: training epochs of the unit (plain one-stage) variant that the whole chain costs: "
        "benchmark = sum over its stages of epochs x the method's step-time ratio (scripts/benchmark.py "
        "--methods); measured = the chain's summed summary.csv epoch_s / the unit's mean epoch_s (this machine, "
        "noisy when shared). train s: the chain's training seconds; peak MB: max RSS of its processes; memory: "
        "the benchmark's peak-memory ratio of the stage with the method. spread: max over seeds of the spread of "
        "the last three epochs' top-1 on the selection split.")


def _spread(curve: list[float]) -> float | None:
    return max(curve[-3:]) - min(curve[-3:]) if len(curve) >= 3 else None


def summarize(study: Study, runs: list[Run], split: str) -> dict:
    """Every number of the report, as results.json holds it."""
    done = {(r.variant, r.seed): r for r in runs if (r.folder / "DONE").is_file()}
    tops = {v.name: {s: t for s in study.seeds if (r := done.get((v.name, s))) and
                     (t := deployed_top1(r, split)) is not None} for v in study.variants}
    ratios, ratio_note = None, None
    if study.cost_ratios and Path(study.cost_ratios).is_file():
        ratios = load_ratios(study.cost_ratios)
    elif study.cost_ratios:
        ratio_note = f"cost ratios '{study.cost_ratios}' not found: cost from the runs' own seconds only"
    first = {r.variant: r for r in runs if r.seed == runs[0].seed}
    unit_folders = [r.folder for r in runs if r.variant == study.cost_unit and (r.variant, r.seed) in done]
    out: dict = {}
    for v in study.variants:
        names = chain(study, v.name)
        stages = [(method_of(cfg), int(cfg["optim.warmup_epochs"]) + int(cfg["optim.epochs"]))
                  for cfg in (first[n].resolved() for n in names)]
        chains = {s: [done[(n, s)].folder for n in names] for s in study.seeds
                  if all((n, s) in done for n in names)}
        top = tops[v.name]
        m, sd = mean_std(list(top.values())) if top else (None, None)
        p = paired_difference(top, tops[v.reference]) if v.reference else None
        curves = {s: read_curve(done[(v.name, s)].folder)[0] for s in study.seeds if (v.name, s) in done}
        spreads = {s: _spread(c) for s, c in curves.items()}
        known = [x for x in spreads.values() if x is not None]
        memory = [ratios[mth]["memory"] for mth, _ in stages if ratios and mth in ratios and mth != "baseline"]
        out[v.name] = {"what": v.what, "stages": [{"variant": n, "method": mth, "epochs": e}
                                                  for n, (mth, e) in zip(names, stages)],
                       "start": v.start, "reference": v.reference, "n": len(top), "top1": top, "mean": m, "std": sd,
                       "paired": None if p is None else {"mean": p.mean, "low": p.low, "high": p.high, "n": p.n,
                                                         "diffs": list(p.diffs)},
                       "cost_epochs_benchmark": variant_cost(stages, ratios),
                       "memory_ratio_benchmark": max((x for x in memory if x is not None), default=None),
                       **{f"{k}_measured" if k == "epochs" else k: x
                          for k, x in measured_cost(chains, unit_folders).items()},
                       "spread_last3": spreads, "spread_last3_max": max(known) if known else None, "curves": curves}
    unit = out.get(study.cost_unit, {})
    spreads = unit.get("spread_last3", {})
    return {"variants": out, "ratios_file": study.cost_ratios, "ratios": ratios, "ratios_note": ratio_note,
            "cost_axis": "benchmark" if ratios and all(x["cost_epochs_benchmark"] is not None for x in out.values())
            else "measured", "unit": study.cost_unit,
            "convergence": {"variant": study.cost_unit, "spread_last3": spreads, "threshold": CONVERGED,
                            "converged": bool(spreads) and all(x is not None and x < CONVERGED
                                                                for x in spreads.values())}}


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _stage_text(stages: list[dict]) -> str:
    return " → ".join(f"{s['method'].replace('refocus_per_step', 'refconv')} {s['epochs']}" for s in stages)


def table(summary: dict) -> list[str]:
    head = ["variant", "what", "stages (method epochs)", "seeds", "top-1 (deployed)", "reference",
            "Δ vs reference [95% CI]", "cost, unit epochs (benchmark)", "cost, unit epochs (measured)", "train s",
            "peak MB", "memory / unit (benchmark)", "holdout spread, last 3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in summary["variants"].items():
        p = v["paired"]
        delta = "–" if p is None else f"{p['mean']:+.2f}" + \
            ("" if math.isnan(p["low"]) else f" [{p['low']:+.2f}, {p['high']:+.2f}]")
        top = "–" if v["mean"] is None else f"{v['mean']:.2f}" + ("" if v["std"] is None else f" ± {v['std']:.2f}")
        lines.append("| " + " | ".join([
            name, v["what"], _stage_text(v["stages"]), str(v["n"]), top, v["reference"] or "–", delta,
            _num(v["cost_epochs_benchmark"], ".1f"), _num(v["epochs_measured"], ".1f"), _num(v["train_s"], ".0f"),
            _num(v["peak_mb"], ".0f"), _num(v["memory_ratio_benchmark"], ".2f"), _num(v["spread_last3_max"], ".2f")])
            + " |")
    return lines


def convergence_line(summary: dict, split: str) -> str:
    c = summary["convergence"]
    per = "; ".join(f"seed {s}: " + ", ".join(f"{x:.2f}" for x in summary["variants"][c["variant"]]["curves"][s][-3:])
                    for s in c["spread_last3"])
    verdict = "converged" if c["converged"] else "NOT converged"
    return (f"convergence of '{c['variant']}': {split} top-1 of its last three epochs {per or '–'}; {verdict} "
            f"(every seed's spread under {c['threshold']} points)")


def write_cost_report(study: Study, runs: list[Run], folder: Path, settings: list[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(study, runs, study.report_split)
    settings = [*settings, convergence_line(summary, study.select_split)]
    if summary["ratios_note"]:
        settings.append(summary["ratios_note"])
    elif summary["ratios_file"]:
        settings.append(f"cost ratios: {summary['ratios_file']}")
    title = f"{study.name}: deployed top-1 % on the '{study.report_split}' split against training cost"
    lines = [f"# {title}", "", *(f"- {s}" for s in settings), "", *table(summary), "", NOTE]
    text = "\n".join(lines) + "\n"
    (folder / "results.md").write_text(text)
    data = {"title": title, "name": study.name, "settings": settings, "split": study.report_split,
            "select_split": study.select_split, "seeds": list(study.seeds), "budget": study.budget, **summary}
    (folder / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    metrics = {}
    for r in runs:
        if (r.folder / "DONE").is_file() and (m := read_run(r.folder, r.variant, r.seed)) is not None:
            metrics.setdefault(r.variant, []).append(m)
    plot_curves(folder / "curves.png", metrics, title, study.select_split)
    plot_cost(folder / "cost.png", [data])
    return text


def plot_cost(path: Path, reports: list[dict]) -> bool:
    """Deployed top-1 (mean ± std over seeds) against training cost in unit epochs, one point per variant, one
    panel per report (results.json of an ``evaluate: deployed`` study); two-stage variants as squares."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed (pip install '.[analysis]'): no {path.name}", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 4.8), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        key = "cost_epochs_benchmark" if rep["cost_axis"] == "benchmark" else "epochs_measured"
        for name, v in rep["variants"].items():
            if v["mean"] is None or v.get(key) is None:
                continue
            two = len(v["stages"]) > 1
            ax.errorbar(v[key], v["mean"], yerr=v["std"] or 0, fmt="s" if two else "o", capsize=3,
                        color="tab:red" if two else "tab:blue")
            ax.annotate(name, (v[key], v["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"training cost, epochs of '{rep['unit']}' ({rep['cost_axis']} step-time ratios)")
        ax.set_ylabel(f"deployed {rep['split']} top-1 % (mean ± std, {len(rep['seeds'])} seeds)")
        ax.set_title(f"{rep['name']}: circles one stage, squares two stages", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
