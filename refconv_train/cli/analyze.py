"""refconv-analyze CKPT --out DIR: the paper's diagnostic figures (Figs. 6, 7) and per-layer statistics of a RefConv
training checkpoint, as PNG files and summary.csv (needs matplotlib: pip install .[analysis]).
refconv-analyze landscape CKPT [CKPT ...] --data ROOT --out DIR: the loss landscape (Fig. 8), see --help there."""

from __future__ import annotations

import argparse
import sys

from ..analysis.kernel_plots import analyze_checkpoint
from ..analysis.kernels import DEFAULT_CHANNELS
from ..analysis.landscape_run import LandscapeSettings, run_landscape
from .common import run_cli

LANDSCAPE_DOC = """refconv-analyze landscape: the loss landscape around each model (the paper's Fig. 8): a 2-D surface
along two filter-normalized random directions (Li et al. 2018), 1-D curves, the loss rise at radius r over K
directions and the top Hessian eigenvalue, on a fixed seeded subset of a split, in eval mode. Checkpoints of one
architecture (fused, baseline, or training ones of RefConv or another method, which are fused first).
Writes landscape.json and three PNG files."""


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


def parse_landscape_args(argv: list[str]) -> argparse.Namespace:
    d = LandscapeSettings()
    p = argparse.ArgumentParser(prog="refconv-analyze landscape", description=LANDSCAPE_DOC)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="fused, baseline or RefConv training checkpoints")
    p.add_argument("--data", required=True, help="dataset root holding <split>/<class>/*.jpg")
    p.add_argument("--out", required=True, help="folder for landscape.json and the PNG files")
    p.add_argument("--split", default=d.split)
    p.add_argument("--images", type=int, default=d.images, help="seeded subset size (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="of the subset, the directions and the power iteration")
    p.add_argument("--grid", type=int, default=d.grid, help="surface points per axis, odd (default %(default)s)")
    p.add_argument("--span", type=float, default=d.span, help="surface half-width (default %(default)s)")
    p.add_argument("--directions", type=int, default=d.directions, help="K for the rise numbers (default %(default)s)")
    p.add_argument("--radii", type=float, nargs="+", default=list(d.radii), help="default %(default)s")
    p.add_argument("--hessian-images", type=int, default=d.hessian_images,
                   help="the first N of the subset (default %(default)s)")
    p.add_argument("--hessian-iters", type=int, default=d.hessian_iters, help="0 = skip (default %(default)s)")
    p.add_argument("--hessian-tol", type=float, default=d.hessian_tol, help="relative (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--img-size", type=int, help="default: the checkpoint's config, else 224")
    p.add_argument("--crop-pct", type=float, help="default: the checkpoint's config, else 0.875")
    p.add_argument("--model", help="architecture of plain state dicts")
    p.add_argument("--num-classes", type=int, help="for plain state dicts (default: their classifier's size)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def landscape_table(report: dict) -> list[str]:
    """One line per checkpoint: loss at 0, mean +- std rise at each radius, top Hessian eigenvalue."""
    radii = report["settings"]["radii"]
    width = max(len(e["path"]) for e in report["checkpoints"])
    head = [f"{'checkpoint':<{width}}", f"{'kind':<8}", f"{'loss@0':>8}", *(f"{f'rise@{r:g}':>19}" for r in radii),
            f"{'lambda_max':>14}"]
    lines = ["  ".join(head)]
    for e in report["checkpoints"]:
        r, h = e["radius"], e["hessian"]
        rises = (f"{f'{m:.4f} +- {s:.4f}':>19}" for m, s in zip(r["rise_mean"], r["rise_std"]))
        lam = "-" if h is None else f"{h['top_eigenvalue']:.4g} ({h['iterations']} it)"
        lines.append("  ".join([f"{e['path']:<{width}}", f"{e['kind']:<8}", f"{e['loss0']:>8.4f}", *rises,
                                f"{lam:>14}"]))
    return lines


def landscape_main(argv: list[str]) -> int:
    args = parse_landscape_args(argv)
    settings = LandscapeSettings(
        split=args.split, images=args.images, seed=args.seed, grid=args.grid, span=args.span,
        directions=args.directions, radii=tuple(args.radii), hessian_images=args.hessian_images,
        hessian_iters=args.hessian_iters, hessian_tol=args.hessian_tol, batch_size=args.batch_size,
        img_size=args.img_size, crop_pct=args.crop_pct)

    def _run() -> None:
        report, files = run_landscape(args.checkpoints, args.data, args.out, settings, args.model, args.num_classes,
                                      args.device, progress=sys.stderr.isatty())
        print("\n".join(landscape_table(report)))
        print(f"{len(report['subset_indices'])} {args.split} images, {report['seconds']:.1f} s")
        for path in files:
            print(f"wrote {path}")

    return run_cli(_run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "landscape":
        return landscape_main(argv[1:])
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
