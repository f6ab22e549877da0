"""Numerical checks of re-parameterization: the fused model must compute what the refocused model computes."""

from __future__ import annotations

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


@torch.no_grad()
def output_diff_and_scale(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max |a(x) - b(x)| and max |a(x)|, both models in eval mode (their modes are restored afterwards)."""
    modes = a.training, b.training
    a.eval()
    b.eval()
    try:
        out_a = a(x).float()
        return (out_a - b(x).float()).abs().max().item(), out_a.abs().max().item()
    finally:
        a.train(modes[0])
        b.train(modes[1])


def max_output_diff(a: nn.Module, b: nn.Module, input_size: tuple[int, ...], batch: int = 2, seed: int = 0,
                    device: torch.device | str = "cpu") -> float:
    """:func:`output_diff` on seeded random fp32 inputs of ``(batch, *input_size)``."""
    x = torch.randn((batch, *input_size), generator=torch.Generator().manual_seed(seed)).to(device)
    return output_diff(a, b, x)
