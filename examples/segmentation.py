#!/usr/bin/env python
"""RefConv in a segmenter's training loop: torchvision's LR-ASPP (MobileNetV3-Large), fused at the end.

What a user copies: the backbone comes with trained weights (``weights_backbone=...IMAGENET1K_V1``, here the
stand-in of examples/pretrain_backbone.py), RefConv goes on the backbone (the LR-ASPP head has no spatial convs: all
1x1), a plain loop trains with per-pixel cross-entropy (torchvision's segmentation reference) under
``with transform.step():``, ``fuse_model`` turns it back into torchvision's LR-ASPP, which loads strictly into a
freshly built one and predicts the same masks. ``--method`` trains any registered method instead (the paper's
comparison methods, or your own), through the same loop and the same registry entry::

    python examples/fashion_canvases.py --src /usr/share/datasets/fashion-mnist      # data/fashion_canvases
    python examples/pretrain_backbone.py --src /usr/share/datasets/fashion-mnist     # data/torch_home
    TORCH_HOME=data/torch_home python examples/segmentation.py --data data/fashion_canvases
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F
from torchvision.models import MobileNet_V3_Large_Weights
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from refconv_train import fuse_model, methods

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_segmenter(num_classes: int) -> torch.nn.Module:
    """torchvision's builder as a user calls it."""
    return lraspp_mobilenet_v3_large(weights=None, num_classes=num_classes,
                                     weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W)`` gray canvases -> normalized ``(N, 3, H, W)``, as the ImageNet weights expect."""
    x = images.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Per-pixel logits ``(N, classes, H, W)``."""
    model.eval()
    return torch.cat([model(to_input(images[i:i + batch]))["out"] for i in range(0, len(images), batch)])


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over classes (background included) of intersection / union, from the confusion matrix."""
    confusion = torch.bincount(target.reshape(-1).long() * num_classes + pred.reshape(-1).long(),
                               minlength=num_classes ** 2).reshape(num_classes, num_classes).double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    return float((confusion.diag()[present] / union[present]).mean())


# An exact start where a method offers one (RefConv: W_r = 0), and RefConv's step normalisation: options a method
# lacks are left out, so every method runs with its own defaults otherwise.
PREFERRED_OPTIONS = {"init": "zeros", "step_norm": "layer"}


def reparameterize(model: torch.nn.Module, method: str, example: torch.Tensor) -> tuple[int, object, list]:
    """Any registered method on the backbone, through its registry entry; (layers, per-step hook, optimizer groups)."""
    entry = methods.get(method)
    fields = {f.name for f in dataclasses.fields(entry.options)}
    options = entry.options(**{k: v for k, v in PREFERRED_OPTIONS.items() if k in fields})
    report = entry.apply(model.backbone, options, example=example)  # example: finds conv -> BN pairs
    transform = entry.per_step(model, options, False)  # RefConv: W_t once per optimizer step
    return len(report.layers), transform, entry.param_groups(model, options)


def run(train: dict, val: dict, steps: int = 150, batch: int = 8, lr: float = 0.02, method: str = "refconv",
        seed: int = 0, log_every: int = 25) -> dict:
    """Train the re-parameterized segmenter on ``train``, fuse, reload strictly, compare; returns the numbers."""
    torch.manual_seed(seed)
    num_classes = len(train["classes"]) + 1  # + background
    model = build_segmenter(num_classes)
    layers, transform, groups = reparameterize(model, method, to_input(train["images"][:2]))
    for group in groups:  # a plain optimizer: apply the groups' lr_scale ourselves (timm's schedulers would)
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=4e-5)
    background = torch.zeros_like(val["masks"])
    result = {"method": method, "layers": layers,
              "miou_all_background": mean_iou(background, val["masks"], num_classes),
              "miou_before": mean_iou(predict(model, val["images"]).argmax(1), val["masks"], num_classes)}
    g = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(train["images"]), (batch,), generator=g)
        model.train()
        with transform.step() if transform else contextlib.nullcontext():
            loss = F.cross_entropy(model(to_input(train["images"][idx]))["out"], train["masks"][idx].long())
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
    trained = predict(model, val["images"])
    result["miou_after"] = mean_iou(trained.argmax(1), val["masks"], num_classes)

    fuse_model(model)  # in place, whatever the model holds: torchvision's LR-ASPP again
    fresh = build_segmenter(num_classes)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fused = predict(fresh, val["images"])
    result["fused_max_abs_diff"] = (fused - trained).abs().max().item()  # logits
    result["logit_scale"] = max(1.0, trained.abs().max().item())  # fp32 rounding grows with the logits
    result["fused_mask_pixels_changed"] = int((fused.argmax(1) != trained.argmax(1)).sum())
    return result


def main(argv: list[str] | None = None) -> int:
    from fashion_canvases import load_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/fashion_canvases", help="output of examples/fashion_canvases.py")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--method", default="refconv", help="a registered method: refconv, acb, repvgg, dbb, wn, ...")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    result = run(load_split(args.data, "train"), load_split(args.data, "val"), args.steps, args.batch, args.lr,
                 args.method)
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["fused_max_abs_diff"] <= 1e-4 * result["logit_scale"] else 1


if __name__ == "__main__":
    sys.exit(main())
