"""``refconv-analyze``'s figures and files (matplotlib: the optional ``analysis`` extra, imported when drawing)."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import RefconvError
from .kernels import (
    DEFAULT_CHANNELS,
    STATS_FIELDS,
    Analysis,
    LayerStats,
    analyze,
    load_refocused_weights,
    mean_off_diagonal,
    select_layers,
)


def figure_class():
    """matplotlib's ``Figure`` (no pyplot: no global state, no GUI backend), or the install hint as an error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RefconvError("matplotlib is needed: pip install .[analysis]") from None
    return Figure


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_connection_degree(matrix: torch.Tensor, name: str, kind: str, path: Path) -> Path:
    """Heatmap of :func:`connection_degree` (paper Fig. 6)."""
    fig = figure_class()(figsize=(5.6, 4.8), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(matrix.numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=r"$\sum |W_r[i, j, :, :]|$")
    ax.set_title(f"connection degree: {name} ({kind}, first {matrix.shape[0]})", fontsize=9)
    ax.set_xlabel("input kernel channel j (of $W_b$)")
    ax.set_ylabel("output kernel channel i (of $W_t$)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_redundancy(kl_base: torch.Tensor, kl_refocused: torch.Tensor, name: str, path: Path) -> Path:
    """Pairwise KL of ``W_b`` and ``W_t`` kernel channels side by side on one colour scale (paper Fig. 7)."""
    fig = figure_class()(figsize=(9.6, 4.4), dpi=100)
    axes = fig.subplots(1, 2)
    # One scale for both; KL is heavy-tailed, so it ends at the 99th percentile and a few outliers saturate.
    both = torch.cat([kl_base.flatten(), kl_refocused.flatten()])
    vmax = max(float(torch.quantile(both, 0.99)), 1e-12)
    im = None
    for ax, matrix, label in zip(axes, (kl_base, kl_refocused), ("$W_b$ (base)", "$W_t$ (refocused)")):
        im = ax.imshow(matrix.numpy(), cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{label}: mean off-diagonal KL {mean_off_diagonal(matrix):.4f}", fontsize=9)
        ax.set_xlabel("kernel channel j")
        ax.set_ylabel("kernel channel i")
    fig.colorbar(im, ax=list(axes), label=r"KL$(p_i \| p_j)$ (scale ends at the 99th percentile)", shrink=0.85,
                 extend="max" if float(both.max()) > vmax else "neither")
    fig.suptitle(f"channel redundancy (softmax over each k x k kernel): {name}, first {kl_base.shape[0]}",
                 fontsize=10)
    fig.savefig(path)
    return path


def plot_summary(stats: list[LayerStats], path: Path) -> Path:
    """One page over all refocused layers: relative kernel change, ``W_r`` size, and mean KL of ``W_b`` vs ``W_t``."""
    import numpy as np

    Figure = figure_class()
    names = [s.layer for s in stats]
    x = np.arange(len(stats))
    colours = {"depthwise": "tab:blue", "group": "tab:green", "dense": "tab:orange"}
    fig = Figure(figsize=(max(8.0, 0.22 * len(stats) + 3), 9.0), dpi=100)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    ax1.bar(x, [s.rel_change for s in stats], color=[colours[s.kind] for s in stats])
    ax1.set_ylabel(r"$\|W_t - W_b\| / \|W_b\|$")
    from matplotlib.patches import Patch

    ax1.legend(handles=[Patch(color=c, label=k) for k, c in colours.items() if any(s.kind == k for s in stats)],
               fontsize=8)
    ax1.set_title(f"RefConv summary: {len(stats)} refocused layers, "
                  f"{sum(s.refocus_params for s in stats):,} $W_r$ parameters", fontsize=10)
    ax2.bar(x, [s.refocus_params for s in stats], color=[colours[s.kind] for s in stats])
    ax2.set_yscale("log")
    ax2.set_ylabel("$W_r$ parameters")
    ax3.plot(x, [s.kl_base for s in stats], "o-", label="$W_b$ (base)", markersize=3)
    ax3.plot(x, [s.kl_refocused for s in stats], "s-", label="$W_t$ (refocused)", markersize=3)
    ax3.set_ylabel("mean pairwise KL\n(kernel channels)")
    ax3.legend(fontsize=8)
    ax3.set_xticks(x)
    ax3.set_xticklabels(names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_stats_csv(stats: list[LayerStats], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(STATS_FIELDS))
        w.writeheader()
        for s in stats:
            row = asdict(s)
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def write_tensorboard(figures: list[Path], log_dir: Path) -> None:
    """Each PNG as a TensorBoard image, tagged by its file stem."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for path in figures:
            with Image.open(path) as img:
                writer.add_image(path.stem, np.asarray(img.convert("RGB")), 0, dataformats="HWC")
    finally:
        writer.close()


def analyze_checkpoint(path: str | os.PathLike, out: str | os.PathLike, layers: list[str] | None = None,
                       channels: int = DEFAULT_CHANNELS, tensorboard: bool = False) -> Analysis:
    """Write the figures (``connection_<layer>.png``, ``redundancy_<layer>.png``, ``summary.png``), ``summary.csv``
    and optionally TensorBoard images under ``out/tb`` for a RefConv training checkpoint."""
    figure_class()  # fail before any work when matplotlib is missing
    weights = load_refocused_weights(path)
    result = analyze(weights, select_layers(weights, layers), channels)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefconvError(f"cannot create output folder '{out}' ({e.strerror or e})") from None
    for name, figs in result.layers.items():
        stem = file_stem(name)
        kind = weights[name].kind
        result.files.append(plot_connection_degree(figs.connection, name, kind, out / f"connection_{stem}.png"))
        result.files.append(plot_redundancy(figs.kl_base, figs.kl_refocused, name, out / f"redundancy_{stem}.png"))
    result.files.append(plot_summary(result.stats, out / "summary.png"))
    result.files.append(write_stats_csv(result.stats, out / "summary.csv"))
    if tensorboard:
        write_tensorboard([p for p in result.files if p.suffix == ".png"], out / "tb")
    return result
