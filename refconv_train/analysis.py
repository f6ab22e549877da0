"""The paper's diagnostics of a trained RefConv model (arXiv 2310.10563, Figs. 6 and 7), from a training checkpoint.

Math (small, tested, model-free: everything comes from ``W_b`` and ``W_r`` in the state dict):

- :func:`connection_degree`: how strongly output kernel channel ``i`` of ``W_t`` draws on input kernel channel ``j``
  of ``W_b``, ``sum |W_r[i, j', :, :]|`` (Fig. 6). For a depthwise layer ``W_r`` is ``(C, C, m, m)`` and this is the
  full ``C x C`` matrix; for other layers each kernel channel only sees the ``g`` of its group (block diagonal).
- :func:`kernel_kl_matrix`: channel redundancy (Fig. 7). Each 2-D kernel (a "kernel channel", DESIGN 1 numbering
  ``j = o * C_in/g + i``) is flattened and softmax-normalised over its ``kh*kw`` values; entry ``(i, j)`` is
  ``KL(p_i || p_j)``. Low values = similar, i.e. redundant, kernels.
- :func:`layer_stats`: per-layer summary (kind, ``||W_t - W_b|| / ||W_b||``, ``W_r`` size, mean pairwise KL).

Figures (matplotlib, the optional ``analysis`` extra, imported only when drawing) and :func:`analyze_checkpoint`,
which the ``refconv-analyze`` command wraps.
"""

from __future__ import annotations

import csv
import difflib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import describe, load_training_checkpoint
from .errors import RefconvError
from .refocus import is_refocus_state_dict, kernel_kind, refocus_transform, refocused_kernels

DEFAULT_CHANNELS = 64
STATS_FIELDS = ("layer", "kind", "kernel", "refocus_params", "rel_change", "kl_base", "kl_refocused", "kl_channels")


# ----------------------------------------------------------------------------------------------- math
def refocus_kind(w_b: torch.Tensor, w_r: torch.Tensor) -> str:
    """``depthwise`` / ``group`` / ``dense`` from the shapes alone (``g = W_r.shape[1]``, ``C_in/g = W_b.shape[1]``)."""
    return kernel_kind(w_r.shape[1], w_b.shape[1])


