"""One figure from the reports of several ``evaluate: deployed`` studies (refconv-study's
``OUT/report/results.json``): deployed top-1 against training cost, one panel per study.

    python scripts/cost_figure.py runs/study/scratch_resnet18/report/results.json \\
        runs/study/scratch_mobilenetv2_050/report/results.json -o docs/figures/scratch_cost.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from refconv_train.errors import RefconvError
from refconv_train.study.cost_report import plot_cost


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="results.json of evaluate: deployed studies")
    p.add_argument("-o", "--out", required=True, help="the figure (.png)")
    args = p.parse_args(argv)
    try:
        reports = []
        for path in args.reports:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise RefconvError(f"{path}: cannot be read as JSON ({e})") from None
            if "cost_axis" not in data:
                raise RefconvError(f"{path}: not the report of an 'evaluate: deployed' study (no cost_axis)")
            reports.append(data)
        if not plot_cost(Path(args.out), reports):
            return 1
    except RefconvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
