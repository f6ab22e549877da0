"""refconv-study STUDY.yaml: every variant x seed of a study as refconv-train runs, then the table with paired
differences to the controls (docs/usage.md "refconv-study", docs/design.md section 5)."""

from __future__ import annotations

import argparse
import sys

from .common import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refconv-study", description=__doc__)
    p.add_argument("study", help="study file (YAML), e.g. configs/study/scratch.study.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="applied to every run after the study file's overrides, e.g. data.root=/data/mine")
    p.add_argument("--phase", choices=["select", "all"], default="all",
                   help="select: the baseline and the selection only; all: then every variant x seed (default)")
    p.add_argument("--seeds", nargs="+", metavar="S", help="report seeds (default: the study file's)")
    p.add_argument("--quick", action="store_true",
                   help="check the pipeline: 1 epoch of a few small steps per run, into <output>_quick")
    p.add_argument("--out", help="output folder (default: the study file's 'output')")
    p.add_argument("--dry-run", action="store_true", help="print every run's command, run nothing")
    p.add_argument("--results-only", action="store_true",
                   help="write the results of the runs finished so far, train nothing (safe while the study runs)")
    args = p.parse_intermixed_args(argv)
    if args.results_only and (args.dry_run or args.phase != "all"):
        p.error("--results-only writes the results of the finished runs: it takes neither --dry-run nor --phase")
    if args.seeds:  # "--seeds 0 1 data.root=x": the override after the seeds is an override
        words = args.seeds
        args.seeds = [int(w) for w in words if w.isdigit()]
        args.overrides += [w for w in words if not w.isdigit() and "=" in w]
        bad = [w for w in words if not w.isdigit() and "=" not in w]
        if bad or not args.seeds:
            p.error(f"--seeds takes non-negative integers, got {' '.join(bad or words)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def _run() -> None:
        from ..study import run_study  # imported here: --help stays fast

        run_study(args.study, args.phase, args.seeds, args.quick, args.out, args.dry_run, args.overrides,
                  args.results_only)

    return run_cli(_run)


if __name__ == "__main__":
    sys.exit(main())
