#!/usr/bin/env python
"""A stand-in for ImageNet weights: torchvision's mobilenet_v3_large trained briefly to classify Fashion-MNIST items.

RefConv refocuses *trained* kernels. The examples build their detector and segmenter the way a user would,
``weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1``; torchvision then reads that file from the hub cache,
``$TORCH_HOME/hub/checkpoints/mobilenet_v3_large-8738ca79.pth``, when it is there (the hub is unreachable here).
This script writes its trained weights to exactly that path, so the examples run unchanged with the real ImageNet
weights (delete the file, or point ``TORCH_HOME`` elsewhere) or with these. Full width, 1000 outputs (the
file's shape; labels 0-9 use the first ten), items of all ten classes pasted onto 64 px canvases::

    python examples/pretrain_backbone.py --src /usr/share/datasets/fashion-mnist --torch-home data/torch_home
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from fashion_canvases import DEFAULT_SRC, paste, read_items

HUB_FILE = "hub/checkpoints/mobilenet_v3_large-8738ca79.pth"  # MobileNet_V3_Large_Weights.IMAGENET1K_V1's name
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W)`` gray canvases -> normalized float ``(N, 3, H, W)``, as the ImageNet weights expect."""
    x = images.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def pretrain(src: Path, steps: int, batch: int = 64, size: int = 64, lr: float = 2e-3,
             seed: int = 0) -> tuple[dict, list[float], float]:
    """Train and return (state dict, per-step losses, accuracy on 500 held-out t10k canvases)."""
    torch.manual_seed(seed)
    items, labels = read_items(src, "train", tuple(range(10)))
    test_items, test_labels = read_items(src, "val", tuple(range(10)))
    model = torchvision.models.mobilenet_v3_large(num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    losses = []
    model.train()
    for step in range(steps):
        x, y = canvases(items, labels, batch, size, seed=seed * 100_003 + step)
        loss = F.cross_entropy(model(to_input(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    recalibrate_bn(model, items, labels, batch, size, seed)
    model.eval()
    x, y = canvases(test_items, test_labels, 500, size, seed=-1 - seed)
    with torch.no_grad():
        accuracy = (model(to_input(x)).argmax(1) == y).float().mean().item()
    return model.state_dict(), losses, accuracy


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, items: torch.Tensor, labels: torch.Tensor, batch: int, size: int,
                   seed: int, batches: int = 20) -> None:
    """BatchNorm statistics of the final weights: torchvision's momentum 0.01 lags far behind a short run's."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    model.train()
    for i in range(batches):
        model(to_input(canvases(items, labels, batch, size, seed=-10_000 - i)[0]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.01


def canvases(items: torch.Tensor, labels: torch.Tensor, count: int, size: int, seed: int):
    """``count`` single-item canvases and their labels."""
    data = paste(items, labels, count, size, seed=seed % 2**62, per_canvas=(1, 1), scale=(size * 3 // 8, size * 3 // 4))
    y = torch.stack([lab[0] - 1 if len(lab) else torch.tensor(0) for lab in data["labels"]])
    return data["images"], y


def install(state: dict, torch_home: Path) -> Path:
    """Write ``state`` where torchvision's hub cache looks for IMAGENET1K_V1 under ``torch_home``."""
    path = torch_home / HUB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=DEFAULT_SRC, help="folder with the four IDX files (default: %(default)s)")
    p.add_argument("--torch-home", default="data/torch_home", help="TORCH_HOME the examples use (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    start = time.perf_counter()
    state, losses, accuracy = pretrain(Path(args.src), args.steps, args.batch)
    path = install(state, Path(args.torch_home))
    print(f"{path}: {args.steps} steps, loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}, "
          f"held-out accuracy {100 * accuracy:.1f}% ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
