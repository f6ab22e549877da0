"""refconv-fuse CKPT [-o OUT]: a RefConv (or ACB, RepVGG, DBB, WN, CWN, OWN) training checkpoint -> the original
architecture, verified numerically."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import config_to_dict
from ..errors import RefconvError
from ..run.fusing import FORMATS, fuse_and_verify, fused_outputs, write_fused
from ..run.restore import restore_reparam_training
from .common import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refconv-fuse", description=__doc__)
    p.add_argument("checkpoint", help="last.pth / best.pth of a run of any method but none")
    p.add_argument("-o", "--output", help="fused checkpoint path (default: <CKPT stem>_fused.pth next to CKPT)")
    p.add_argument("--format", nargs="+", default=["pth", "safetensors"], choices=FORMATS,
                   help="what to write: the .pth checkpoint, its .safetensors twin, an .onnx export")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed max |trained - fused| output (fp32), per unit of the output's scale (max "
                        "|output|) when that exceeds 1")
    p.add_argument("--img-size", type=int, help="verification/export input size (default: the run's data.img_size)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    return p.parse_args(argv)


def fuse_checkpoint(args: argparse.Namespace) -> list[Path]:
    ckpt = Path(args.checkpoint)
    outputs = fused_outputs(args.output or ckpt.with_name(f"{ckpt.stem}_fused.pth"), tuple(args.format))
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.force:
        raise RefconvError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force to "
                           f"overwrite or -o another path")
    restored = restore_reparam_training(ckpt)
    img_size = args.img_size or restored.config.data.img_size
    result = fuse_and_verify(restored.model, restored.arch, restored.num_classes, img_size, atol=args.atol,
                             model_kwargs=restored.config.model.kwargs)
    print(f"max_abs_diff={result.max_abs_diff:.3g} (atol {args.atol:g} x output scale {result.output_scale:.3g}, "
          f"fp32, eval mode, random inputs, trained and randomized norm statistics)")
    written = write_fused(result, outputs, restored.arch, restored.num_classes, config_to_dict(restored.config),
                          img_size)
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: fuse_checkpoint(args) and None)


if __name__ == "__main__":
    sys.exit(main())
