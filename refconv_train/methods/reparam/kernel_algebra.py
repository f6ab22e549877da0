"""The algebra of structural re-parameterization as small pure functions of tensors (DBB's transforms, generalized).

Every branch of ACB, RepVGG and DBB is linear up to its BatchNorms, so in eval mode it equals one convolution with a
``(kernel, bias)`` pair. A kernel here always has the grouped-conv layout ``(C_out, C_in / groups, kh, kw)``. Each
function names one algebraic step; tests/test_reparam_transforms.py checks each against the layers it replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fold_bn(kernel: Tensor, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None,
            eps: float) -> tuple[Tensor, Tensor]:
    """``BN(conv(x, kernel))`` (eval mode) as ``conv(x, k) + b``: ``k = kernel * gamma / std``,
    ``b = beta - mean * gamma / std`` with ``std = sqrt(var + eps)``. ``gamma``/``beta`` None: a BN without affine."""
    scale = (var + eps).rsqrt()
    if gamma is not None:
        scale = scale * gamma
    bias = -mean * scale
    if beta is not None:
        bias = bias + beta
    return kernel * scale.reshape(-1, 1, 1, 1), bias


def pad_to_frame(kernel: Tensor, frame: tuple[int, int], offset: tuple[int, int]) -> Tensor:
    """A ``bh x bw`` kernel placed at row/column ``offset`` inside a ``frame`` (``kh x kw``) of zeros.

    The branch it stands for must read its input shifted by the same offset (times the dilation), which is what
    :func:`branch_padding` arranges."""
    (kh, kw), (bh, bw), (oy, ox) = frame, kernel.shape[-2:], offset
    if oy < 0 or ox < 0 or oy + bh > kh or ox + bw > kw:
        raise ValueError(f"a {bh}x{bw} kernel at offset {offset} does not fit a {kh}x{kw} frame")
    return torch.nn.functional.pad(kernel, [ox, kw - bw - ox, oy, kh - bh - oy])


def center_offset(frame: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Where a smaller kernel sits in the frame: centred (rounded towards the top/left for an even difference)."""
    return (frame[0] - size[0]) // 2, (frame[1] - size[1]) // 2


