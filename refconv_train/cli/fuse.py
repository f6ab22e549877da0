"""refconv-fuse CKPT [-o OUT]: a RefConv training checkpoint -> the original architecture, verified numerically."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from ..checkpoint import atomic_save, fused_checkpoint
from ..config import config_to_dict
from ..errors import RefconvError
from ..fusing import fuse_and_verify
from ..restore import restore_refocus_training
from .common import run_cli

FORMATS = ("pth", "safetensors", "onnx")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refconv-fuse", description=__doc__)
    p.add_argument("checkpoint", help="last.pth / best.pth of a refocus run")
    p.add_argument("-o", "--output", help="fused checkpoint path (default: <CKPT stem>_fused.pth next to CKPT)")
    p.add_argument("--format", nargs="+", default=["pth", "safetensors"], choices=FORMATS,
                   help="what to write: the .pth checkpoint, its .safetensors twin, an .onnx export")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed max |RefConv - fused| output (fp32)")
    p.add_argument("--img-size", type=int, help="verification/export input size (default: the run's data.img_size)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    return p.parse_args(argv)


def fuse_checkpoint(args: argparse.Namespace) -> list[Path]:
    ckpt = Path(args.checkpoint)
    out = Path(args.output) if args.output else ckpt.with_name(f"{ckpt.stem}_fused.pth")
    if out.suffix in (".safetensors", ".onnx"):  # -o names the set of outputs: each format gets its own suffix
        out = out.with_suffix(".pth")
    targets = {"pth": out, "safetensors": out.with_suffix(".safetensors"), "onnx": out.with_suffix(".onnx")}
    targets = {fmt: targets[fmt] for fmt in dict.fromkeys(args.format)}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not args.force:
        raise RefconvError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force to "
                           f"overwrite or -o another path")
    restored = restore_refocus_training(ckpt)
    cfg = restored.config
    img_size = args.img_size or cfg.data.img_size
    result = fuse_and_verify(restored.model, restored.arch, restored.num_classes, img_size, atol=args.atol)
    print(f"max_abs_diff={result.max_abs_diff:.3g} (atol {args.atol:g}, fp32, eval mode, random inputs, "
          f"trained and randomized norm statistics)")
    for fmt, path in targets.items():
        if fmt == "pth":
            atomic_save(fused_checkpoint(result.model, restored.arch, restored.num_classes, config_to_dict(cfg),
                                         result.max_abs_diff), path)
        elif fmt == "safetensors":
            from ..checkpoint import atomic_save_safetensors

            atomic_save_safetensors(result.model.state_dict(), path)
        else:
            export_onnx(result.model, img_size, path)
        print(f"wrote {path}")
    return list(targets.values())


def export_onnx(model: torch.nn.Module, img_size: int, path: Path) -> None:
    """ONNX export of the fused model with a dynamic batch axis (``pip install .[onnx]``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(model.eval(), (torch.randn(1, 3, img_size, img_size),), str(tmp), dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: fuse_checkpoint(args) and None)


if __name__ == "__main__":
    sys.exit(main())
