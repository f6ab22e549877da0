#!/usr/bin/env python
"""RefConv in a detector's training loop: torchvision's SSDLite (MobileNetV3-Large), its own losses, fused at the end.

What a user copies: the backbone comes with trained weights (``weights_backbone=...IMAGENET1K_V1``, here the
stand-in of examples/pretrain_backbone.py), RefConv goes on the backbone's trained convs only (the detection heads
and SSDLite's extra layers start from a random init: nothing to refocus there), a plain loop trains with the model's
own loss dict under ``with transform.step():``, ``fuse_model`` turns it back into torchvision's SSDLite, which loads
strictly into a freshly built one and detects the same boxes with the same scores::

    python examples/fashion_canvases.py --src /usr/share/datasets/fashion-mnist      # data/fashion_canvases
    python examples/pretrain_backbone.py --src /usr/share/datasets/fashion-mnist     # data/torch_home
    TORCH_HOME=data/torch_home python examples/detection.py --data data/fashion_canvases
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torchvision.models import MobileNet_V3_Large_Weights
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.ops import box_iou

from refconv_train import fuse_model, refocus_model
from refconv_train.methods.refconv import refocus_param_groups
from refconv_train.methods.refconv.per_step import PerStepTransform


def build_detector(num_classes: int, size: int) -> torch.nn.Module:
    """torchvision's builder as a user calls it; only the input size shrinks from 320 px (CPU minutes)."""
    model = ssdlite320_mobilenet_v3_large(weights=None, num_classes=num_classes,
                                          weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
    model.transform.min_size, model.transform.max_size, model.transform.fixed_size = (size,), size, (size, size)
    return model


def batches(data: dict, batch: int, steps: int, seed: int):
    """``steps`` random batches of (images as [3, H, W] floats in 0-1, targets) from a split."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data["images"]), (batch,), generator=g).tolist()
        yield images_of(data, idx), [{"boxes": data["boxes"][i], "labels": data["labels"][i]} for i in idx]


def images_of(data: dict, idx: list[int]) -> list[torch.Tensor]:
    return [data["images"][i].float().div(255).expand(3, -1, -1) for i in idx]


@torch.no_grad()
def detect(model: torch.nn.Module, data: dict, batch: int = 32) -> list[dict]:
    model.eval()
    out = []
    for start in range(0, len(data["images"]), batch):
        out += model(images_of(data, list(range(start, min(start + batch, len(data["images"]))))))
    return out


def mean_ap(detections: list[dict], data: dict, num_classes: int, iou: float = 0.5) -> float:
    """mAP at one IoU threshold, all-point interpolated (PASCAL VOC 2010+), over classes with ground truth."""
    aps = []
    for c in range(1, num_classes):
        scores, hits, n_gt = [], [], 0
        for det, boxes, labels in zip(detections, data["boxes"], data["labels"]):
            gt = boxes[labels == c]
            n_gt += len(gt)
            keep = det["labels"] == c
            pred, score = det["boxes"][keep], det["scores"][keep]
            order = score.argsort(descending=True)
            ious = box_iou(pred[order], gt) if len(gt) else torch.zeros(len(pred), 0)
            free = torch.ones(len(gt), dtype=torch.bool)
            for row, s in zip(ious, score[order]):
                best = int(row.masked_fill(~free, -1).argmax()) if len(gt) else -1
                hit = best >= 0 and bool(row[best] >= iou) and bool(free[best])
                if hit:
                    free[best] = False
                scores.append(float(s))
                hits.append(hit)
        if n_gt == 0:
            continue
        order = torch.tensor(scores).argsort(descending=True)
        tp = torch.tensor(hits, dtype=torch.float64)[order].cumsum(0)
        precision = tp / torch.arange(1, len(tp) + 1)
        recall = torch.cat([torch.zeros(1), tp / n_gt])
        envelope = torch.cat([precision.flip(0).cummax(0).values.flip(0), torch.zeros(1)])
        aps.append(float(((recall[1:] - recall[:-1]) * envelope[:-1]).sum()) if len(tp) else 0.0)
    return sum(aps) / len(aps) if aps else 0.0


def same_detections(a: list[dict], b: list[dict]) -> float:
    """Max abs difference of boxes and scores of two models' detections (inf when they differ in number or label)."""
    diff = 0.0
    for x, y in zip(a, b, strict=True):
        if len(x["boxes"]) != len(y["boxes"]) or not torch.equal(x["labels"], y["labels"]):
            return float("inf")
        for key in ("boxes", "scores"):
            if len(x[key]):
                diff = max(diff, (x[key] - y[key]).abs().max().item())
    return diff


def run(train: dict, val: dict, steps: int = 150, batch: int = 8, size: int = 96, lr: float = 0.02,
        seed: int = 0, log_every: int = 25) -> dict:
    """Train the refocused detector on ``train``, fuse, reload strictly, compare; returns the measured numbers."""
    torch.manual_seed(seed)
    num_classes = len(train["classes"]) + 1  # + background
    model = build_detector(num_classes, size)
    # RefConv on the backbone's trained convs only: SSDLite's extra layers and heads are a fresh init.
    report = refocus_model(model.backbone.features, init="zeros")
    groups = refocus_param_groups(model, step_norm="layer")  # each W_r at lr / (its layer's step gain)
    for group in groups:  # a plain optimizer: apply the groups' lr_scale ourselves (timm's schedulers would)
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=4e-5)
    transform = PerStepTransform(model)  # W_t once per optimizer step
    result = {"refocused": len(report.layers), "map50_before": mean_ap(detect(model, val), val, num_classes)}
    losses = []
    start = time.perf_counter()
    for step, (images, targets) in enumerate(batches(train, batch, steps, seed)):
        model.train()
        with transform.step():
            loss_dict = model(images, targets)  # SSD's own losses: box regression + classification
            loss = sum(loss_dict.values())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    result["train_s"] = time.perf_counter() - start
    window = max(1, min(20, steps // 5))
    result["loss_first"], result["loss_last"] = sum(losses[:window]) / window, sum(losses[-window:]) / window
    result["losses"] = losses
    trained = detect(model, val)
    result["map50_after"] = mean_ap(trained, val, num_classes)

    fuse_model(model)  # in place: torchvision's SSDLite again, W_t as plain weights
    fresh = build_detector(num_classes, size)
    fresh.load_state_dict(model.state_dict(), strict=True)
    result["fused_max_abs_diff"] = same_detections(trained, detect(fresh, val))
    return result


def main(argv: list[str] | None = None) -> int:
    from fashion_canvases import load_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fashion_canvases", help="output of examples/fashion_canvases.py")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=96, help="input size (SSDLite's own: 320)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = run(load_split(args.data, "train"), load_split(args.data, "val"), args.steps, args.batch, args.size,
                 args.lr)
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["fused_max_abs_diff"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
