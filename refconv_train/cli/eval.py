"""refconv-eval --data ROOT --checkpoint CKPT: top-1/top-5 on an ImageFolder split, each image counted once."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .. import data as data_lib
from ..distributed import cleanup, init_distributed
from ..engine import StepSettings, evaluate
from ..run.restore import restore_any
from .common import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refconv-eval", description=__doc__)
    p.add_argument("--data", required=True, help="dataset root holding <split>/<class>/*.jpg")
    p.add_argument("--checkpoint", help="fused, RefConv or baseline checkpoint, or a plain state dict (with --model)")
    p.add_argument("--model", help="architecture for a plain state dict, or library weights without --checkpoint")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=100, help="per process")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--img-size", type=int, help="default: the checkpoint's config, else 224")
    p.add_argument("--crop-pct", type=float, help="default: the checkpoint's config, else 0.875")
    p.add_argument("--num-classes", type=int, help="for a plain state dict (default: its classifier's size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", help="also write the result (and model, checkpoint, split, time) to this file")
    return p.parse_args(argv)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    dist = init_distributed(args.device)
    restored = restore_any(args.checkpoint, args.model, args.num_classes)
    cfg = restored.config
    img_size = args.img_size or (cfg.data.img_size if cfg else 224)
    crop_pct = args.crop_pct or (cfg.data.crop_pct if cfg else 0.875)
    mean, std = (tuple(cfg.data.mean), tuple(cfg.data.std)) if cfg else (data_lib.IMAGENET_MEAN,
                                                                         data_lib.IMAGENET_STD)
    transform = data_lib.build_transform(img_size, False, crop_pct)
    dataset = data_lib.build_dataset(args.data, args.split, transform, restored.num_classes)
    loader = data_lib.build_loader(dataset, args.batch_size, train=False, workers=args.workers,
                                   distributed=dist.distributed, rank=dist.rank, world_size=dist.world_size,
                                   seed=0, pin_memory=dist.device.type == "cuda")
    model = restored.model.to(dist.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    settings = StepSettings(device=dist.device, amp=args.amp, channels_last=args.channels_last, mean=mean, std=std)
    result = evaluate(model, loader, settings, show_progress=dist.is_main)
    out = {"top1": result.top1, "top5": result.top5, "loss": result.loss, "images": result.images,
           "img_per_s": result.images_per_second, "model": restored.arch, "kind": restored.kind,
           "checkpoint": args.checkpoint, "split": args.split, "img_size": img_size,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "line": result.line()}
    if dist.is_main:
        print(f"model={restored.arch} kind={restored.kind} checkpoint={args.checkpoint} split={args.split}")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(result.line())
    cleanup()  # only after success: with a dead peer, teardown can block (see Trainer.run)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: evaluate_checkpoint(args) and None)


if __name__ == "__main__":
    sys.exit(main())
