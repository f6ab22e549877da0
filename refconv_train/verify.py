"""Numerical checks of re-parameterization: the fused model must compute what the refocused model computes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0) -> None:
    """Give every norm layer non-trivial running statistics and affine parameters.

    Fresh BN (mean 0, var 1, weight 1, bias 0) is nearly the identity and hides kernel bugs (RepVGG's lesson).
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
        if isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@torch.no_grad()
def output_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Max |a(x) - b(x)|, both models in eval mode (their modes are restored afterwards)."""
    return output_diff_and_scale(a, b, x)[0]


@contextmanager
def full_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls in full precision, not TF32: cuDNN takes TF32 for fp32 convs on Ampere and later
    GPUs by default (a 10-bit mantissa), and a fused DBB model then differed from its trained twin by 2e-4 of the
    output scale on an H200, twice the check's tolerance, with both sides right."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@torch.no_grad()
def output_diff_and_scale(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max |a(x) - b(x)| and max |a(x)|, both models in eval mode (their modes are restored afterwards), in full fp32
    (:func:`full_fp32`); both NaN when an output is not finite (a diverged model is no proof of a fuse)."""
    modes = a.training, b.training
    a.eval()
    b.eval()
    try:
        with full_fp32():
            out_a, out_b = a(x).float(), b(x).float()
        if not (out_a.isfinite().all() and out_b.isfinite().all()):
            return float("nan"), float("nan")
        return (out_a - out_b).abs().max().item(), out_a.abs().max().item()
    finally:
        a.train(modes[0])
        b.train(modes[1])


def max_output_diff(a: nn.Module, b: nn.Module, input_size: tuple[int, ...], batch: int = 2, seed: int = 0,
                    device: torch.device | str = "cpu") -> float:
    """:func:`output_diff` on seeded random fp32 inputs of ``(batch, *input_size)``."""
    x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed)).to(device)
    return output_diff(a, b, x)
