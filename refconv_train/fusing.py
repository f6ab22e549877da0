"""Fuse a refocused model into the original architecture and prove it computes the same function."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_save, atomic_save_safetensors, fused_checkpoint, unwrap
from .errors import RefconvError
from .models import build_model
from .refocus import fuse_model, refocused_convs
from .verify import randomize_bn_stats


@dataclass
class FuseResult:
    model: nn.Module  # the original architecture with the fused weights, freshly built and strictly loaded
    max_abs_diff: float


@torch.no_grad()
def fuse_and_verify(refocused: nn.Module, name: str, num_classes: int, img_size: int, atol: float = 1e-4,
                    batch: int = 4, seed: int = 0) -> FuseResult:
    """Fuse a copy of ``refocused`` (left untouched), load the fused weights **strictly** into a freshly built
    ``name`` model, and compare eval-mode outputs on random fp32 inputs of ``img_size``. Raises above ``atol``."""
    source = unwrap(refocused)
    if not refocused_convs(source):
        raise RefconvError("the model holds no RefConv layer: nothing to fuse")
    device = next(source.parameters()).device
    fused = copy.deepcopy(source).float()
    fuse_model(fused)
    fresh = build_model(name, num_classes=num_classes, pretrained=False)
    try:
        fresh.load_state_dict(fused.state_dict(), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise RefconvError(f"fused weights do not load strictly into a fresh {name!r}: {first}") from None
    fresh.to(device)
    reference = copy.deepcopy(source).float()
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)).to(device)
    # Once with the trained statistics (what is deployed), once with randomized norm statistics on copies of both
    # (near-identity BN can hide a wrong kernel; RepVGG's lesson).
    diff = _max_diff(reference, fresh, x)
    ref_rand, fresh_rand = copy.deepcopy(reference), copy.deepcopy(fresh)
    randomize_bn_stats(ref_rand, seed)
    randomize_bn_stats(fresh_rand, seed)
    diff = max(diff, _max_diff(ref_rand, fresh_rand, x))
    if not diff <= atol:  # also catches NaN
        raise RefconvError(f"fused model differs from the RefConv model: max_abs_diff={diff:.3g} > atol={atol:g}; "
                           f"the checkpoint was not written")
    return FuseResult(model=fresh.cpu(), max_abs_diff=diff)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    return (a(x).float() - b(x).float()).abs().max().item()


def write_fused(result: FuseResult, out: str | os.PathLike, arch: str, num_classes: int, config: dict,
                safetensors: bool = True) -> list[Path]:
    """Write ``out`` (DESIGN 4 fused format) atomically, and its ``.safetensors`` twin (bare state dict)."""
    out = Path(out)
    atomic_save(fused_checkpoint(result.model, arch, num_classes, config, result.max_abs_diff), out)
    written = [out]
    if safetensors:
        twin = out.with_suffix(".safetensors")
        atomic_save_safetensors(result.model.state_dict(), twin)
        written.append(twin)
    return written
