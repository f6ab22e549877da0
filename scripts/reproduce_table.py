#!/usr/bin/env python
"""Results table of scripts/reproduce.sh: top-1 of each variant over the seeds, as Markdown.

Reads RUNS/seed<S>/<variant>/summary.csv (one row per epoch; the last row is the final evaluation) and config.yaml.
Only finished runs (last epoch = warmup + cosine epochs of their config) count; others are listed as unfinished.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

VARIANTS = {
    "baseline": "Baseline, from scratch (stage 1; its best.pth starts every row below)",
    "refocus": "RefConv: W_b = baseline, frozen; W_r learns",
    "retrain": "Re-training the baseline, same recipe, no RefConv",
    "finetune": "Fine-tuning the baseline, lr / 100, no warmup",
    "base_random_frozen": "RefConv, W_b random + frozen",
    "base_pretrained_trainable": "RefConv, W_b = baseline + trainable",
    "base_random_trainable": "RefConv, W_b random + trainable",
}


@dataclass
class Run:
    seed: int
    variant: str
    final: float  # top-1 of the last evaluation (%)
    best: float  # best top-1 over the epochs (%)
    epochs: int  # epochs done
    total: int  # epochs the config asks for

    @property
    def finished(self) -> bool:
        return self.epochs >= self.total


def read_run(folder: Path, seed: int, variant: str) -> Run | None:
    summary = folder / "summary.csv"
    if not summary.is_file():
        return None
    rows = [r for r in csv.DictReader(open(summary)) if r.get("top1") not in (None, "", "nan")]
    if not rows:
        return None
    total = 0
    config = folder / "config.yaml"
    if config.is_file():
        optim = (yaml.safe_load(config.read_text()) or {}).get("optim", {})
        total = int(optim.get("epochs", 0)) + int(optim.get("warmup_epochs", 0))
    top1 = [float(r["top1"]) for r in rows]
    return Run(seed, variant, top1[-1], max(top1), int(float(rows[-1]["epoch"])), total)


def collect(root: Path) -> list[Run]:
    runs = []
    for seed_dir in sorted(root.glob("seed*"), key=lambda p: (len(p.name), p.name)):
        match = re.fullmatch(r"seed(\d+)", seed_dir.name)
        if not match or not seed_dir.is_dir():
            continue
        for variant in VARIANTS:
            run = read_run(seed_dir / variant, int(match.group(1)), variant)
            if run is not None:
                runs.append(run)
    return runs


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def setup_lines(root: Path, runs: list[Run]) -> list[str]:
    """What was run, from the first baseline's resolved config and the data set's spec.json."""
    lines = []
    base = next((r for r in runs if r.variant == "baseline"), None)
    if base is None:
        return lines
    cfg = yaml.safe_load((root / f"seed{base.seed}" / "baseline" / "config.yaml").read_text()) or {}
    m, d, o = cfg.get("model", {}), cfg.get("data", {}), cfg.get("optim", {})
    lines.append(f"- Model `{m.get('name')}`, {m.get('num_classes')} classes, {d.get('img_size')} px; batch "
                 f"{d.get('batch_size')}, lr {o.get('lr')} per 256 images, {o.get('warmup_epochs')} warmup + "
                 f"{o.get('epochs')} cosine epochs per run (stage 1 and stage 2 alike).")
    spec_path = Path(str(d.get("root", ""))) / "spec.json"
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        n_train, n_val = sum(spec["train_counts"].values()), sum(spec["val_counts"].values())
        lines.append(f"- Data `{d.get('root')}`: {n_train} training images (first {spec['train_per_class']} per "
                     f"class of Fashion-MNIST train), {n_val} validation images (first {spec['val_per_class']} "
                     f"per class of the t10k test set).")
    return lines


def render(root: Path, runs: list[Run]) -> str:
    done = [r for r in runs if r.finished]
    seeds = sorted({r.seed for r in runs})
    by = {(r.variant, r.seed): r for r in done}
    lines = [f"# RefConv on Fashion-MNIST: results of `scripts/reproduce.sh` ({root})", ""]
    lines += setup_lines(root, runs)
    lines += ["- Top-1 = the final evaluation of each run (last row of its summary.csv), on the validation set; "
              "mean ± sample standard deviation over the seeds. Δ = variant − baseline of the same seed.", ""]
    lines += ["| Variant | Seeds | Top-1 % (mean ± std) | min – max | Δ vs baseline (mean ± std) | best epoch, mean |",
              "|---|---|---|---|---|---|"]
    for variant, what in VARIANTS.items():
        rs = [by[variant, s] for s in seeds if (variant, s) in by]
        if not rs:
            continue
        final = [r.final for r in rs]
        spread = f"{min(final):.2f} – {max(final):.2f}" if len(final) > 1 else "–"
        deltas = [r.final - by["baseline", r.seed].final for r in rs if ("baseline", r.seed) in by]
        delta = "–" if variant == "baseline" else mean_std(deltas)
        lines.append(f"| {what} | {len(rs)} | {mean_std(final)} | {spread} | {delta} | "
                     f"{statistics.mean(r.best for r in rs):.2f} |")
    lines += ["", "Per seed (final top-1 %):", "",
              "| Variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for variant in VARIANTS:
        cells = []
        for s in seeds:
            run = next((r for r in runs if r.variant == variant and r.seed == s), None)
            cells.append("" if run is None else f"{run.final:.2f}" if run.finished
                         else f"unfinished ({run.epochs}/{run.total})")
        if any(cells):
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="output folder of reproduce.sh (holds seed<S>/<variant>/)")
    parser.add_argument("-o", "--output", help="Markdown file to write (default: RUNS/results.md)")
    args = parser.parse_args(argv)
    root = Path(args.runs)
    runs = collect(root)
    if not runs:
        print(f"error: no runs with a summary.csv under '{root}/seed*/<variant>/': run scripts/reproduce.sh first",
              file=sys.stderr)
        return 2
    text = render(root, runs)
    out = Path(args.output) if args.output else root / "results.md"
    out.write_text(text)
    print(text, end="")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
