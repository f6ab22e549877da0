"""Is a base kernel ``W_b`` worth refocusing? A zero kernel is a dead layer; a fresh init is a likely mistake.

RefConv refocuses kernels that learned something (docs/design.md section 1). Two mistakes of public copies of the
authors' module: ``W_b`` left at its zero buffer (``W_t = 0 + conv(0, W_r) = 0``: the layer can never learn) and
``W_b`` left at the model's random init (the paper's Fig. 5: random frozen bases hurt).

:func:`looks_like_init` tells a kernel that is still exactly as an initializer drew it. A fresh init is i.i.d.
draws from a zero-mean distribution whose scale follows from the kernel's shape; every test below is that
hypothesis, with a tolerance of 5 standard errors of its own statistic (a real init fails one with probability
below 1e-5 per layer), and a kernel "looks like an init" only when it passes all of them:

1. mean: ``|mean| <= 5 * std / sqrt(n)``;
2. no spatial structure: the correlation of horizontally and of vertically adjacent taps is below ``5 / sqrt(pairs)``
   (trained kernels are smooth: their neighbours correlate);
3. scale: the std is, within 5 standard errors, one that PyTorch's, timm's or torchvision's initializers give this
   shape (kaiming / xavier / "goog" fans, fixed 0.001 to 0.03);
4. distribution: a uniform init's values all lie within its bound and come within ``12 / n`` of it; a normal
   init's kurtosis is 3 (trained kernels are heavy-tailed).

:func:`~.inject.refocus_model` warns when at least :data:`UNTRAINED_FRACTION` of the kernels
it refocuses (of those with ``MIN_VALUES`` values or more) look like an init (or are constant). One trained layer
can pass by chance (ImageNet EfficientNet-Lite0: 1 of its 17 spatial kernels, a 96-channel depthwise one with the
std and kurtosis of a normal init); nine in ten cannot: training leaves structure (test 2) and heavy tails (test 4)
and moves each layer's scale off the initializer's exact value (test 3). Fresh inits of 15 timm and torchvision
architectures pass in every layer (tests/test_guard.py).
"""

from __future__ import annotations

import math

import torch

TOLERANCE = 5.0  # standard errors
UNTRAINED_FRACTION = 0.9  # of the refocused kernels, for the warning
MIN_VALUES = 64  # smaller kernels are too small to tell


def is_constant(weight: torch.Tensor) -> bool:
    """All values equal (zeros included): a buffer never filled, or filled with one number."""
    if weight.is_meta:
        return False
    flat = weight.detach().reshape(-1)
    return bool(flat.numel() > 0 and torch.all(flat == flat[0]))


def is_zero(weight: torch.Tensor) -> bool:
    """All values zero (a meta tensor, which holds no values, is not)."""
    return not weight.is_meta and not bool(torch.any(weight.detach() != 0))


def init_scales(shape: tuple[int, ...], groups: int) -> tuple[list[float], list[float]]:
    """(uniform bounds, normal stds) that common initializers give a conv weight of ``shape``."""
    out_ch, in_per_group, kh, kw = shape
    area = kh * kw
    fan_in, fan_out, fan_out_g = in_per_group * area, out_ch * area, out_ch // max(groups, 1) * area
    bounds = [1 / math.sqrt(fan_in)]  # PyTorch's default: kaiming_uniform_(a=sqrt(5))
    stds = [0.001, 0.01, 0.02, 0.03]  # fixed-std normals (ssdlite's heads use 0.03, ViT-style 0.02)
    for fan in (fan_in, fan_out, fan_out_g, (fan_in + fan_out) / 2):
        for gain in (1.0, math.sqrt(2.0)):
            std = gain / math.sqrt(fan)
            stds.append(std)
            bounds.append(std * math.sqrt(3.0))
    return bounds, stds


def looks_like_init(weight: torch.Tensor, groups: int = 1) -> bool:
    """True when a 4-D conv kernel is statistically indistinguishable from a fresh init (module docstring)."""
    if weight.is_meta:
        return False
    w = weight.detach().double().cpu()
    n = w.numel()
    if w.dim() != 4 or n < MIN_VALUES:
        return False  # too small to tell
    if is_constant(w):
        return True
    std = w.std(unbiased=False).item()
    mean = w.mean().item()
    if abs(mean) > TOLERANCE * std / math.sqrt(n):
        return False
    if not _no_spatial_structure(w):
        return False
    centered = w - mean
    kurtosis = (centered.pow(4).mean() / centered.pow(2).mean().pow(2)).item()
    bounds, stds = init_scales(tuple(w.shape), groups)
    largest = w.abs().max().item()
    # Standard error of the std: std * sqrt((kurtosis - 1) / (4n)); uniform kurtosis 1.8, normal 3.
    for bound in bounds:
        se = bound / math.sqrt(3.0) * math.sqrt(0.8 / (4 * n))
        if abs(std - bound / math.sqrt(3.0)) <= TOLERANCE * se and largest <= bound * (1 + 1e-6) \
                and largest >= bound * (1 - 12 / n):  # P(max of n uniform draws below that) = exp(-12)
            return True
    kurtosis_se = math.sqrt(24.0 / n)
    for expected in stds:
        se = expected * math.sqrt(2.0 / (4 * n))
        if abs(std - expected) <= TOLERANCE * se and abs(kurtosis - 3.0) <= TOLERANCE * kurtosis_se:
            return True
    return False


def _no_spatial_structure(w: torch.Tensor) -> bool:
    """Adjacent taps (horizontal and vertical neighbours in every 2-D kernel) uncorrelated within tolerance."""
    for a, b in ((w[..., :, :-1], w[..., :, 1:]), (w[..., :-1, :], w[..., 1:, :])):
        if a.numel() < 16:
            continue
        a, b = a.reshape(-1) - w.mean(), b.reshape(-1) - w.mean()
        corr = (a * b).mean() / w.var(unbiased=False)
        if abs(corr.item()) > TOLERANCE / math.sqrt(a.numel()):
            return False
    return True
