#!/usr/bin/env python
"""The demo's results table: top-1 of baseline, RefConv and fused models, max_abs_diff, eval speed fused vs baseline.

Reads ``<runs>/eval_{baseline,retrain,refocus,fused}.json`` (refconv-eval --json) and ``<runs>/refocus/best_fused.pth``.
refconv-eval's img/s covers the whole pipeline (JPEG decoding included) over only a couple of batches, so a busy
machine swings it a lot; the model-forward column times the models themselves on the same random batches,
interleaved, best of several rounds, which is the fair speed comparison of fused vs baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from refconv_train.errors import RefconvError  # noqa: E402
from refconv_train.run.restore import restore_any  # noqa: E402

# (key of eval_<key>.json, label, checkpoint relative to the runs folder)
ROWS = [("baseline", "baseline", "baseline/best.pth"),
        ("retrain", "baseline re-trained (control)", "retrain/best.pth"),
        ("refocus", "RefConv (training form)", "refocus/best.pth"),
        ("fused", "fused (original architecture)", "refocus/best_fused.pth")]


@torch.no_grad()
def forward_speed(models: dict[str, torch.nn.Module], img_size: int, batch: int = 100, rounds: int = 7) -> dict:
    """Images per second of each model's eval forward: same input, interleaved rounds, the best round counts."""
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    best = dict.fromkeys(models, float("inf"))
    for model in models.values():
        model.eval()(x)  # warm-up: allocations, oneDNN primitives, RefConv's cached kernels
    for _ in range(rounds):
        for key, model in models.items():
            t0 = time.perf_counter()
            model(x)
            best[key] = min(best[key], time.perf_counter() - t0)
    return {key: batch / t for key, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="?", default="runs/demo", help="the demo's output folder")
    p.add_argument("--seconds", type=float, help="wall time of training + evaluation, to print")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    try:
        results = {key: json.loads((runs / f"eval_{key}.json").read_text()) for key, _, _ in ROWS}
        fused = torch.load(runs / "refocus" / "best_fused.pth", map_location="cpu", weights_only=True)
        models = {key: restore_any(runs / ckpt).model for key, _, ckpt in ROWS}
    except (OSError, ValueError) as e:  # RefconvError is a ValueError
        why = str(e) if isinstance(e, RefconvError) else f"{type(e).__name__}: {e}"
        print(f"error: cannot read the demo's results in '{runs}' ({why}); run scripts/demo.sh", file=sys.stderr)
        return 2
    base = results["baseline"]
    speed = forward_speed(models, base["img_size"])

    print(f"{'model':32s} {'top-1 %':>8s} {'top-5 %':>8s} {'eval img/s':>11s} {'forward img/s':>14s}")
    for key, label, _ in ROWS:
        r = results[key]
        print(f"{label:32s} {r['top1']:8.2f} {r['top5']:8.2f} {r['img_per_s']:11.1f} {speed[key]:14.1f}")
    classes = fused["num_classes"]
    print(f"{base['images']} val images, {classes} classes (chance top-1 {100 / classes:.0f}%), {fused['arch']} at "
          f"{base['img_size']} px, trained from scratch")
    print(f"RefConv vs baseline top-1: {results['refocus']['top1'] - base['top1']:+.2f} points; vs the re-trained "
          f"control (same extra epochs): {results['refocus']['top1'] - results['retrain']['top1']:+.2f} points")
    same = all(results["fused"][k] == results["refocus"][k] for k in ("top1", "top5"))
    print(f"fused vs RefConv: max_abs_diff={fused['max_abs_diff']:.3g}, top-1/top-5 "
          f"{'identical' if same else 'DIFFER'}")
    print(f"speed fused / baseline: {speed['fused'] / speed['baseline']:.2f}x model forward, "
          f"{results['fused']['img_per_s'] / base['img_per_s']:.2f}x refconv-eval "
          f"(same architecture and cost: RefConv is free at inference)")
    if args.seconds is not None:
        print(f"training + evaluation wall time: {args.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
