#!/usr/bin/env python
"""Turn Fashion-MNIST's four IDX files into ImageFolder trees: OUT/{train,holdout,val}/<class>/*.png.

train/ comes from the training files, val/ from the t10k (test) files; each may be .gz or plain. With
--holdout-per-class K the last K training images of each class (in file order) go to holdout/ instead of train/:
a split to choose settings on, so that the test images are only reported, never tuned on. With
--train-per-class / --val-per-class only the first N images of each class (in file order) are kept. Class folders
are 0_tshirt, 1_trouser, ... (sorted = label order). OUT/spec.json records what was written: a rerun with the same
arguments skips the work, other arguments rewrite the trees, and a folder with other data is never touched.

Debian/Ubuntu: apt-get install dataset-fashion-mnist puts the files in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
CLASSES = ["0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker", "8_bag",
           "9_ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPEC_FILE = "spec.json"
GENERATOR = "scripts/prepare_fashion_mnist.py/1"


class PrepareError(Exception):
    """Bad input: printed as one ``error: ...`` line."""


def find_file(src: Path, name: str) -> Path:
    """``src/name`` or ``src/name.gz``."""
    for candidate in (src / name, src / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise PrepareError(f"Fashion-MNIST file {name}[.gz] not found in '{src}': pass --src with the folder holding "
                       f"the four IDX files (apt-get install dataset-fashion-mnist puts them in {DEFAULT_SRC})")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080N, N dimensions, big-endian int32 sizes) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PrepareError(f"cannot read '{path}' ({e}): the file is damaged, download it again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise PrepareError(f"'{path}' is not an IDX file of unsigned bytes (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PrepareError(f"'{path}' is truncated (header incomplete)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise PrepareError(f"'{path}' holds {len(data) - header} bytes of data, its header says {shape}: truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images, labels = read_idx(find_file(src, images_name)), read_idx(find_file(src, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise PrepareError(f"{split}: images {images.shape} and labels {labels.shape} do not match "
                           "(expected (N, H, W) and (N,))")
    if labels.size and labels.max() >= len(CLASSES):
        raise PrepareError(f"{split}: label {labels.max()} out of range 0..{len(CLASSES) - 1}")
    return images, labels


def select(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in file order (all of them for None)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    return np.sort(keep)


def select_among(labels: np.ndarray, allowed: np.ndarray, per_class: int | None) -> np.ndarray:
    """:func:`select` restricted to the indices in ``allowed`` (the training images left after the holdout)."""
    return allowed[select(labels[allowed], per_class)]


def write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> dict:
    counts = [0] * len(CLASSES)
    for name in CLASSES:
        (out / split / name).mkdir(parents=True)
    for i in indices:
        label = int(labels[i])
        Image.fromarray(images[i]).save(out / split / CLASSES[label] / f"{i:05d}.png")
        counts[label] += 1
    return dict(zip(CLASSES, counts))


def holdout_split(labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) indices: the last ``per_class`` images of every class are held out, in file order."""
    held = [np.flatnonzero(labels == c)[len(np.flatnonzero(labels == c)) - per_class:] for c in range(len(CLASSES))]
    held = np.sort(np.concatenate(held)) if per_class else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), held), held


def prepare(src: Path, out: Path, train_per_class: int | None, val_per_class: int | None,
            force: bool = False, holdout_per_class: int = 0) -> tuple[dict, bool]:
    """Write the trees; returns (spec, written). ``written`` is False when ``out`` was already up to date."""
    for name, value in (("--train-per-class", train_per_class), ("--val-per-class", val_per_class)):
        if value is not None and value < 1:
            raise PrepareError(f"{name} must be >= 1, got {value}")
    if holdout_per_class < 0:
        raise PrepareError(f"--holdout-per-class must be >= 0, got {holdout_per_class}")
    wanted = {"generator": GENERATOR, "src": str(src.resolve()), "train_per_class": train_per_class,
              "val_per_class": val_per_class, "holdout_per_class": holdout_per_class}
    spec_path = out / SPEC_FILE
    old = _read_spec(spec_path)
    if not force and old is not None and {k: old.get(k) for k in wanted} == wanted:
        return old, False
    splits = {split: read_split(src, split) for split in FILES}  # read everything before deleting anything
    train_labels = splits["train"][1]
    smallest = min(np.bincount(train_labels, minlength=len(CLASSES)))
    if holdout_per_class >= smallest:
        raise PrepareError(f"--holdout-per-class {holdout_per_class} leaves no training images in the smallest class "
                           f"({smallest} images): hold out fewer")
    for split in (*FILES, "holdout"):
        if (out / split).exists():
            if old is None:
                raise PrepareError(f"'{out / split}' exists and was not written by this script (no {SPEC_FILE}): "
                                   "choose an empty --out folder")
            shutil.rmtree(out / split)
    spec_path.unlink(missing_ok=True)  # written last: an interrupted run leaves no spec, so a rerun redoes it
    spec = dict(wanted)
    train_idx, holdout_idx = holdout_split(train_labels, holdout_per_class)
    chosen = {"train": select_among(train_labels, train_idx, train_per_class),
              "val": select(splits["val"][1], val_per_class)}
    if holdout_per_class:
        chosen["holdout"] = holdout_idx
    for split, indices in chosen.items():
        images, labels = splits["train" if split == "holdout" else split]
        spec[f"{split}_counts"] = write_split(out, split, images, labels, indices)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    return spec, True


def _read_spec(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=DEFAULT_SRC, help="folder with the four IDX files (default: %(default)s)")
    parser.add_argument("--out", default="data/fashion_mnist", help="output root (gets train/, val/, spec.json)")
    parser.add_argument("--train-per-class", type=int, help="keep the first N training images per class (all)")
    parser.add_argument("--val-per-class", type=int, help="keep the first N test images per class (all)")
    parser.add_argument("--holdout-per-class", type=int, default=0,
                        help="move the last K training images per class to OUT/holdout/ (default: none)")
    parser.add_argument("--force", action="store_true", help="rewrite even if OUT is up to date")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        spec, written = prepare(Path(args.src), Path(args.out), args.train_per_class, args.val_per_class, args.force,
                                args.holdout_per_class)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_train, n_val = sum(spec["train_counts"].values()), sum(spec["val_counts"].values())
    held = sum(spec.get("holdout_counts", {}).values())
    what = f"wrote {n_train} train + {n_val} val images" if written else "already up to date"
    what += f" (+ {held} holdout)" if written and held else ""
    print(f"{args.out}: {what}, {len(CLASSES)} classes ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
