"""A study's results: results.md (the table and the settings), results.json (every number, per run too) and
curves.png (top-1 per epoch, mean over seeds; needs matplotlib, the optional ``.[analysis]`` extra)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from .metrics import RunMetrics
from .stats import Paired, mean_std, paired_difference

COLUMNS_NOTE = (
    "final: top-1 of the last epoch; best epoch: of the best epoch on the same split (optimistic, for reference); "
    "mean ± sample std over the seeds. Δ: paired by seed (same data order), mean and 95% t interval; the stronger "
    "control is the control with the higher mean final top-1. s / epoch: training seconds per epoch on this machine. "
    "peak MB: the training process's peak resident memory (max RSS). train params: parameters that trained. "
    "kernel change: mean over the spatial convs of ||W_end - W_start|| / ||W_start|| (W_t for RefConv), W_start the "
    "weights the run started from (model.pretrained). rank: by mean final top-1 among the variants (1 = best). "
    "goal (when the study file sets one): met when the Δ vs the stronger control has a mean of at least the goal "
    "and a 95% interval above zero; otherwise how far the mean is short of it and whether the interval lies above 0.")


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def _paired_cell(p: Paired | None) -> str:
    if p is None:
        return "–"
    return f"{p.mean:+.2f}" + ("" if math.isnan(p.low) else f" [{p.low:+.2f}, {p.high:+.2f}]")


def _params(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(int(n))


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.mean(known) if known else None


def stronger_control(runs: dict[str, list[RunMetrics]], controls: list[str]) -> str | None:
    """The control with the higher mean final top-1 (None without a finished control run)."""
    done = [(statistics.mean(r.final for r in runs[c]), c) for c in controls if runs.get(c)]
    return max(done)[1] if done else None


def goal_status(paired: dict | None, goal: float) -> dict | None:
    """Against the goal (a paired Δ vs the stronger control with mean >= ``goal`` and its 95% interval above 0):
    ``met``, ``short`` (points the mean lacks) and ``interval_above_zero``; None without a paired Δ."""
    if paired is None:
        return None
    above = not math.isnan(paired["low"]) and paired["low"] > 0
    short = max(goal - paired["mean"], 0.0)
    return {"goal": goal, "met": short == 0 and above, "short": short, "interval_above_zero": above}


def _goal_cell(status: dict | None) -> str:
    if status is None:
        return "–"
    if status["met"]:
        return "met"
    parts = [f"short {status['short']:.2f}"] if status["short"] > 0 else []
    return "; ".join(parts + ([] if status["interval_above_zero"] else ["interval not above 0"]))


def ranks(runs: dict[str, list[RunMetrics]]) -> dict[str, int]:
    """1 = the highest mean final top-1; variants without a finished run are not ranked."""
    means = sorted(((statistics.mean(r.final for r in rs), v) for v, rs in runs.items() if rs), reverse=True)
    return {v: i + 1 for i, (_, v) in enumerate(means)}


def summarize(whats: dict[str, str], runs: dict[str, list[RunMetrics]], controls: list[str],
              notes: dict[str, str] | None = None, goal: float | None = None) -> dict[str, dict]:
    """Per variant: n, final / best mean and std, rank, paired differences to each control and to the stronger one
    (and, with ``goal``, where that stands against it), mean s / epoch, peak MB, train params, kernel change, and
    every run."""
    stronger = stronger_control(runs, controls)
    rank = ranks(runs)
    out = {}
    for v, what in whats.items():
        rs = runs.get(v, [])
        finals = {r.seed: r.final for r in rs}
        paired = {}
        for c in controls:
            p = None if c == v else paired_difference(finals, {r.seed: r.final for r in runs.get(c, [])})
            paired[c] = None if p is None else {"mean": p.mean, "low": p.low, "high": p.high, "n": p.n,
                                                "diffs": list(p.diffs)}
        final_m, final_s = mean_std([r.final for r in rs]) if rs else (None, None)
        best_m, best_s = mean_std([r.best for r in rs]) if rs else (None, None)
        out[v] = {"what": what + (f" ({notes[v]})" if notes and v in notes else ""), "n": len(rs),
                  "seeds": [r.seed for r in rs], "final_mean": final_m, "final_std": final_s, "best_mean": best_m,
                  "best_std": best_s, "rank": rank.get(v), "paired": paired,
                  "paired_stronger": paired.get(stronger) if stronger else None,
                  "epoch_s": _mean_or_none([r.epoch_s for r in rs]), "peak_mb": _mean_or_none([r.peak_mb for r in rs]),
                  "train_params": _mean_or_none([r.train_params for r in rs]),
                  "kernel_change": _mean_or_none([r.kernel_change for r in rs]),
                  "runs": [r.as_dict() for r in rs]}
        if goal is not None:
            out[v]["goal"] = None if v in controls else goal_status(out[v]["paired_stronger"], goal)
    return out


def table(summary: dict[str, dict], runs: dict[str, list[RunMetrics]], controls: list[str],
          goal: float | None = None) -> list[str]:
    stronger = stronger_control(runs, controls)
    ranked = sum(s["rank"] is not None for s in summary.values())
    head = ["variant", "what", "seeds", "final top-1", "rank", "best epoch",
            *(f"Δ vs {c} [95% CI]" for c in controls)]
    if len(controls) > 1 and stronger:
        head.append(f"Δ vs stronger control ({stronger}) [95% CI]")
    if goal is not None and stronger:
        head.append(f"goal: Δ ≥ {goal:+.2f}, interval > 0")
    head += ["s / epoch", "peak MB", "train params", "kernel change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, s in summary.items():
        rs = runs.get(v, [])

        def p(c: str, paired: dict = s["paired"]) -> str:
            d = paired.get(c)
            return "–" if d is None else _paired_cell(Paired(d["mean"], d["low"], d["high"], d["n"], tuple(d["diffs"])))

        cells = [v, s["what"], str(s["n"]), _ms([r.final for r in rs]),
                 "–" if s["rank"] is None else f"{s['rank']} / {ranked}", _ms([r.best for r in rs]),
                 *(p(c) for c in controls)]
        if len(controls) > 1 and stronger:
            cells.append(p(stronger))
        if goal is not None and stronger:
            cells.append(_goal_cell(s.get("goal")))
        cells += ["–" if s["epoch_s"] is None else f"{s['epoch_s']:.1f}",
                  "–" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}", _params(s["train_params"]),
                  "–" if s["kernel_change"] is None else f"{s['kernel_change']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(folder: Path, title: str, settings: list[str], whats: dict[str, str],
                  runs: dict[str, list[RunMetrics]], controls: list[str], extra: dict, split: str,
                  notes: dict[str, str] | None = None, footer: list[str] = (), goal: float | None = None) -> str:
    """results.md, results.json and curves.png in ``folder``; returns the markdown. ``goal``: the margin over the
    stronger control that a variant must reach, with its interval above zero (a column, and per variant in json)."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(whats, runs, controls, notes, goal)
    lines = [f"# {title}", "", *(f"- {s}" for s in settings), "", *table(summary, runs, controls, goal), ""]
    lines += [*footer, *([""] if footer else []), COLUMNS_NOTE]
    text = "\n".join(lines) + "\n"
    (folder / "results.md").write_text(text)
    data = {"title": title, "settings": settings, "split": split, "controls": controls, "goal": goal,
            "stronger_control": stronger_control(runs, controls), "variants": summary, **extra}
    (folder / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    plot_curves(folder / "curves.png", runs, title, split)
    return text


def plot_curves(path: Path, runs: dict[str, list[RunMetrics]], title: str, split: str) -> bool:
    """Top-1 per epoch, mean over seeds per variant (band: min to max). Without matplotlib: one warning line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed (pip install '.[analysis]'): no {path.name}", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, rs in runs.items():
        if not rs:
            continue
        n = min(len(r.curve) for r in rs)
        x = list(range(1, n + 1))
        mean = [statistics.mean(r.curve[i] for r in rs) for i in range(n)]
        (line,) = ax.plot(x, mean, marker="o", label=f"{v} ({len(rs)} seeds)")
        if len(rs) > 1:
            ax.fill_between(x, [min(r.curve[i] for r in rs) for i in range(n)],
                            [max(r.curve[i] for r in rs) for i in range(n)], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} top-1 % (mean; band: min-max over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
