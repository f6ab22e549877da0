"""The weight re-parameterizations the paper compares RefConv with: WN, CWN and OWN, on every spatial conv of a model.

Each is a ``torch.nn.utils.parametrize`` parametrization of the conv's ``weight``, as RefConv is: the conv keeps its
class, padding logic (timm's dynamic "same" padding included) and bias, and fusing removes the parametrization and
leaves ``W`` as a plain weight of the original shape. Their parameters are ordinary parameters (DDP all-reduces
them; :mod:`refconv_train.methods.refconv.per_step` handles RefConv's alone).

- ``wn`` (Salimans & Kingma 2016): torch's ``weight_norm``, ``dim=0``: ``W_o = g_o V_o / ||V_o||``, one ``g`` per
  output filter (keys ``original0`` = g, ``original1`` = V). Starts exactly at the given weights (see :func:`_wn`).
- ``cwn`` (Huang et al., ICCV 2017): :class:`CentredWeightNorm`, ``W_o = g_o c_o / ||c_o||``, ``c_o = V_o - mean(V_o)``
  (keys ``original0`` = g, ``original1`` = V). ``V = W``, ``g = ||W_o - mean(W_o)||``: the start is the projection of
  ``W`` onto zero-mean filters with the same centred norm, i.e. ``W`` minus each filter's mean, bit for bit.
- ``own`` (Huang et al., AAAI 2018): :class:`OrthogonalWeightNorm`, per group of consecutive filters the centred
  filter matrix whitened, ``(V_c V_c^T + delta I)^(-1/2) V_c`` (key ``original`` = V). ``V = W``. Groups hold at
  most ``fan_in - 1`` filters (zero-mean filters span only that many dimensions), balanced, across conv groups (a
  depthwise 3x3 conv: groups of 8 channels). No learned scale, as in the paper: every filter has unit norm, so a
  pretrained start moves (measured in the report).

CWN and OWN cannot represent an arbitrary kernel: ``apply_weight_reparam`` reports how far the start moved
(``start_max_abs_diff``, eval mode) and, per layer, the relative change of the kernel.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from ...errors import RefconvError
from .. import protocol
from ..modules import bake_weight, same_values
from .weight_math import centred_norm, centred_weight_norm, orthogonal_weight_norm, own_group_sizes

METHODS = ("wn", "cwn", "own")
# CWN: added to the squared centred norm. The start does not depend on it (g's init absorbs it exactly); it only caps
# the gain 1 / ||c_o|| for filters of centred norm below 1e-4 (dead or constant filters stay finite, not NaN).
CWN_EPS = 1e-8
# OWN: ridge relative to the mean eigenvalue of V_c V_c^T (scale-invariant). Directions with eigenvalue lam are
# scaled by sqrt(lam / (lam + delta)) instead of 1; fp32 eigh resolves eigenvalues to ~1e-7 of the largest.
OWN_EPS = 1e-5


class _CachedInEval(nn.Module):
    """With autograd off, ``W`` is computed once and served again while its inputs hold the same values: OWN's eigh
    is the expensive part (resnet18, 64 px, batch 16, one CPU thread: eval forward 4.0x slower without the cache,
    CWN 2.0x; the check below costs 1.2x and 1.4x there, less at real image sizes).

    The check compares the inputs' values with a snapshot taken when ``W`` was computed. Version counters alone are
    not enough: an edit through ``p.data`` (old-style optimizers, manual surgery) does not bump them, and the cache
    then served, and fusing baked in, the old ``W``."""

    def _cached(self, *tensors: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self._eval_weight = None
            return self._compute(*tensors)
        # inference tensors must not leak into no-grad code (fusing); a moved or re-laid-out input makes a new W (the
        # cached one keeps its inputs' memory format, and channels_last and contiguous convs round differently)
        mode = (torch.is_inference_mode_enabled(), tuple((t.data_ptr(), t.stride()) for t in tensors))
        cache = getattr(self, "_eval_weight", None)
        if cache is None or cache[0] != mode or not same_values(cache[1], tensors):
            snapshot = tuple(t.detach().clone() for t in tensors)
            self._eval_weight = cache = (mode, snapshot, self._compute(*tensors))
        return cache[2]

    def _compute(self, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __deepcopy__(self, memo: dict) -> nn.Module:
        self_copy = copy.copy(self)  # shallow, then deep-copy everything but the cache
        memo[id(self)] = self_copy
        self_copy.__dict__ = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_eval_weight"}
        return self_copy


class CentredWeightNorm(_CachedInEval):
    """CWN parametrization ``(g, V) -> g * c / sqrt(||c||^2 + eps)`` per output filter, ``c = V - mean(V)``."""

    reparam_method = "cwn"

    def __init__(self, eps: float = CWN_EPS):
        super().__init__()
        self.eps = eps

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._cached(g, v)

    def _compute(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(v.device.type, enabled=False):  # W in the parameters' precision, like any weight
            return centred_weight_norm(g, v, self.eps)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``V = W``, ``g = sqrt(||W_o - mean(W_o)||^2 + eps)``: the forward then returns the centred ``W`` exactly."""
        with torch.no_grad():
            return centred_norm(weight, self.eps), weight

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class OrthogonalWeightNorm(_CachedInEval):
    """OWN parametrization ``V -> (V_c V_c^T + delta I)^(-1/2) V_c`` per group of consecutive output filters
    (:func:`~.weight_math.orthogonal_weight_norm`); ``group`` rows at most (0 = ``fan_in - 1``, the most zero-mean
    rows that can be orthonormal)."""

    reparam_method = "own"

    def __init__(self, group: int = 0, eps: float = OWN_EPS):
        super().__init__()
        self.group = group
        self.eps = eps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self._cached(v)

    def _compute(self, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(v.device.type, enabled=False):  # eigh needs fp32 or better
            return orthogonal_weight_norm(v, self.group, self.eps)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def extra_repr(self) -> str:
        return f"group={self.group}, eps={self.eps}"


def apply_weight_reparam(model: nn.Module, method: str, exclude: Iterable[str] = (), own_group: int = 0,
                         example: torch.Tensor | None = None) -> protocol.ReparamReport:
    """Parametrize, in place, the weight of every spatial conv (kernel > 1x1) with ``method`` (``wn``, ``cwn``,
    ``own``), except those matched by an ``exclude`` regular expression or whose weight carries someone else's
    parametrization. A model holding RefConv or another method is refused (one method per model).

    ``own_group``: OWN's maximum group size (0 = ``fan_in - 1``; larger values are capped there per conv).
    ``example``: the input on which the start is measured (default :func:`protocol.example_input`). Raises
    :class:`RefconvError` on bad arguments or when nothing is eligible.
    """
    if method not in METHODS:
        raise RefconvError(f"weight re-parameterization {method!r} is unknown: use one of {', '.join(METHODS)}")
    if not isinstance(own_group, int) or isinstance(own_group, bool) or own_group < 0:
        raise RefconvError(f"own_group={own_group!r} must be a non-negative integer (0 = fan-in - 1)")
    if own_group and method != "own":
        raise RefconvError(f"own_group={own_group} only applies to method 'own', not {method!r}")
    targets, skipped = protocol.spatial_targets(model, method, exclude, is_taken=_is_taken)
    if not targets:
        raise protocol.nothing_changed(method, skipped)
    x = protocol.example_input(model) if example is None else example
    before = protocol.eval_outputs(model, x)
    report = protocol.ReparamReport(method, skipped=skipped)
    for name, conv in targets:
        weight = conv.weight.detach().clone()
        if method == "wn":
            if not bool((weight.reshape(len(weight), -1).abs().amax(dim=1) > 0).all()):
                report.skipped.append((name, "a filter is all zero: weight norm's V / ||V|| is undefined"))
                continue
            added = _wn(conv)
        elif method == "cwn":
            parametrize.register_parametrization(conv, "weight", CentredWeightNorm())
            added = conv.parametrizations.weight.original0.numel()
        else:
            parametrize.register_parametrization(conv, "weight", OrthogonalWeightNorm(own_group))
            added = 0
        with torch.no_grad():
            moved = ((conv.weight - weight).norm() / weight.norm().clamp_min(1e-30)).item()
        report.layers.append(protocol.layer_info(name, conv, added, _detail(method, conv, own_group, moved)))
    if not report.layers:
        raise protocol.nothing_changed(method, report.skipped)
    report.start_max_abs_diff = (protocol.eval_outputs(model, x) - before).abs().max().item()
    return report


def _wn(conv: nn.Conv2d) -> int:
    """torch's weight norm, made to start exactly at ``W``: its ``right_inverse`` sets ``g = norm_except_dim(V)``,
    but the forward divides by the norm of the fused kernel, which can differ in the last bit (measured: up to 2.4e-7
    on mobilenetv2_100). We set ``g`` to that kernel's own norm, so ``g / ||V|| == 1.0`` and ``W`` comes back bit for
    bit on CPU (on CUDA the kernel multiplies by ``1 / ||V||``: within an ulp or two; checked below at 1e-6)."""
    weight = conv.weight.detach().clone()
    weight_norm(conv, "weight", dim=0)
    conv.parametrizations.weight[0].reparam_method = "wn"
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    with torch.no_grad():
        if v.dtype in (torch.float32, torch.float64) and v.device.type in ("cpu", "cuda"):
            g.copy_(torch._weight_norm_interface(v, torch.ones_like(g), 0)[1].reshape(g.shape))
        err = (conv.weight - weight).abs().max().item()
    if err > 1e-6 * weight.abs().max().item():
        raise RefconvError(f"weight norm moved the start kernel by {err:.3g}: expected an exact start")
    return g.numel()


def _detail(method: str, conv: nn.Conv2d, own_group: int, moved: float) -> str:
    if method == "wn":
        return "exact start"
    text = f"kernel moved {moved:.3g} (relative)"
    if method == "own":
        fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        sizes = own_group_sizes(conv.out_channels, fan_in, own_group)
        text += f", {len(sizes)} groups of {max(sizes)}" + ("" if min(sizes) == max(sizes) else f"/{min(sizes)}")
    return text


def _is_taken(conv: nn.Conv2d) -> bool:
    return parametrize.is_parametrized(conv, "weight") or hasattr(conv, "rep_branches")


def weight_reparam_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> conv for every conv whose weight carries one of this module's parametrizations (never RefConv's)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight")
        and len(m.parametrizations.weight) == 1
        and getattr(m.parametrizations.weight[0], "reparam_method", None) in METHODS
    }


def fuse_weight(model: nn.Module) -> list[str]:
    """Replace every WN/CWN/OWN conv by the plain conv holding its current ``W``, in place; returns the fused names.

    Afterwards the convs have their original classes, parameter names and shapes (idempotent; RefConv untouched).
    """
    names = []
    for name, conv in weight_reparam_convs(model).items():
        bake_weight(conv)
        names.append(name)
    return names
