"""A small, deterministic, learnable ImageFolder data set drawn with PIL, for demos, smoke runs and tests.

Each class is one shape or texture (circle, square, stripes, ...) drawn at a random position, scale, rotation and in
random colours, with Gaussian pixel noise, and saved as JPEG. Colour carries no class information, so a model has to
learn shapes; orientation-sensitive classes (stripes, crosses) only rotate a little so that they stay distinct, even
under horizontal flips. Every image has its own seeded generator, so the bytes only depend on the spec.
"""

from __future__ import annotations

import colorsys
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from refconv_train.errors import RefconvError

JPEG_QUALITY = 90
SPEC_FILE = "spec.json"
GENERATOR = "refconv_train.demo_data/1"



def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Random foreground/background colours with enough luminance contrast to be visible through the noise."""
    while True:
        fg, bg = (colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.1, 1.0)) for _ in range(2))
        if abs(np.dot(fg, (0.299, 0.587, 0.114)) - np.dot(bg, (0.299, 0.587, 0.114))) > 0.3:
            return tuple(int(255 * c) for c in fg), tuple(int(255 * c) for c in bg)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at equal angular steps around (cx, cy), rotated by ``angle``, with the given distances."""
    n = len(radii)
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, angle: float, fg: tuple) -> None:
    width = max(2, int(r * 0.45))
    for a in (angle, angle + math.pi / 2):
        dx, dy = r * math.cos(a), r * math.sin(a)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=width)


def _shape(kind: str) -> Callable[[np.random.Generator, int, tuple, tuple], Image.Image]:
    """Filled shapes, drawn with PIL at a random place, size and rotation."""

    def draw_one(rng: np.random.Generator, size: int, fg: tuple, bg: tuple) -> Image.Image:
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.2, 0.36) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif kind == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
        elif kind == "square":
            draw.polygon(_polygon(cx, cy, [r * 1.1] * 4, angle), fill=fg)
        elif kind == "triangle":
            draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, angle), fill=fg)
        elif kind == "star":
            draw.polygon(_polygon(cx, cy, [r * 1.15, r * 0.45] * 5, angle), fill=fg)
        elif kind == "cross":  # upright "+" (small tilt only, so it never becomes an "x")
            _cross(draw, cx, cy, r, rng.uniform(-0.25, 0.25), fg)
        elif kind == "xcross":
            _cross(draw, cx, cy, r, math.pi / 4 + rng.uniform(-0.25, 0.25), fg)
        return img

    return draw_one


def _texture(kind: str) -> Callable[[np.random.Generator, int, tuple, tuple], Image.Image]:
    """Periodic textures filling a random box, computed on a rotated pixel grid with numpy."""

    def draw_one(rng: np.random.Generator, size: int, fg: tuple, bg: tuple) -> Image.Image:
        half = rng.uniform(0.25, 0.45, size=2) * size
        cx, cy = rng.uniform(half, size - half)
        period = rng.uniform(0.1, 0.18) * size
        tilt = {"diagonal": math.pi / 4}.get(kind, 0.0) + rng.uniform(-0.2, 0.2)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        u = (xx - cx) * math.cos(tilt) + (yy - cy) * math.sin(tilt) + rng.uniform(0, period)
        v = -(xx - cx) * math.sin(tilt) + (yy - cy) * math.cos(tilt) + rng.uniform(0, period)
        cu, cv = np.floor(u / period), np.floor(v / period)
        if kind == "hstripes":
            mask = cv % 2 == 0
        elif kind in ("vstripes", "diagonal"):
            mask = cu % 2 == 0
        elif kind == "checker":
            mask = (cu + cv) % 2 == 0
        else:  # dots
            mask = (u / period - cu - 0.5) ** 2 + (v / period - cv - 0.5) ** 2 < 0.3**2
        mask &= (np.abs(xx - cx) < half[0]) & (np.abs(yy - cy) < half[1])
        return Image.fromarray(np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8)))

    return draw_one


KINDS = ["circle", "square", "triangle", "hstripes", "vstripes", "checker", "cross", "ring", "dots", "diagonal",
         "star", "xcross"]
_DRAW = {k: (_texture(k) if k in ("hstripes", "vstripes", "checker", "dots", "diagonal") else _shape(k)) for k in KINDS}


def class_names(num_classes: int) -> list[str]:
    """Folder names, sorted the same way ImageFolder sorts them: ``c00_circle``, ``c01_square``, ..."""
    if not 2 <= num_classes <= len(KINDS):
        raise RefconvError(f"demo data supports 2 to {len(KINDS)} classes, got {num_classes}: pick a number in range")
    return [f"c{i:02d}_{k}" for i, k in enumerate(KINDS[:num_classes])]


def draw_image(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of class ``kind``: shape or texture, then Gaussian noise of a random strength."""
    fg, bg = _colours(rng)
    arr = np.asarray(_DRAW[kind](rng, size, fg, bg), dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(4.0, 20.0), size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _spec(num_classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> dict:
    return {"generator": GENERATOR, "num_classes": num_classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "size": size, "seed": seed}


def is_current(root: str | Path, **spec: int) -> bool:
    """True if ``root`` already holds demo data made with exactly this spec (same arguments as make_demo_data)."""
    try:
        return json.loads((Path(root) / SPEC_FILE).read_text()) == _spec(**spec)
    except (OSError, ValueError):
        return False


def make_demo_data(root: str | Path, num_classes: int = 10, train_per_class: int = 60, val_per_class: int = 20,
                   size: int = 64, seed: int = 0) -> Path:
    """Write ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` plus ``root/spec.json``; return ``root``.

    Existing demo splits (recognised by spec.json) are replaced; a folder with other train/val data is refused, so a
    wrong path never deletes a real data set.
    """
    names = class_names(num_classes)
    if train_per_class < 1 or val_per_class < 1 or size < 16:
        raise RefconvError(f"demo data needs >= 1 image per class and size >= 16, got train_per_class="
                           f"{train_per_class}, val_per_class={val_per_class}, size={size}: raise them")
    root = Path(root)
    ours = (root / SPEC_FILE).is_file()
    for split in ("train", "val"):
        if (root / split).exists():
            if not ours:
                raise RefconvError(f"'{root / split}' exists and is not demo data (no {SPEC_FILE}): "
                                   "choose an empty output folder")
            shutil.rmtree(root / split)
    (root / SPEC_FILE).unlink(missing_ok=True)  # written last: a crash leaves no spec, so a rerun regenerates
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, split_id, label, i])
                draw_image(KINDS[label], rng, size).save(folder / f"{i:05d}.jpg", quality=JPEG_QUALITY)
    (root / SPEC_FILE).write_text(json.dumps(_spec(num_classes, train_per_class, val_per_class, size, seed), indent=2))
    return root
