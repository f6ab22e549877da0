"""Check deployed files the way a user of plain timm would: no refconv_train code on the path.

For each finished run of an ``evaluate: deployed`` study (a folder with ``deployed_<split>.json``), build the
architecture with ``timm.create_model(name, num_classes=N, checkpoint_path=<deployed file>)`` (timm's strict
load), evaluate it on the split with timm's own eval transform and loader (what timm's validate.py does), and compare
top-1 with the one refconv-eval recorded. Exit 1 if a file does not load or a top-1 differs by more than --tol.

    python scripts/check_deployed.py runs/study/scratch_resnet18/report --json docs/studies/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import yaml
from timm.data import create_dataset, create_loader


def runs_of(root: Path, split: str) -> list[Path]:
    return sorted(p.parent for p in root.rglob(f"deployed_{split}.json"))


def evaluate(model: torch.nn.Module, loader) -> tuple[float, int]:
    correct = seen = 0
    with torch.inference_mode():
        for images, targets in loader:
            correct += (model(images).argmax(1) == targets).sum().item()
            seen += targets.numel()
    return 100.0 * correct / seen, seen


class Unreadable(Exception):
    """A run folder this check cannot use: one line, exit 2."""


def check(run: Path, split: str, loaders: dict) -> dict:
    try:
        recorded = json.loads((run / f"deployed_{split}.json").read_text())
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        model_cfg, data = cfg["model"], cfg["data"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError) as e:
        raise Unreadable(f"{run}: its deployed_{split}.json or config.yaml cannot be read ({e})") from None
    if model_cfg["name"].startswith("torchvision:"):
        raise Unreadable(f"{run}: a torchvision model; this check is for timm models")
    row = {"run": str(run), "checkpoint": recorded["checkpoint"], "reported_top1": recorded["top1"]}
    try:
        model = timm.create_model(model_cfg["name"], num_classes=model_cfg["num_classes"], pretrained=False,
                                  checkpoint_path=recorded["checkpoint"], **model_cfg.get("kwargs", {})).eval()
    except (RuntimeError, OSError) as e:  # timm's strict load: missing/unexpected keys, shapes, unreadable file
        return {**row, "error": " ".join(str(e).split())[:300]}
    key = (data["root"], data["img_size"], data["crop_pct"], tuple(data["mean"]), tuple(data["std"]))
    if key not in loaders:
        dataset = create_dataset("", root=str(Path(data["root"]) / split), split=split)
        loaders[key] = create_loader(dataset, input_size=(3, data["img_size"], data["img_size"]), batch_size=256,
                                     is_training=False, interpolation="bilinear", mean=tuple(data["mean"]),
                                     std=tuple(data["std"]), crop_pct=data["crop_pct"], num_workers=1,
                                     use_prefetcher=False)
    top1, images = evaluate(model, loaders[key])
    return {**row, "images": images, "timm_top1": round(top1, 2), "diff": round(top1 - recorded["top1"], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", help="study report folders (searched for deployed_<split>.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--tol", type=float, default=0.0, help="largest allowed |timm top-1 - reported top-1| (points)")
    p.add_argument("--json", help="write every row here")
    args = p.parse_args(argv)
    runs = [r for root in args.roots for r in runs_of(Path(root), args.split)]
    if not runs:
        print(f"error: no deployed_{args.split}.json under {' '.join(args.roots)}: run the study first",
              file=sys.stderr)
        return 2
    rows, loaders, bad = [], {}, 0
    for run in runs:
        try:
            row = check(run, args.split, loaders)
        except Unreadable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append(row)
        ok = "error" not in row and abs(row["diff"]) <= args.tol
        bad += not ok
        what = (f"does not load into timm: {row['error']}" if "error" in row
                else f"{row['timm_top1']:6.2f} vs {row['reported_top1']:6.2f}")
        print(f"{'ok ' if ok else 'BAD'} {what}  {row['checkpoint']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows) - bad} of {len(rows)} deployed files load into plain timm with the reported top-1 "
          f"(tolerance {args.tol} points)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
