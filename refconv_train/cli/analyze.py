"""refconv-analyze CKPT --out DIR: the paper's diagnostic figures (Figs. 6, 7) and per-layer statistics of a RefConv
training checkpoint, as PNG files and summary.csv (needs matplotlib: pip install .[analysis])."""

from __future__ import annotations

import argparse
import sys

from ..analysis import DEFAULT_CHANNELS
from ..analysis_plots import analyze_checkpoint
from .common import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refconv-analyze", description=__doc__)
    p.add_argument("checkpoint", help="last.pth / best.pth of a refocus run")
    p.add_argument("--out", required=True, help="folder for the PNG files and summary.csv")
    p.add_argument("--layers", nargs="+", metavar="NAME",
                   help="refocused conv names for the per-layer figures (default: first, middle and last depthwise)")
    p.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                   help="first N kernel channels in the matrices and KL means (default %(default)s, as the paper)")
    p.add_argument("--tensorboard", action="store_true", help="also log the figures as images under OUT/tb")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def _run() -> None:
        result = analyze_checkpoint(args.checkpoint, args.out, args.layers, args.channels, args.tensorboard)
        for s in result.stats:
            if s.layer in result.layers:
                print(f"{s.layer}: {s.kind} {s.kernel}, |W_t-W_b|/|W_b|={s.rel_change:.4f}, "
                      f"mean KL W_b={s.kl_base:.4f} W_t={s.kl_refocused:.4f} (first {s.kl_channels})")
        for path in result.files:
            print(f"wrote {path}")
        if args.tensorboard:
            print(f"wrote TensorBoard images to {args.out}/tb")

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
