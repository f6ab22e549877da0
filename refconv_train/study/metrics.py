"""What a finished run measured: top-1 per epoch (summary.csv), seconds per epoch, peak memory (DONE), trainable
parameters, and how far the spatial kernels moved from the weights the run started from."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

CACHE = "study_metrics.json"  # train_params and kernel_change, computed once per finished run


@dataclass
class RunMetrics:
    variant: str
    seed: int
    folder: str
    curve: list[float]  # top-1 per epoch on the run's validation split
    final: float
    best: float
    epoch_s: float  # mean training seconds per epoch
    peak_mb: float | None  # peak resident memory of the training process
    train_params: int | None  # parameters that trained
    kernel_change: float | None  # mean over spatial convs of ||W_end - W_start|| / ||W_start||

    def as_dict(self) -> dict:
        return asdict(self)


def read_curve(folder: Path) -> tuple[list[float], list[float]]:
    """Top-1 and epoch seconds of every evaluated epoch in ``folder/summary.csv``."""
    path = folder / "summary.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("top1") not in (None, "", "nan")]
    return [float(r["top1"]) for r in rows], [float(r["epoch_s"]) for r in rows if r.get("epoch_s")]


def spatial_kernels(path: str | Path) -> dict:
    """Conv kernels larger than 1x1 of any checkpoint the library reads (RefConv ones fused: ``W_t``)."""
    from ..models import read_state_dict

    return {k: v.double() for k, v in read_state_dict(path).items()
            if k.endswith(".weight") and v.ndim == 4 and v.shape[-1] * v.shape[-2] > 1}


def kernel_change(start: str | Path, end: str | Path, start_kernels: dict | None = None) -> float | None:
    """Mean over the spatial convs present in both of ``||W_end - W_start|| / ||W_start||``."""
    before = start_kernels if start_kernels is not None else spatial_kernels(start)
    after = spatial_kernels(end)
    ratios = [float((after[k] - w).norm() / w.norm()) for k, w in before.items()
              if k in after and after[k].shape == w.shape and w.norm() > 0]
    return statistics.mean(ratios) if ratios else None


def trainable_params(folder: Path) -> int | None:
    """``reparam_report.json``'s ``train_params`` when the trainer wrote one; else the size of SGD's momentum
    buffers in last.pth (one per parameter that trained); else None."""
    report = folder / "reparam_report.json"
    if report.is_file():
        try:
            value = json.loads(report.read_text()).get("train_params")
            if isinstance(value, int):
                return value
        except (OSError, ValueError):
            pass
    last = folder / "last.pth"
    if not last.is_file():
        return None
    from ..checkpoint import safe_torch_load

    state = safe_torch_load(last).get("optimizer", {}).get("state", {})
    sizes = [v["momentum_buffer"].numel() for v in state.values() if v.get("momentum_buffer") is not None]
    return sum(sizes) or None


def _start_weights(folder: Path) -> str | None:
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    start = (cfg or {}).get("model", {}).get("pretrained")
    return start if isinstance(start, str) and Path(start).is_file() else None


def read_run(folder: Path, variant: str, seed: int, kernel_cache: dict | None = None) -> RunMetrics | None:
    """The numbers of a finished run (None without an evaluated epoch). ``kernel_cache`` holds the start kernels
    by path across runs (every stage-2 run of a study starts from the same weights)."""
    curve, seconds = read_curve(folder)
    if not curve:
        return None
    peak = None
    try:
        peak = json.loads((folder / "DONE").read_text()).get("peak_rss_mb")
    except (OSError, ValueError, AttributeError):
        pass
    cache_path = folder / CACHE
    cached = {}
    if cache_path.is_file() and cache_path.stat().st_mtime >= (folder / "summary.csv").stat().st_mtime:
        try:
            cached = json.loads(cache_path.read_text())
        except ValueError:
            cached = {}
    if "kernel_change" not in cached:
        start = _start_weights(folder)
        end = next((p for p in (folder / "fused.pth", folder / "last.pth") if p.is_file()), None)
        change = None
        if start and end:
            cache = kernel_cache if kernel_cache is not None else {}
            if start not in cache:
                cache[start] = spatial_kernels(start)
            change = kernel_change(start, end, cache[start])
        cached = {"kernel_change": change, "train_params": trainable_params(folder)}
        cache_path.write_text(json.dumps(cached) + "\n")
    epoch_s = statistics.mean(seconds) if seconds else math.nan
    return RunMetrics(variant, seed, str(folder), curve, curve[-1], max(curve), epoch_s, peak,
                      cached.get("train_params"), cached.get("kernel_change"))
