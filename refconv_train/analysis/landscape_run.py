"""``refconv-analyze landscape``: checkpoints of one architecture, a fixed image subset, the numbers of
:mod:`refconv_train.landscape` for each model, ``landscape.json`` and the figures
(:mod:`refconv_train.landscape_plots`). Contract: docs/design.md section 5."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import data as data_lib
from ..errors import RefconvError
from ..run.restore import Restored, restore_any
from . import landscape as ls

FORMAT = "refconv-landscape/1"
FILTER_NORMALIZATION = ("each output filter (row) of every parameter with dim > 1 rescaled to the norm of the "
                        "model's filter; dim <= 1 parameters get zero; buffers (BN statistics) unchanged")


@dataclass
class LandscapeSettings:
    split: str = "train"
    images: int = 1000  # fixed seeded subset of the split (all of it when smaller)
    seed: int = 0  # of the subset, the directions and the power iteration's start
    grid: int = 21  # points per axis of the 2-D surface (odd)
    span: float = 1.0  # the surface covers [-span, span]^2 in filter-normalized units
    directions: int = 10  # K random directions for the radius numbers (the surface uses the first two)
    radii: tuple[float, ...] = (0.1, 0.25, 0.5)
    hessian_images: int = 200  # the first N of the subset (an HVP costs ~30 forward passes on CPU)
    hessian_iters: int = 20  # 0 = no Hessian
    hessian_tol: float = 1e-3
    batch_size: int = 250
    img_size: int | None = None  # default: the checkpoint's config (as refconv-eval)
    crop_pct: float | None = None


@dataclass
class Measured:
    path: str
    kind: str
    arch: str
    numbers: dict = field(default_factory=dict)  # what goes into the JSON for this checkpoint


def fuse_for_measuring(restored: Restored) -> nn.Module:
    """The deployed architecture of a checkpoint's model, the one weight space all methods share: a training model
    of RefConv or another re-parameterization (ACB, RepVGG, DBB, WN, CWN, OWN) is fused in place
    (:func:`refconv_train.fuse_model`); fused and baseline models are returned as they are."""
    from ..methods import fuse_model

    fuse_model(restored.model)
    return restored.model


def load_models(paths: list[str], model_name: str | None = None,
                num_classes: int | None = None) -> list[tuple[Restored, nn.Module]]:
    """Every checkpoint restored and fused; a one-line error unless all share one architecture (names, shapes)."""
    if not paths:
        raise RefconvError("no checkpoint given: refconv-analyze landscape CKPT [CKPT ...] --data ROOT --out DIR")
    loaded, first = [], None
    for path in paths:
        restored = restore_any(path, model_name, num_classes)
        model = fuse_for_measuring(restored)
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
        if first is None:
            first = (path, restored.arch, shapes)
        elif restored.arch != first[1] or shapes != first[2]:
            raise RefconvError(f"checkpoints of different architectures: '{first[0]}' is {first[1]}, '{path}' is "
                               f"{restored.arch}{' with other shapes' if restored.arch == first[1] else ''}; "
                               "a landscape compares models of one weight space")
        loaded.append((restored, model))
    return loaded


def subset_indices(total: int, images: int, seed: int) -> list[int]:
    """``images`` indices of ``range(total)`` drawn with a seeded generator, sorted (all of them when fewer)."""
    if images < 1:
        raise RefconvError(f"--images must be >= 1, got {images}")
    if images >= total:
        return list(range(total))
    return sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:images].tolist())


def eval_transform_of(restored: Restored, settings: LandscapeSettings) -> tuple:
    """``(img_size, crop_pct, mean, std)`` as refconv-eval takes them: flags, else the checkpoint's config."""
    cfg = restored.config
    img_size = settings.img_size or (cfg.data.img_size if cfg else 224)
    crop_pct = settings.crop_pct or (cfg.data.crop_pct if cfg else 0.875)
    mean, std = ((tuple(cfg.data.mean), tuple(cfg.data.std)) if cfg
                 else (data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD))
    return img_size, crop_pct, mean, std


def load_batches(root: str, settings: LandscapeSettings, num_classes: int, transform_key: tuple,
                 device: torch.device) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The subset's images (eval transform, normalized) and labels, in batches of ``settings.batch_size``."""
    img_size, crop_pct, mean, std = transform_key
    dataset = data_lib.build_dataset(root, settings.split, data_lib.build_transform(img_size, False, crop_pct),
                                     num_classes)
    indices = subset_indices(len(dataset), settings.images, settings.seed)
    batches = []
    for start in range(0, len(indices), settings.batch_size):
        samples = [dataset[i] for i in indices[start:start + settings.batch_size]]
        images = torch.stack([s[0] for s in samples]).to(device)
        batches.append((data_lib.normalize_images(images, mean, std), torch.tensor([s[1] for s in samples],
                                                                                    device=device)))
    return indices, batches