def connection_degree(w_r: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """``(K, K)`` matrix, ``K = min(n, channels)``: entry ``(i, j)`` = ``sum |W_r[i, j - start(i), :, :]|`` where
    kernel channel ``j`` is in output kernel ``i``'s group (``start(i) = (i // g) * g``), else 0.

    Depthwise (``G = 1``): simply ``W_r.abs().sum((2, 3))``, every kernel channel connected to every other one.
    """
    if w_r.ndim != 4:
        raise RefconvError(f"W_r must have shape (n, g, m, m), got {tuple(w_r.shape)}")
    n, g = w_r.shape[:2]
    k = n if channels is None else min(n, channels)
    degree = w_r[:k].detach().abs().sum(dim=(2, 3))  # (k, g): output kernel i x its g inputs
    out = torch.zeros(k, k, dtype=degree.dtype)
    rows = torch.arange(k).unsqueeze(1)
    cols = (rows // g) * g + torch.arange(g).unsqueeze(0)  # (k, g) input kernel channel of each W_r entry
    keep = cols < k
    out[rows.expand_as(cols)[keep], cols[keep]] = degree[keep].cpu()
    return out


def kernel_distributions(weight: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """The first ``channels`` 2-D kernels of a conv weight ``(C_out, C_in/g, kh, kw)``, each flattened and
    log-softmax-normalised over its ``kh*kw`` values: ``(K, kh*kw)`` log-probabilities (float64)."""
    if weight.ndim != 4:
        raise RefconvError(f"conv weight must have shape (C_out, C_in/g, kh, kw), got {tuple(weight.shape)}")
    kernels = weight.detach().double().reshape(-1, weight.shape[-2] * weight.shape[-1])
    if channels is not None:
        kernels = kernels[:channels]
    return torch.log_softmax(kernels.cpu(), dim=1)


def kernel_kl_matrix(weight: torch.Tensor, channels: int | None = DEFAULT_CHANNELS) -> torch.Tensor:
    """``(K, K)`` pairwise ``KL(p_i || p_j) = sum_x p_i(x) (log p_i(x) - log p_j(x))`` between the softmax-normalised
    2-D kernels ``p_i`` of ``weight`` (the first ``channels`` of them). Zero diagonal; not symmetric."""
    logp = kernel_distributions(weight, channels)
    p = logp.exp()
    kl = (p * logp).sum(dim=1, keepdim=True) - p @ logp.T
    kl.fill_diagonal_(0.0)
    return kl.clamp_(min=0.0)


def mean_off_diagonal(matrix: torch.Tensor) -> float:
    """Mean of the entries off the diagonal of a square matrix (nan for a 1 x 1 one)."""
    k = matrix.shape[0]
    if k < 2:
        return float("nan")
    return float((matrix.sum() - matrix.diagonal().sum()) / (k * k - k))


@dataclass
class LayerStats:
    layer: str
    kind: str  # depthwise | group | dense
    kernel: str  # e.g. 3x3
    refocus_params: int  # values in W_r
    rel_change: float  # ||W_t - W_b|| / ||W_b|| (Frobenius)
    kl_base: float  # mean off-diagonal pairwise KL between kernel channels of W_b
    kl_refocused: float  # the same for W_t
    kl_channels: int  # how many kernel channels the KL means were taken over


def relative_change(w_b: torch.Tensor, w_t: torch.Tensor) -> float:
    """``||W_t - W_b|| / ||W_b||`` (Frobenius norms, float64)."""
    w_b, w_t = w_b.detach().double(), w_t.detach().double()
    return float(torch.linalg.vector_norm(w_t - w_b) / torch.linalg.vector_norm(w_b))


def layer_stats(name: str, w_b: torch.Tensor, w_r: torch.Tensor, channels: int = DEFAULT_CHANNELS,
                w_t: torch.Tensor | None = None) -> LayerStats:
    """Summary statistics of one refocused conv (``W_t`` is computed from ``W_b`` and ``W_r`` unless given)."""
    if w_t is None:
        w_t = transformed_weight(w_b, w_r)
    kl_b, kl_t = kernel_kl_matrix(w_b, channels), kernel_kl_matrix(w_t, channels)
    return LayerStats(layer=name, kind=refocus_kind(w_b, w_r), kernel="x".join(map(str, w_b.shape[-2:])),
                      refocus_params=w_r.numel(), rel_change=relative_change(w_b, w_t),
                      kl_base=mean_off_diagonal(kl_b), kl_refocused=mean_off_diagonal(kl_t),
                      kl_channels=kl_b.shape[0])


def transformed_weight(w_b: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
    """``W_t = W_b + conv(W_b, W_r)`` in float32 on CPU, as training and fusing compute it."""
    with torch.no_grad():
        return refocus_transform(w_b.detach().float().cpu(), w_r.detach().float().cpu())


# ----------------------------------------------------------------------------------------------- checkpoint
@dataclass
class RefocusedWeights:
    name: str  # module name, e.g. blocks.1.0.conv_dw
    w_b: torch.Tensor
    w_r: torch.Tensor

    @property
    def kind(self) -> str:
        return refocus_kind(self.w_b, self.w_r)


def refocused_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, RefocusedWeights]:
    """Module name -> (``W_b``, ``W_r``) for every refocused conv of a state dict, in state-dict order."""
    return {name: RefocusedWeights(name, w_b, w_r) for name, w_b, w_r in refocused_kernels(state_dict)}


def load_refocused_weights(path: str | os.PathLike) -> dict[str, RefocusedWeights]:
    """The refocused convs of a RefConv training checkpoint, or a one-line error saying what the file is instead."""
    ckpt = load_training_checkpoint(path)
    if not is_refocus_state_dict(ckpt.get("model", {})):
        raise RefconvError(f"'{path}' is not a RefConv training checkpoint (it holds {describe(ckpt)}); "
                           f"refconv-analyze takes the last.pth/best.pth of a refocus run")
    return refocused_weights(ckpt["model"])


def default_layers(layers: dict[str, RefocusedWeights], count: int = 3) -> list[str]:
    """First, middle and last depthwise layer (``count`` spread evenly over the depth); all kinds if none is."""
    names = [n for n, w in layers.items() if w.kind == "depthwise"] or list(layers)
    if len(names) <= count:
        return names
    picks = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]
    return [names[i] for i in picks]


def select_layers(layers: dict[str, RefocusedWeights], wanted: list[str] | None) -> list[str]:
    """``wanted`` checked against the refocused layers (error with the closest name), or :func:`default_layers`."""
    if not wanted:
        return default_layers(layers)
    for name in wanted:
        if name not in layers:
            close = difflib.get_close_matches(name, list(layers), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; e.g. {', '.join(list(layers)[:3])}"
            raise RefconvError(f"layer '{name}' is not a refocused conv of this checkpoint{hint}")
    return list(dict.fromkeys(wanted))


# ----------------------------------------------------------------------------------------------- figures
def _figure_class():
    """matplotlib's ``Figure`` (no pyplot: no global state, no GUI backend), or the install hint as an error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RefconvError("matplotlib is needed: pip install .[analysis]") from None
    return Figure


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def plot_connection_degree(matrix: torch.Tensor, name: str, kind: str, path: Path) -> Path:
    """Heatmap of :func:`connection_degree` (paper Fig. 6)."""
    fig = _figure_class()(figsize=(5.6, 4.8), dpi=100)
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
    fig = _figure_class()(figsize=(9.6, 4.4), dpi=100)
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

    Figure = _figure_class()
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


# ----------------------------------------------------------------------------------------------- the command
@dataclass
class LayerFigures:
    """The matrices behind a chosen layer's figures (exactly what is plotted)."""

    connection: torch.Tensor
    kl_base: torch.Tensor
    kl_refocused: torch.Tensor


@dataclass
class Analysis:
    stats: list[LayerStats]  # every refocused layer, in model order
    layers: dict[str, LayerFigures]  # the chosen layers
    files: list[Path] = field(default_factory=list)  # everything written


def analyze(weights: dict[str, RefocusedWeights], layers: list[str], channels: int = DEFAULT_CHANNELS) -> Analysis:
    """The numbers behind every figure: stats of all refocused layers, matrices of the chosen ones."""
    if channels < 1:
        raise RefconvError(f"--channels must be >= 1, got {channels}")
    stats, chosen = [], {}
    for name, w in weights.items():
        w_t = transformed_weight(w.w_b, w.w_r)
        stats.append(layer_stats(name, w.w_b, w.w_r, channels, w_t=w_t))
        if name in layers:
            chosen[name] = LayerFigures(connection_degree(w.w_r, channels), kernel_kl_matrix(w.w_b, channels),
                                        kernel_kl_matrix(w_t, channels))
    return Analysis(stats, {name: chosen[name] for name in layers})


def analyze_checkpoint(path: str | os.PathLike, out: str | os.PathLike, layers: list[str] | None = None,
                       channels: int = DEFAULT_CHANNELS, tensorboard: bool = False) -> Analysis:
    """Write the figures (``connection_<layer>.png``, ``redundancy_<layer>.png``, ``summary.png``), ``summary.csv``
    and optionally TensorBoard images under ``out/tb`` for a RefConv training checkpoint."""
    _figure_class()  # fail before any work when matplotlib is missing
    weights = load_refocused_weights(path)
    result = analyze(weights, select_layers(weights, layers), channels)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefconvError(f"cannot create output folder '{out}' ({e.strerror or e})") from None
    for name, figs in result.layers.items():
        stem = _file_stem(name)
        kind = weights[name].kind
        result.files.append(plot_connection_degree(figs.connection, name, kind, out / f"connection_{stem}.png"))
        result.files.append(plot_redundancy(figs.kl_base, figs.kl_refocused, name, out / f"redundancy_{stem}.png"))
    result.files.append(plot_summary(result.stats, out / "summary.png"))
    result.files.append(write_stats_csv(result.stats, out / "summary.csv"))
    if tensorboard:
        write_tensorboard([p for p in result.files if p.suffix == ".png"], out / "tb")
    return result