def branch_padding(main: tuple[int, int, int, int], frame: tuple[int, int], size: tuple[int, int],
                   offset: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``F.pad`` amounts ``(left, right, top, bottom)`` for a branch whose ``size`` kernel sits at ``offset`` inside the
    main conv's ``frame``, given the main conv's own effective zero padding ``main`` (same order) for this input.

    Run with padding 0 and the main conv's stride and dilation, the branch then reads exactly the pixels its kernel
    taps read inside the main conv, and has the main conv's output size. Negative amounts crop."""
    left, right, top, bottom = main
    (kh, kw), (bh, bw), (oy, ox), (dh, dw) = frame, size, offset, dilation
    return (left - ox * dw, right - (kw - bw - ox) * dw, top - oy * dh, bottom - (kh - bh - oy) * dh)


def identity_kernel(channels: int, groups: int = 1, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> Tensor:
    """The ``1x1`` kernel ``(C, C / groups, 1, 1)`` of a grouped conv that returns its input unchanged.

    Output channel ``c`` is in group ``c // (C / groups)``, whose inputs are channels ``[g * C/groups, ...)``: its
    input index inside the group is ``c % (C / groups)`` (depthwise: a kernel of ones)."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, 1, 1, dtype=dtype, device=device)
    kernel[torch.arange(channels), torch.arange(channels) % per_group] = 1.0
    return kernel


def avg_pool_kernel(channels: int, size: tuple[int, int], groups: int = 1, dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> Tensor:
    """A per-channel ``kh x kw`` average pool (no padding, so every window divides by ``kh * kw``) as the kernel of a
    conv with ``groups`` groups: :func:`identity_kernel` spread over the window."""
    kh, kw = size
    return identity_kernel(channels, groups, dtype, device).expand(-1, -1, kh, kw) / (kh * kw)


def merge_1x1_kxk(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """A ``1x1`` conv ``(M, C_in/g, 1, 1)`` + bias ``b1``, then a ``kxk`` conv ``(C_out, M/g, kh, kw)`` + bias ``b2``,
    both with ``groups``, as one ``kxk`` conv ``(C_out, C_in/g, kh, kw)``.

    Exact when the ``kxk`` conv's padding holds ``b1`` (the first stage's value for a zero pixel), as DBB's
    ``BNAndPadLayer`` arranges, or when the input is padded before the ``1x1`` stage. Per group ``G``:
    ``k[o, i] = sum_m k2[o, m] * k1[m, i]`` and ``b[o] = b2[o] + sum_{m, y, x} k2[o, m, y, x] * b1[m]``."""
    m, cin_g = k1.shape[:2]
    cout, m_g, kh, kw = k2.shape
    a = k1.reshape(groups, m // groups, cin_g)
    w = k2.reshape(groups, cout // groups, m_g, kh, kw)
    kernel = torch.einsum("gomyx,gmi->goiyx", w, a).reshape(cout, cin_g, kh, kw)
    bias = torch.einsum("gomyx,gm->go", w, b1.reshape(groups, m_g)).reshape(cout)
    return kernel, bias + b2


def merge_1x1_depthwise(k1: Tensor, b1: Tensor, k2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """A ``1x1`` conv ``(C, C_in/g, 1, 1)`` + bias ``b1``, then a per-channel ``kxk`` conv ``(C, 1, kh, kw)`` + bias
    ``b2`` (depthwise over the ``1x1``'s outputs, e.g. DBB's average pool), as one conv ``(C, C_in/g, kh, kw)``:
    ``k[o, i] = k2[o] * k1[o, i]``, ``b = b2 + b1 * sum(k2[o])``. The same result as :func:`merge_1x1_kxk` with the
    per-channel kernel spread into the grouped layout, without its ``C x C`` mostly-zero kernel (same padding rule)."""
    return k1 * k2, b2 + b1 * k2.sum((1, 2, 3))


def add_branches(kernels: list[Tensor], biases: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Parallel branches on the same input (kernels already in one frame) are one conv: sum kernels and biases."""
    return torch.stack(kernels).sum(0), torch.stack(biases).sum(0)


def absorb_bias_into_bn(running_mean: Tensor, bias: Tensor) -> Tensor:
    """A bias ``b`` added before an eval-mode BatchNorm equals a BatchNorm with running mean ``mu - b``, exactly:
    ``(y + b - mu) / std = (y - (mu - b)) / std`` (train mode subtracts the batch mean: ``b`` vanishes either way)."""
    return running_mean - bias


def bn_zero_value(mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float) -> Tensor:
    """What an eval-mode BatchNorm outputs for a zero input, per channel: ``beta - mean * gamma / std``. DBB pads
    after its inner BN with this value (``BNAndPadLayer``), which is what makes :func:`merge_1x1_kxk` exact."""
    return fold_bn(torch.zeros_like(mean).reshape(-1, 1, 1, 1), mean, var, gamma, beta, eps)[1]


def pad_with(x: Tensor, pad: tuple[int, int, int, int], value: Tensor) -> Tensor:
    """``F.pad(x, pad)`` (``left, right, top, bottom``; negative amounts crop) with the new border holding the
    per-channel ``value`` instead of zeros; the inside is ``x`` bit for bit."""
    if not any(pad):
        return x
    padded = torch.nn.functional.pad(x, pad)
    if max(pad) <= 0:
        return padded
    border = torch.nn.functional.pad(x.new_zeros(1, 1, *x.shape[-2:]), pad, value=1.0)
    return padded + value.to(x.dtype).reshape(1, -1, 1, 1) * border


def fold_sum_after_bn(weight: Tensor, conv_bias: Tensor | None, kernel: Tensor, bias: Tensor, mean: Tensor,
                      var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float) -> dict[str, Tensor | None]:
    """``BN(conv(x, W) + c) + conv(x, k) + b`` (eval mode, ``k``/``b`` summed after the BN) as the same conv -> BN:
    the BN's scale ``s = gamma / std`` folds into the conv (``W' = W s + k``, ``c' = c s``) and the BN is left an
    affine shift, mean 0 and variance ``1 - eps`` (so ``var + eps = 1``), ``gamma' = 1``,
    ``beta' = beta - mu s + b``; without affine parameters the shift sits in the mean: ``mu' = mu / std - b``.
    Nothing divides by gamma: moving ``k`` before the BN as ``k std / gamma`` instead loses fp32 precision wherever
    gamma is small (a from-scratch ACB mobilenetv2_050 failed its fuse check by 1.6e-4 of the output scale), and a
    gamma of 0 cannot carry it at all. Returns the new ``weight``, ``conv_bias``, ``mean``, ``var``, ``gamma``,
    ``beta``."""
    std = (var + eps).sqrt()
    scale = std.reciprocal() if gamma is None else gamma / std
    out = {"weight": weight * scale.reshape(-1, 1, 1, 1) + kernel,
           "conv_bias": None if conv_bias is None else conv_bias * scale,
           "var": torch.full_like(var, 1.0 - eps)}
    if gamma is None:
        out.update(mean=mean / std - bias, gamma=None, beta=None)
    else:
        shift = -mean * scale + bias + (0.0 if beta is None else beta)
        out.update(mean=torch.zeros_like(mean), gamma=torch.ones_like(gamma), beta=shift)
    return out
