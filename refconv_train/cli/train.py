"""refconv-train --config FILE [section.key=value ...]: baseline or RefConv training (docs/design.md sections 3, 5)."""

from __future__ import annotations

import argparse
import sys

from ..config import load_config
from ..trainer import run_training
from .common import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refconv-train", description=__doc__)
    p.add_argument("--config", help="YAML config (configs/*.yaml); keys not set keep their defaults")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.epochs=2 data.root=/data")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def _run() -> None:
        cfg = load_config(args.config, args.overrides)
        result = run_training(cfg)
        if result.last_eval is not None and not result.stopped:
            print(result.last_eval.line())

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
