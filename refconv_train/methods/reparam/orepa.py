"""OREPA (Hu et al., CVPR 2022) on every spatial conv of any timm / torchvision model, fused back exactly.

OREPA's answer to the structural methods' training cost: its branches are linear (a learned per-output-channel scale
instead of each branch's BN), so the whole block is squeezed into ONE kernel online and one conv runs on the
activations (DBB runs every branch on them). Here that kernel is a ``torch.nn.utils.parametrize`` parametrization of
the conv's weight (:class:`~.orepa_kernel.OrepaKernel`, branches listed there): the conv keeps its class, padding
logic (timm's dynamic "same" padding included), bias and the BN after it; fusing removes the parametrization and
leaves the current kernel as a plain weight of the original shape, so the fused model loads strictly into a freshly
built original model. No branch has a bias, so nothing goes into a following BN and no conv needs one.

Exact start: ``origin`` (the pretrained kernel) has scale 1 and every new branch scale 0 (``branch_scale``), so the
kernel is the pretrained one bit for bit; the report's ``start_max_abs_diff`` measures it (eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...errors import RefconvError
from .. import protocol
from ..modules import bake_weight
from .orepa_kernel import SEPARABLE_EXPANSION, OrepaKernel
from .structural import _KNOWN_FORWARDS

METHOD = "orepa"


def _is_taken(conv: nn.Conv2d) -> bool:  # RefConv / weight methods' parametrizations, structural branches
    return parametrize.is_parametrized(conv, "weight") or hasattr(conv, "rep_branches")


def _reason_to_skip(conv: nn.Conv2d) -> str | None:
    if type(conv).forward not in _KNOWN_FORWARDS:  # e.g. timm's StdConv2d standardizes the weight it reads
        return f"custom forward ({type(conv).__name__}): its weight use is unknown"
    if not conv.weight.is_floating_point():
        return f"weight dtype {conv.weight.dtype}: OREPA's branches need a floating-point kernel"
    return None


def apply_orepa(model: nn.Module, exclude: Iterable[str] = (), branch_scale: float = 0.0,
                example: torch.Tensor | None = None) -> protocol.ReparamReport:
    """Give every eligible spatial conv (kernel > 1x1) of ``model`` OREPA's online kernel, in place.

    ``exclude``: regexes over module names. ``branch_scale``: every new branch's initial scale, times the authors'
    from-scratch value (0: the model starts exactly where it was; 1.0: the authors' init, ``origin`` kept at 1).
    ``example``: the input on which the start is measured (default :func:`protocol.example_input`).

    Skipped, with the reason in the report: 1x1 convs, ``exclude`` matches, convs already re-parameterized (RefConv,
    WN/CWN/OWN parametrizations, structural branches; the convs inside branches are not listed) and subclasses with
    their own ``forward`` (timm's ``Conv2dSame`` is supported). Raises :class:`RefconvError` on a bad
    ``branch_scale`` or when nothing is eligible."""
    if isinstance(branch_scale, bool) or not isinstance(branch_scale, (int, float)) or not math.isfinite(branch_scale):
        raise RefconvError(f"orepa branch_scale={branch_scale!r} must be a finite number (0: exact start, 1: the "
                           f"authors' init)")
    targets, skipped = protocol.spatial_targets(model, METHOD, exclude, is_taken=_is_taken)
    x = protocol.example_input(model) if example is None else example
    before = protocol.eval_outputs(model, x) if targets else None
    report = protocol.ReparamReport(METHOD, skipped=skipped)
    for name, conv in targets:
        why = _reason_to_skip(conv)
        if why is not None:
            report.skipped.append((name, why))
            continue
        kernel = OrepaKernel(conv, float(branch_scale))
        parametrize.register_parametrization(conv, "weight", kernel)
        added = sum(p.numel() for p in kernel.parameters())
        inner = kernel.identity.shape[0]
        report.layers.append(protocol.layer_info(
            name, conv, added, f"origin + avg + prior + 1x1-kxk (inner {inner}) + 1x1 + separable "
                               f"(x{SEPARABLE_EXPANSION}), scales x{float(branch_scale):g}"))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.skipped.sort(key=lambda item: order[item[0]])
    if not report.layers:
        raise protocol.nothing_changed(METHOD, report.skipped)
    after = protocol.eval_outputs(model, x)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        report.start_max_abs_diff = (after - before).abs().max().item()
    return report


def orepa_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> conv for every conv whose weight currently carries OREPA's kernel (no other method's)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight")
        and len(m.parametrizations.weight) == 1 and isinstance(m.parametrizations.weight[0], OrepaKernel)
    }


def fuse_orepa(model: nn.Module) -> list[str]:
    """Replace every OREPA conv's weight by its current kernel, a plain parameter, in place; returns the fused names.

    Afterwards the convs have their original classes, parameter names and shapes (idempotent; other methods'
    parametrizations and branches untouched)."""
    names = []
    for name, conv in orepa_convs(model).items():
        bake_weight(conv)
        names.append(name)
    return names
