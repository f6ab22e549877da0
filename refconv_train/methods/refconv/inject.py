"""Model surgery: inject RefConv into a model, find its refocused convs, fuse it (or its state dict) back."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...errors import RefconvError
from ..modules import bake_weight
from ..protocol import ReparamReport, refuse_another_method, spatial_targets
from .base_check import MIN_VALUES, UNTRAINED_FRACTION, is_zero, looks_like_init
from .kernel_math import conv_kind, step_gain
from .parametrization import INITS, Refocus

BASES = ("frozen", "trainable")
BASE_INITS = ("pretrained", "random")

# State-dict key suffixes of a refocused conv (used to recognize RefConv checkpoints without a model).
BASE_KEY = ".parametrizations.weight.original"
REFOCUS_KEY = ".parametrizations.weight.0.refocus_weight"


@dataclass
class RefocusedLayer:
    name: str
    kind: str
    kernel: tuple[int, int]
    weight_shape: tuple[int, ...]
    refocus_shape: tuple[int, ...]
    step_gain: float  # lambda of docs/design.md section 1, from W_b at injection

    @property
    def refocus_params(self) -> int:
        return math.prod(self.refocus_shape)

    @property
    def added_params(self) -> int:
        return self.refocus_params


@dataclass
class RefocusReport(ReparamReport):
    """What :func:`refocus_model` did: the methods' one report (refocused layers, skipped convs with the reason,
    ``start_max_abs_diff``: measured by the registry's apply, init=zeros starts exactly, xavier/kaiming do not)
    with RefConv's table (W_r shapes, step gains)."""

    method: str = "refconv"
    map_k: int = 3
    untrained: list[str] = field(default_factory=list)  # refocused layers whose W_b looked like a fresh init
    table_file: ClassVar[str] = "refocus_report.txt"

    @property
    def refocus_params(self) -> int:
        return sum(layer.refocus_params for layer in self.layers)

    def summary(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        return (f"refocused {len(self.layers)} convs ({kinds}), map_k={self.map_k}, "
                f"W_r params={self.refocus_params:,}; skipped {len(self.skipped)}")

    def table(self) -> str:
        rows = [f"{'layer':40s} {'kind':9s} {'kernel':8s} {'W_r shape':22s} {'W_r params':>11s} {'step gain':>10s}"]
        for layer in self.layers:
            kernel = "x".join(map(str, layer.kernel))
            rows.append(f"{layer.name:40s} {layer.kind:9s} {kernel:8s} {str(layer.refocus_shape):22s} "
                        f"{layer.refocus_params:>11,} {layer.step_gain:>10.4g}")
        rows += [f"{name:40s} skipped: {why}" for name, why in self.skipped]
        rows.append(self.summary())
        rows.append("step gain: lambda, how much faster than a plain kernel one SGD step on W_r moves W_t "
                    "(refconv.step_norm=layer divides each W_r's lr by it)")
        return "\n".join(rows)


def refocus_model(
    model: nn.Module,
    map_k: int = 3,
    init: str = "xavier",
    exclude: Iterable[str] = (),
    base: str = "frozen",
    base_init: str = "pretrained",
    check_base: bool = True,
) -> RefocusReport:
    """Inject RefConv in place into every ``nn.Conv2d`` (subclasses included) whose kernel is at least ``map_k``.

    A model that already holds a re-parameterization (RefConv, ACB, ..., OWN) is refused: one method per model; a
    conv whose weight carries someone else's parametrization is skipped.
    ``exclude``: regular expressions searched in module names; matching convs are left alone. ``base``: ``frozen``
    (paper) or ``trainable``; ``base_init``: ``pretrained`` (paper) or ``random`` (the paper's Fig. 5 ablations).
    With ``base_init="pretrained"`` the kernels must have been trained: an all-zero one (a dead layer) is an error,
    and a warning says so when nine in ten of them look like a fresh init (``refocus/base_check.py``);
    ``check_base=False`` skips both (a model whose weights are loaded after refocusing, e.g. from a checkpoint).
    Returns a :class:`RefocusReport`; raises :class:`RefconvError` on bad arguments or when nothing is eligible.
    """
    _check_args(map_k, init, base, base_init)
    refuse_another_method(model, "refconv")
    report = RefocusReport(map_k=map_k)
    # The targets every method finds the same way (protocol.spatial_targets), minus kernels smaller than map_k.
    spatial, report.skipped = spatial_targets(model, "refocus", exclude, is_taken=_is_taken)
    targets: list[tuple[str, nn.Conv2d]] = []
    for name, module in spatial:
        kh, kw = module.kernel_size
        if kh < map_k or kw < map_k:
            report.skipped.append((name, f"kernel {kh}x{kw} smaller than map_k={map_k}"))
        else:
            targets.append((name, module))
    check = check_base and base_init == "pretrained"
    for name, module in targets:  # before any surgery: an error leaves the model as it was
        if check and base == "frozen" and is_zero(module.weight):
            raise RefconvError(
                f"refocus: conv '{name}' has an all-zero kernel, a dead layer (W_t = 0 + conv(0, W_r) = 0 never "
                f"learns): load the trained weights before refocus_model, exclude the layer, or pass "
                f"base_init='random' (the paper's ablation)")
    for name, module in targets:
        if check and looks_like_init(module.weight, module.groups):
            report.untrained.append(name)
        report.layers.append(_refocus_conv(name, module, map_k, init, base, base_init))
    if not report.layers:
        raise RefconvError(f"refocus found no convolution to refocus{_nothing_hint(report.skipped, map_k)}")
    checked = sum(math.prod(layer.weight_shape) >= MIN_VALUES for layer in report.layers)
    if report.untrained and len(report.untrained) >= UNTRAINED_FRACTION * checked:
        warnings.warn(f"refocus: {len(report.untrained)} of the {checked} kernels to refocus look untrained "
                      f"(a fresh init: no spatial structure, an initializer's exact scale); RefConv refocuses "
                      f"trained kernels, load the model's trained weights first (or pass base_init='random' for the "
                      f"paper's ablation)", stacklevel=2)
    return report


def _nothing_hint(skipped: list[tuple[str, str]], map_k: int) -> str:
    """Why no conv was refocused, and what to change: only the advice that applies."""
    count = {what: sum(why.startswith(what) for _, why in skipped) for what in ("kernel", "excluded", "weight")}
    small = f"map_k={map_k} is larger than all {count['kernel']} spatial kernels" if not (
        count["excluded"] or count["weight"]) else f"{count['kernel']} smaller than map_k={map_k}"
    seen = [text for n, text in ((count["kernel"], small), (count["excluded"], f"{count['excluded']} excluded"),
                                 (count["weight"], f"{count['weight']} parametrized")) if n]
    fixes = [fix for n, fix in ((count["kernel"], "use a smaller odd map_k"), (count["excluded"], "fewer excludes"),
                                (count["weight"], "remove the other weight parametrizations")) if n]
    if not seen:
        return " (no spatial conv: 1x1 convs are never refocused)"
    return f" ({', '.join(seen)}): {' or '.join(fixes)}"


def _refocus_conv(name: str, conv: nn.Conv2d, map_k: int, init: str, base: str, base_init: str) -> RefocusedLayer:
    if base_init == "random":
        with torch.no_grad():
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    shape = tuple(conv.weight.shape)
    gain = step_gain(conv.weight, map_k, conv.groups)
    p = Refocus(conv.weight.shape, conv.groups, map_k, init).to(conv.weight.device, conv.weight.dtype)
    parametrize.register_parametrization(conv, "weight", p)
    conv.parametrizations.weight.original.requires_grad_(base == "trainable")
    return RefocusedLayer(name, conv_kind(conv), tuple(conv.kernel_size), shape, tuple(p.refocus_weight.shape), gain)


def _is_taken(conv: nn.Conv2d) -> bool:
    """Another re-parameterization (or RefConv itself) already holds this conv."""
    return parametrize.is_parametrized(conv, "weight") or hasattr(conv, "rep_branches")


def _check_args(map_k: int, init: str, base: str, base_init: str) -> None:
    if not isinstance(map_k, int) or map_k < 1 or map_k % 2 == 0:
        raise RefconvError(f"refocus map_k={map_k!r} must be an odd positive integer (the paper uses 3)")
    if init not in INITS:
        raise RefconvError(f"refocus init {init!r} is unknown: use one of {', '.join(INITS)}")
    if base not in BASES:
        raise RefconvError(f"refocus base {base!r} is unknown: use one of {', '.join(BASES)}")
    if base_init not in BASE_INITS:
        raise RefconvError(f"refocus base_init {base_init!r} is unknown: use one of {', '.join(BASE_INITS)}")


def refocused_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> conv for every conv that currently carries a :class:`Refocus` parametrization."""
    return {
        name: m for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, Refocus) for p in m.parametrizations.weight)
    }


def refocus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All ``W_r`` tensors of a refocused model."""
    return [p for conv in refocused_convs(model).values() for p in conv.parametrizations.weight[0].parameters()]


def fuse_model(model: nn.Module) -> list[str]:
    """Replace every RefConv by the plain conv with weight ``W_t``, in place; returns the fused module names.

    Afterwards the model has the original module classes, parameter names and shapes (idempotent).
    """
    names = []
    for name, conv in refocused_convs(model).items():
        bake_weight(conv)
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------- state dicts
def is_refocus_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(REFOCUS_KEY) for k in state_dict)


def refocused_kernels(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(conv name, W_b, W_r)`` for every refocused conv of a state dict, in key order; an incomplete pair is an
    error. ``W_r``'s shape carries everything the transform needs (``n``, ``g``, ``m``): no model is needed."""
    for key, value in state_dict.items():
        if key.endswith(BASE_KEY):
            prefix = key[: -len(BASE_KEY)]
            w_r = state_dict.get(prefix + REFOCUS_KEY)
            if w_r is None:
                raise RefconvError(f"state dict has {key} but no {prefix + REFOCUS_KEY}: incomplete RefConv checkpoint")
            yield prefix, value, w_r


def fuse_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse a refocused model's state dict into the original architecture's, exactly and without building the model."""
    fused = {}
    for prefix, w_b, w_r in refocused_kernels(state_dict):
        with torch.no_grad():
            w_t = Refocus.from_weight(w_r.float())(w_b.float())  # the module's own arithmetic, bit for bit
        fused[prefix + BASE_KEY] = (prefix + ".weight", w_t.to(w_b.dtype))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in fused:
            out[fused[key][0]] = fused[key][1]
        elif not key.endswith(REFOCUS_KEY):
            out[key] = value
    return out
