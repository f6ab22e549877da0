"""The paper's diagnostics of a trained RefConv model (arXiv 2310.10563, Figs. 6 and 7), from a training checkpoint.

Math (small, tested, model-free: everything comes from ``W_b`` and ``W_r`` in the state dict):

- :func:`connection_degree`: how strongly output kernel channel ``i`` of ``W_t`` draws on input kernel channel ``j``
  of ``W_b``, ``sum |W_r[i, j', :, :]|`` (Fig. 6). For a depthwise layer ``W_r`` is ``(C, C, m, m)`` and this is the
  full ``C x C`` matrix; for other layers each kernel channel only sees the ``g`` of its group (block diagonal).
- :func:`kernel_kl_matrix`: channel redundancy (Fig. 7). Each 2-D kernel (a "kernel channel", numbered
  ``j = o * C_in/g + i`` as in docs/design.md section 1) is flattened and softmax-normalised over its ``kh*kw``
  values; entry ``(i, j)`` is ``KL(p_i || p_j)``. Low values = similar, i.e. redundant, kernels.
- :func:`layer_stats`: per-layer summary (kind, ``||W_t - W_b|| / ||W_b||``, ``W_r`` size, mean pairwise KL).

The figures and files of ``refconv-analyze`` are in :mod:`refconv_train.analysis.kernel_plots`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import describe, load_training_checkpoint
from ..errors import RefconvError
from ..methods.refconv import is_refocus_state_dict, kernel_kind, refocus_transform, refocused_kernels

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
