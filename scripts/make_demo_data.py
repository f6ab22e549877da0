#!/usr/bin/env python
"""Write the small procedural demo data set (ImageFolder layout) used by configs/demo.yaml and the tests.

Skips the work when the output folder already holds data made with the same spec (its spec.json), unless --force.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from refconv_train.demo_data import is_current, make_demo_data  # noqa: E402
from refconv_train.errors import RefconvError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output folder (gets train/, val/ and spec.json)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (2..12)")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if the folder is up to date")
    args = parser.parse_args(argv)
    spec = {"num_classes": args.classes, "train_per_class": args.train_per_class,
            "val_per_class": args.val_per_class, "size": args.size, "seed": args.seed}
    if not args.force and is_current(args.out, **spec):
        print(f"{args.out}: demo data already up to date (use --force to regenerate)")
        return 0
    start = time.perf_counter()
    try:
        make_demo_data(args.out, **spec)
    except RefconvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = args.classes * (args.train_per_class + args.val_per_class)
    print(f"{args.out}: wrote {total} images in {args.classes} classes ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
