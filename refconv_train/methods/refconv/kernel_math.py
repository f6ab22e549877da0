"""The refocus transform as pure functions: ``W_t = W_b + conv(W_b, W_r)`` (docs/design.md section 1).

A conv kernel ``W_b`` of shape ``(C_out, C_in/g, kh, kw)`` holds ``n = C_out * C_in / g`` 2-D kernels. Seen as one
image ``(1, n, kh, kw)`` it is convolved with ``W_r`` of shape ``(n, g, m, m)``, ``groups = n / g``, zero padding
``m // 2``: bit-for-bit the grouping of the authors' ``RepConv``. Also here: the same product as one batched GEMM
on cached patches (:func:`refocus_delta_gemm`, what training runs), and the step gain of step normalisation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def refocus_shape(weight_shape: torch.Size | tuple[int, ...], conv_groups: int, map_k: int) -> tuple[int, ...]:
    """Shape of ``W_r`` for a conv weight of ``weight_shape`` and ``conv_groups`` groups: ``(n, g, m, m)``."""
    c_out, c_in_per_group = weight_shape[0], weight_shape[1]
    return (c_out * c_in_per_group, conv_groups, map_k, map_k)


def refocus_delta(base: torch.Tensor, refocus_weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(W_b as (1, n, kh, kw), W_r, groups=n/g, padding=m//2)`` reshaped to ``W_b``'s shape (reference form)."""
    n, g, m, _ = refocus_weight.shape
    kh, kw = base.shape[-2:]
    kernels = base.reshape(1, n, kh, kw)
    return F.conv2d(kernels, refocus_weight, padding=m // 2, groups=n // g).reshape(base.shape)


def refocus_transform(base: torch.Tensor, refocus_weight: torch.Tensor) -> torch.Tensor:
    """The refocused kernel ``W_t = W_b + conv(W_b, W_r)`` (identity mapping of docs/design.md section 1)."""
    return base + refocus_delta(base, refocus_weight)


def kernel_kind(conv_groups: int, in_channels_per_group: int) -> str:
    """``dense`` (g = 1), ``depthwise`` (one input channel per group) or ``group`` (in between)."""
    if conv_groups == 1:
        return "dense"
    return "depthwise" if in_channels_per_group == 1 else "group"


def conv_kind(conv: nn.Conv2d) -> str:
    """:func:`kernel_kind` of a conv module."""
    return kernel_kind(conv.groups, conv.in_channels // conv.groups)


def step_gain(base: torch.Tensor, map_k: int, conv_groups: int) -> float:
    """Mean eigenvalue ``lambda`` of ``A A^T`` for the linear map ``A: W_r -> W_t - W_b`` of this kernel.

    ``lambda = ||A||_F^2 / numel(W_b) = g * ||kernel_patches(W_b)||^2 / numel(W_b)``: one SGD step of ``lr`` on
    ``W_r`` moves the kernel by ``lr * A A^T g_t``, i.e. ``lambda`` times a plain step in expectation. Each kernel value
    appears in as many ``m x m`` patches as there are patch centres within ``m // 2`` of it (fewer at the borders), so
    the squared norm of the patches is the squared kernel weighted by that count: no unfold of ``W_b`` is needed.
    """
    kh, kw = base.shape[-2:]
    half = map_k // 2
    rows = _patch_counts(kh, half, base.device)
    cols = _patch_counts(kw, half, base.device)
    squared = base.detach().double().square().sum(dim=(0, 1))  # (kh, kw)
    return float(conv_groups * (squared * rows[:, None] * cols[None, :]).sum() / base.numel())


def _patch_counts(size: int, half: int, device: torch.device) -> torch.Tensor:
    """For each index ``i < size``: how many patch centres ``c < size`` satisfy ``|c - i| <= half``."""
    i = torch.arange(size, device=device, dtype=torch.float64)
    return torch.minimum(i + half, torch.full_like(i, size - 1)) - torch.clamp(i - half, min=0) + 1


# ----------------------------------------------------------------------------------------------- GEMM form
def kernel_patches(base: torch.Tensor, map_k: int, conv_groups: int) -> torch.Tensor:
    """The ``m x m`` neighbourhoods of every kernel position, grouped: ``(G, g*m*m, kh*kw)``, ``G = n / g``.

    With these, the transform is one batched GEMM: ``W_r.view(G, g, g*m*m) @ patches``. They depend on ``W_b`` alone,
    so while the base is frozen they are a constant.
    """
    n = base.shape[0] * base.shape[1]
    kh, kw = base.shape[-2:]
    cols = F.unfold(base.reshape(1, n, kh, kw), map_k, padding=map_k // 2)  # (1, n*m*m, kh*kw), channel-major
    return cols.reshape(n // conv_groups, conv_groups * map_k * map_k, kh * kw)


def refocus_delta_gemm(base: torch.Tensor, refocus_weight: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Same value as :func:`refocus_delta`, computed as ``bmm(W_r, patches)`` (see :func:`kernel_patches`)."""
    n, g, m, _ = refocus_weight.shape
    w = refocus_weight.reshape(n // g, g, g * m * m)
    return _PatchGemm.apply(w, patches).reshape(base.shape)


class _PatchGemm(torch.autograd.Function):
    """``bmm(w, patches)`` run in the orientation and the blocking BLAS is fast at for these skinny shapes.

    Forward computes ``(patches^T @ w^T)^T`` and backward ``grad @ patches^T``: with ``patches`` stored transposed
    (``Refocus`` caches it so) neither product copies ``w``; autograd's own backward of the transposed product would
    return ``W_r``'s grad transposed and pay a full-size copy. On CPU the rows of ``w`` are also split into equal
    blocks run as one batched product: one product with 9 columns barely uses a second thread in MKL, and writing the
    gradient in blocks of ~64 rows keeps ``patches`` in cache (measurements: docs/performance.md).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, patches)
        groups, rows, cols = w.shape
        blocks = _cpu_row_blocks(w, torch.get_num_threads())
        w_blocks = w.reshape(groups * blocks, rows // blocks, cols)
        out = torch.bmm(_repeat_blocks(patches.transpose(1, 2), blocks), w_blocks.transpose(1, 2))
        return out.transpose(1, 2).reshape(groups, rows, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, patches = ctx.saved_tensors  # one dtype: Refocus computes W_t outside autocast
        grad_w = grad_p = None
        if ctx.needs_input_grad[0]:
            groups, rows, cols = w.shape
            blocks = _cpu_row_blocks(w, max(torch.get_num_threads(), rows // 64))
            grad_blocks = grad.reshape(groups * blocks, rows // blocks, -1)
            grad_w = torch.bmm(grad_blocks, _repeat_blocks(patches.transpose(1, 2), blocks)).view(w.shape)
        if ctx.needs_input_grad[1]:
            grad_p = torch.bmm(w.transpose(1, 2), grad)
        return grad_w, grad_p


def _cpu_row_blocks(w: torch.Tensor, target: int) -> int:
    """Equal blocks to split ``w``'s rows into: about ``target`` on CPU, none elsewhere (cuBLAS needs no help)."""
    return _row_blocks(w.shape[1], target) if w.device.type == "cpu" else 1


@functools.cache
def _row_blocks(rows: int, target: int) -> int:
    """The divisor of ``rows`` closest to ``target`` (the number of equal row blocks to split a product into)."""
    return min((d for d in range(1, rows + 1) if rows % d == 0), key=lambda d: (abs(d - target), d))


def _repeat_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(G, a, b) -> (G * blocks, a, b)``, group ``i`` repeated for its blocks (a stride-0 view when ``G == 1``)."""
    groups = x.shape[0]
    if blocks == 1:
        return x
    return x.unsqueeze(1).expand(groups, blocks, *x.shape[1:]).reshape(groups * blocks, *x.shape[1:])
