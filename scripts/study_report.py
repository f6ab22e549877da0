#!/usr/bin/env python
"""Tables and curves of scripts/study.py: per variant final / best top-1 over the seeds, the paired difference to
each control with a 95% interval, how far the kernels moved, seconds per epoch.

    scripts/study_report.py runs/study/scratch/report --controls finetune_lr0.06 retrain

Reads <dir>/seed<S>/<variant>/{summary.csv,config.yaml,last.pth}; writes <dir>/results.md, results.json, curves.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy is not a dependency).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class ReportError(Exception):
    """Printed as one ``error: ...`` line."""


@dataclass
class Run:
    variant: str
    seed: int
    curve: list[float]  # top-1 per epoch
    epochs_wanted: int
    epoch_s: float  # mean seconds per training epoch
    kernel_change: float | None  # mean over spatial convs of ||W - W_start|| / ||W_start||

    @property
    def finished(self) -> bool:
        return len(self.curve) >= self.epochs_wanted

    @property
    def final(self) -> float:
        return self.curve[-1]

    @property
    def best(self) -> float:
        return max(self.curve)


def read_run(folder: Path, variant: str, seed: int, with_kernels: bool = True) -> Run | None:
    summary = folder / "summary.csv"
    if not summary.is_file():
        return None
    rows = [r for r in csv.DictReader(open(summary)) if r.get("top1") not in (None, "", "nan")]
    if not rows:
        return None
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    wanted = int(cfg["optim"]["epochs"]) + int(cfg["optim"]["warmup_epochs"])
    change = kernel_change(folder / "last.pth", cfg["model"]["pretrained"]) if with_kernels else None
    return Run(variant, seed, [float(r["top1"]) for r in rows], wanted,
               statistics.mean(float(r["epoch_s"]) for r in rows), change)


def spatial_kernels(path: str | Path) -> dict[str, torch.Tensor]:
    """The conv kernels larger than 1x1 of any checkpoint the library reads (RefConv ones fused: W_t)."""
    from refconv_train import read_state_dict

    return {k: v.double() for k, v in read_state_dict(path).items()
            if k.endswith(".weight") and v.ndim == 4 and v.shape[-1] * v.shape[-2] > 1}


def kernel_change(last: Path, start: str | bool) -> float | None:
    """Mean over spatial convs of ``||W_t - W_b|| / ||W_b||``, ``W_b`` the kernels the run started from."""
    if not last.is_file() or not isinstance(start, str):
        return None
    before, after = spatial_kernels(start), spatial_kernels(last)
    return statistics.mean(float((after[k] - w).norm() / w.norm()) for k, w in before.items() if w.norm() > 0)


def collect(root: Path, variants: list[str], seeds: list[int], with_kernels: bool = True) -> list[Run]:
    runs = []
    for seed in seeds:
        for v in variants:
            run = read_run(root / f"seed{seed}" / v, v, seed, with_kernels)
            if run is not None:
                runs.append(run)
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(a: list[Run], b: list[Run]) -> tuple[float, float, float, int] | None:
    """Mean of ``a - b`` over the seeds both finished, with its 95% t interval: (mean, low, high, n)."""
    bs = {r.seed: r.final for r in b if r.finished}
    d = [r.final - bs[r.seed] for r in a if r.finished and r.seed in bs]
    if not d:
        return None
    m = statistics.mean(d)
    if len(d) < 2:
        return m, math.nan, math.nan, 1
    half = T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half, len(d)


def choose(root: Path, variants) -> dict[str, str]:
    """The best finetune_* and the best refconv_* variant of a selection, by final top-1 (seed 0)."""
    runs = {r.variant: r for r in collect(root, [v.name for v in variants], [0], with_kernels=False) if r.finished}
    picks = {}
    for prefix in ("finetune", "refconv"):
        done = [r for name, r in runs.items() if name.startswith(prefix)]
        if not done:
            raise ReportError(f"no finished {prefix}_* run in {root}: run the selection first")
        picks[prefix] = max(done, key=lambda r: r.final).variant
    return picks


def baseline_line(baseline: Path) -> str:
    rows = list(csv.DictReader(open(baseline / "summary.csv")))
    last3 = [float(r["top1"]) for r in rows[-3:]]
    return (f"Baseline ({baseline}): {len(rows)} epochs, holdout top-1 of the last three epochs "
            f"{', '.join(f'{v:.2f}' for v in last3)} (spread {max(last3) - min(last3):.2f} points).")


def write(root: Path, whats: dict[str, str], seeds: list[int], baseline: Path | None = None,
          controls: list[str] = (), chosen: dict[str, str] | None = None) -> str:
    runs = collect(root, list(whats), seeds)
    by = {v: [r for r in runs if r.variant == v] for v in whats}
    split = "holdout" if root.name == "select" else "test"
    lines = [f"# {root}: top-1 % on the {split} split", ""]
    if baseline is not None and (baseline / "summary.csv").is_file():
        lines += [baseline_line(baseline), ""]
    if (root / "baseline_test.json").is_file():
        top1 = json.loads((root / "baseline_test.json").read_text())["top1"]
        lines += [f"The baseline itself on the test split (what every run starts from): top-1 {top1:.2f}.", ""]
    head = ["variant", "what", "seeds", "final", "best epoch", *(f"Δ vs {c} [95% CI]" for c in controls),
            "kernel change", "s / epoch"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for v, what in whats.items():
        rs = [r for r in by[v] if r.finished]
        if not rs:
            lines.append(f"| {v} | {what} | 0 (unfinished: {len(by[v])}) |" + " |" * (len(head) - 3))
            continue
        cells, deltas = [], {}
        for c in controls:
            p = None if c == v else paired(rs, by.get(c, []))
            deltas[c] = p
            interval = f" [{p[1]:+.2f}, {p[2]:+.2f}]" if p is not None and p[3] > 1 else ""
            cells.append("–" if p is None else f"{p[0]:+.2f}{interval}")
        changes = [r.kernel_change for r in rs if r.kernel_change is not None]
        row = [v, what, str(len(rs)), mean_std([r.final for r in rs]), mean_std([r.best for r in rs]), *cells,
               f"{statistics.mean(changes):.3g}" if changes else "–", f"{statistics.mean(r.epoch_s for r in rs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
        table[v] = {"what": what, "runs": [asdict(r) for r in rs], "paired": deltas}
    if chosen:
        lines += ["", f"Chosen by final {split} top-1: control {chosen['finetune']}, RefConv {chosen['refconv']}."]
    lines += ["", "final: the last epoch's top-1; best epoch: the best epoch's (on the reported split: optimistic); "
              "mean ± sample std over the seeds. Δ: paired by seed, mean and 95% t interval. kernel change: mean over "
              "the spatial convs of ||W - W_start|| / ||W_start|| (W_t for RefConv), W_start the kernels the run "
              "started from. s / epoch: training time of one epoch (this machine)."]
    text = "\n".join(lines) + "\n"
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps({"table": table, "chosen": chosen}, indent=1) + "\n")
    plot(root, by, whats, split)
    print(text, end="")
    return text


def plot(root: Path, by: dict[str, list[Run]], whats: dict[str, str], split: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install '.[analysis]'): no curves.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in whats:
        curves = [r.curve for r in by[v] if r.finished]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = list(range(1, n + 1))
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        (line,) = ax.plot(x, mean, marker="o", label=f"{v} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(x, [min(c[i] for c in curves) for i in range(n)],
                            [max(c[i] for c in curves) for i in range(n)], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} top-1 % (mean, band: min-max over seeds)")
    ax.set_title(str(root))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a phase folder of scripts/study.py (holds seed<S>/<variant>/)")
    parser.add_argument("--controls", nargs="*", default=[], help="variants to pair every other one with")
    parser.add_argument("--baseline", type=Path, help="the arm's baseline run folder")
    args = parser.parse_args(argv)
    seeds = sorted(int(m.group(1)) for p in args.dir.glob("seed*") if (m := re.fullmatch(r"seed(\d+)", p.name)))
    variants = sorted({p.name for s in seeds for p in (args.dir / f"seed{s}").iterdir() if p.is_dir()})
    if not variants:
        print(f"error: no runs under '{args.dir}/seed<S>/<variant>/': run scripts/study.py first", file=sys.stderr)
        return 2
    write(args.dir, {v: v for v in variants}, seeds, args.baseline, args.controls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