def measure(model: nn.Module, batches: list, settings: LandscapeSettings, desc: str | None = None) -> dict:
    """Loss at 0, the surface and its axes, the radius rises and the top Hessian eigenvalue of one model (in eval
    mode; its parameters and buffers are left exactly as they were). ``desc``: show a progress bar with this label."""
    coords = ls.grid_coords(settings.grid, settings.span)
    seconds: dict[str, float] = {}
    bar = tqdm(total=settings.grid**2 + settings.directions * len(settings.radii), desc=desc, disable=desc is None,
               leave=False, dynamic_ncols=True, unit="loss")
    with bar, ls.evaluating(model):
        params = ls.model_params(model)
        dirs = ls.random_directions(params, max(settings.directions, 2), settings.seed)
        terms = ls.dataset_terms(model, batches)
        t0 = time.perf_counter()
        loss0 = ls.loss_at(terms, params)
        surface = ls.loss_surface(terms, params, dirs[0], dirs[1], coords, bar.update)
        seconds["surface"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rises = ls.radius_rises(terms, params, dirs[:settings.directions], settings.radii, loss0, bar.update)
        seconds["radius"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hessian = None
        if settings.hessian_iters > 0:
            h_terms = ls.dataset_terms(model, _first_images(batches, settings.hessian_images))
            hessian = ls.top_hessian_eigenvalue(h_terms, params, settings.hessian_iters, settings.hessian_tol,
                                                settings.seed)
        seconds["hessian"] = time.perf_counter() - t0
    mid = settings.grid // 2
    return {
        "loss0": loss0,
        "surface": surface.tolist(),
        "curve_d1": surface[mid].tolist(),  # beta = 0: along d1
        "curve_d2": surface[:, mid].tolist(),  # alpha = 0: along d2
        "radius": {"radii": list(settings.radii), "rise": rises.tolist(),
                   "rise_mean": rises.mean(0).tolist(),
                   "rise_std": (rises.std(0) if rises.shape[0] > 1 else torch.zeros(rises.shape[1])).tolist()},
        "hessian": None if hessian is None else {
            "top_eigenvalue": hessian.eigenvalue, "history": hessian.history, "converged": hessian.converged,
            "iterations": len(hessian.history)},
        "seconds": seconds,
    }


def _first_images(batches: list, count: int) -> list:
    out, left = [], count
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(y)
    return out


def run_landscape(paths: list[str], root: str, out: str | os.PathLike, settings: LandscapeSettings,
                  model_name: str | None = None, num_classes: int | None = None,
                  device: str = "cpu", progress: bool = False) -> tuple[dict, list[Path]]:
    """Measure every checkpoint on the same subset; write ``landscape.json`` and the figures; (the JSON, files)."""
    from .landscape_plots import figure_class, plot_all

    figure_class()  # fail before any work when matplotlib is missing
    ls.grid_coords(settings.grid, settings.span)  # and on a bad grid
    if settings.directions < 1 or not settings.radii or settings.hessian_images < 1 or settings.batch_size < 1:
        raise RefconvError("--directions, --hessian-images and --batch-size must be >= 1, and --radii non-empty")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    start, cpu_start = time.perf_counter(), time.process_time()
    loaded = load_models(paths, model_name, num_classes)
    keys = [eval_transform_of(restored, settings) for restored, _ in loaded]
    cache: dict[tuple, tuple] = {}  # transform -> (indices, batches, seconds): the data, checked and loaded
    for key, (restored, _) in zip(keys, loaded):
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = (*load_batches(root, settings, restored.num_classes, key, dev), time.perf_counter() - t0)
    out = Path(out)  # made once every input is checked, before the long part
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefconvError(f"cannot create output folder '{out}' ({e.strerror or e})") from None
    results = []
    for path, key, (restored, model) in zip(paths, keys, loaded):
        indices, batches, load_s = cache[key]
        numbers = measure(model.to(dev), batches, settings, desc=Path(path).name if progress else None)
        numbers["seconds"]["data"] = load_s
        numbers.update(img_size=key[0], crop_pct=key[1])
        results.append(Measured(str(path), restored.kind, restored.arch, numbers))
    report = {
        "format": FORMAT,
        "settings": {**asdict(settings), "radii": list(settings.radii), "data": str(root), "device": str(dev),
                     "coords": ls.grid_coords(settings.grid, settings.span), "filter_normalization":
                     FILTER_NORMALIZATION, "hessian_images": min(settings.hessian_images, len(indices))},
        "subset_indices": indices,
        "checkpoints": [{"path": m.path, "kind": m.kind, "arch": m.arch, **m.numbers} for m in results],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }
    report["seconds"] = time.perf_counter() - start
    report["cpu_seconds"] = time.process_time() - cpu_start  # all threads: shows a busy machine's share
    files = [out / "landscape.json"]
    files[0].write_text(json.dumps(report, indent=1) + "\n")
    files += plot_all(report, out)
    return report, files
