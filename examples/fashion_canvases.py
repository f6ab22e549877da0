#!/usr/bin/env python
"""A small detection + segmentation set: Fashion-MNIST items pasted onto larger black canvases, boxes and masks known.

Deterministic (a seeded generator): the same arguments give the same tensors. Each canvas holds 1 to 3 items of the
chosen classes, each scaled to 24-40 px and placed without overlap; an item's mask is its pixels brighter than
``MASK_LEVEL``, its box the mask's extent. Written to ``OUT/{train,val}.pt`` (``torch.load(weights_only=True)``):

- ``images``: uint8 ``(N, S, S)``; ``masks``: uint8 ``(N, S, S)``, 0 = background, ``k + 1`` = ``classes[k]``;
- ``boxes``: a list of float ``(n_i, 4)`` tensors (x1, y1, x2, y2, pixels); ``labels``: a list of int64 ``(n_i,)``
  tensors (1-based, 0 is background as torchvision's detectors expect);
- ``classes``: the Fashion-MNIST class ids used.

train/ items come from the training IDX files, val/ items from the t10k files::

    python examples/fashion_canvases.py --src /usr/share/datasets/fashion-mnist --out data/fashion_canvases
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
CLASSES = (1, 5, 8, 9)  # trouser, sandal, bag, ankle boot: shapes a small model tells apart in minutes
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MASK_LEVEL = 40  # of 255


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (plain or .gz) as a uint8 array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError(f"'{path}' is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_items(src: Path, split: str, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's 28x28 items of ``classes`` and their 0-based index into ``classes``."""
    arrays = []
    for name in FILES[split]:
        path = next((p for p in (src / name, src / f"{name}.gz") if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in '{src}': pass --src "
                                    f"(apt-get install dataset-fashion-mnist puts them in {DEFAULT_SRC})")
        arrays.append(read_idx(path))
    images, labels = arrays
    keep = np.isin(labels, classes)
    index = {c: i for i, c in enumerate(classes)}
    return torch.from_numpy(images[keep].copy()), torch.tensor([index[int(c)] for c in labels[keep]])


def paste(items: torch.Tensor, labels: torch.Tensor, count: int, size: int, seed: int,
          per_canvas: tuple[int, int] = (1, 3), scale: tuple[int, int] = (24, 40)) -> dict:
    """``count`` canvases of ``size`` px, each with ``per_canvas`` items drawn from ``items`` (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, size, size, dtype=torch.uint8)
    masks = torch.zeros(count, size, size, dtype=torch.uint8)
    boxes, box_labels = [], []
    for i in range(count):
        n = int(torch.randint(per_canvas[0], per_canvas[1] + 1, (), generator=g))
        taken: list[tuple[int, int, int, int]] = []
        rows, cls = [], []
        for _ in range(n):
            k = int(torch.randint(len(items), (), generator=g))
            side = int(torch.randint(scale[0], scale[1] + 1, (), generator=g))
            item = F.interpolate(items[k][None, None].float(), size=(side, side), mode="bilinear",
                                 align_corners=False)[0, 0].round().clamp(0, 255).to(torch.uint8)
            for _ in range(20):  # a free spot, else the item is dropped
                y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
                if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s, _ in taken):
                    break
            else:
                continue
            taken.append((x, y, side, k))
            on = item > MASK_LEVEL
            if not on.any():
                continue
            region = images[i, y:y + side, x:x + side]
            images[i, y:y + side, x:x + side] = torch.maximum(region, item)
            masks[i, y:y + side, x:x + side][on] = int(labels[k]) + 1
            ys, xs = torch.nonzero(on, as_tuple=True)
            rows.append([x + xs.min().item(), y + ys.min().item(), x + xs.max().item() + 1, y + ys.max().item() + 1])
            cls.append(int(labels[k]) + 1)
        boxes.append(torch.tensor(rows, dtype=torch.float32).reshape(-1, 4))
        box_labels.append(torch.tensor(cls, dtype=torch.int64))
    return {"images": images, "masks": masks, "boxes": boxes, "labels": box_labels}


def build(src: Path, out: Path, train: int, val: int, size: int, classes: tuple[int, ...] = CLASSES,
          seed: int = 0) -> dict:
    """Write ``OUT/train.pt``, ``OUT/val.pt`` and ``OUT/spec.json``; a rerun with the same spec does nothing."""
    spec = {"generator": "examples/fashion_canvases.py/1", "src": str(src.resolve()), "train": train, "val": val,
            "size": size, "classes": list(classes), "seed": seed}
    spec_path = out / "spec.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return spec
    out.mkdir(parents=True, exist_ok=True)
    spec_path.unlink(missing_ok=True)
    for split, count, split_seed in (("train", train, seed), ("val", val, seed + 1)):
        items, labels = read_items(src, split, classes)
        data = paste(items, labels, count, size, split_seed)
        data["classes"] = list(classes)
        torch.save(data, out / f"{split}.pt")
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def load_split(root: str | Path, split: str) -> dict:
    return torch.load(Path(root) / f"{split}.pt", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=DEFAULT_SRC, help="folder with the four IDX files (default: %(default)s)")
    p.add_argument("--out", default="data/fashion_canvases")
    p.add_argument("--train", type=int, default=2000, help="training canvases (default: %(default)s)")
    p.add_argument("--val", type=int, default=300, help="validation canvases (default: %(default)s)")
    p.add_argument("--size", type=int, default=96, help="canvas side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        build(Path(args.src), Path(args.out), args.train, args.val, args.size, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.train} train + {args.val} val canvases of {args.size} px, classes "
          f"{', '.join(NAMES[c] for c in CLASSES)} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
