"""``Refocus``: the ``torch.nn.utils.parametrize`` parametrization ``W_b -> W_b + conv(W_b, W_r)`` of a conv weight.

The conv keeps its class, padding logic (timm's dynamic "same" padding included) and bias; fusing removes the
parametrization and leaves ``W_t`` as a plain weight of the original shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import RefconvError
from ..modules import same_values
from .kernel_math import kernel_patches, refocus_delta, refocus_delta_gemm, refocus_shape

INITS = ("xavier", "zeros", "kaiming")


class Refocus(nn.Module):
    """Parametrization ``W_b -> W_b + conv(W_b, W_r)`` holding the learnable ``refocus_weight`` (``W_r``).

    Two caches keep the cost off the hot path, each served only while its inputs hold the values it was made from
    (compared with a snapshot: version counters miss an edit through ``p.data``, e.g. old-style optimizers or manual
    surgery, and the caches then served, and fusing baked in, the old ``W_t``):
    - the unfolded patches of a frozen ``W_b`` (the transform is then a single GEMM, forward and backward);
    - ``W_t`` itself while autograd is off (evaluation does not recompute it per batch).
    """

    # Dense convs (g = 1) give each 2-D kernel a private m x m filter, and their patch matrix is m*m times the
    # kernel's size (resnet18: 400 MB). On CPU the grouped conv (oneDNN) beat every other form we measured; on CUDA the
    # GEMM on cached patches ran resnet18's 512-channel layer 4.4x faster (docs/performance.md).
    # None: GEMM on CUDA only; True/False force it.
    dense_gemm: bool | None = None

    def __init__(self, weight_shape: torch.Size, conv_groups: int, map_k: int = 3, init: str = "xavier"):
        super().__init__()
        self.map_k = map_k
        self.conv_groups = conv_groups
        self.refocus_weight = nn.Parameter(torch.empty(refocus_shape(weight_shape, conv_groups, map_k)))
        init_refocus_weight(self.refocus_weight, init)
        self._patches: tuple | None = None  # (inference mode, snapshot of W_b, patches)
        self._eval_weight: tuple | None = None  # (inference mode, snapshots of W_b and W_r, W_t)
        self.step_weight: torch.Tensor | None = None  # W_t of the current optimizer step (PerStepTransform.step)

    @classmethod
    def from_weight(cls, refocus_weight: torch.Tensor) -> Refocus:
        """A parametrization holding a given ``W_r`` (its shape ``(n, g, m, m)`` determines everything else)."""
        n, g, m, _ = refocus_weight.shape
        p = cls((n, 1), g, m, init="zeros")
        p.refocus_weight = nn.Parameter(refocus_weight, requires_grad=refocus_weight.requires_grad)
        return p

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.step_weight is not None:
            return self.step_weight
        w_r = self.refocus_weight
        if not torch.is_grad_enabled():
            key = _cache_key(base, w_r)
            if self._eval_weight is None or self._eval_weight[0] != key or not same_values(self._eval_weight[1],
                                                                                             (base, w_r)):
                self._eval_weight = (key, _snapshot(base, w_r), self._compute(base, w_r))
            return self._eval_weight[2]
        self._eval_weight = None
        return self._compute(base, w_r)

    def _compute(self, base: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
        # W_t in the parameters' precision (fp32), like any weight under AMP: the conv that uses it casts it.
        with torch.autocast(base.device.type, enabled=False):
            dense_conv = self.conv_groups == 1 and not self._dense_gemm(base)
            if dense_conv or base.requires_grad or torch.jit.is_scripting() or _is_compiling():
                return base + refocus_delta(base, w_r)  # a trainable base needs the graph through W_b
            return base + refocus_delta_gemm(base, w_r, self._frozen_patches(base))

    def _dense_gemm(self, base: torch.Tensor) -> bool:
        return base.device.type == "cuda" if self.dense_gemm is None else self.dense_gemm

    def _frozen_patches(self, base: torch.Tensor) -> torch.Tensor:
        key = _cache_key(base)
        if self._patches is None or self._patches[0] != key or not same_values(self._patches[1], (base,)):
            with torch.no_grad():  # stored transposed (same values): the layout _PatchGemm reads without copies
                patches = kernel_patches(base, self.map_k, self.conv_groups).transpose(1, 2).contiguous()
                self._patches = (key, _snapshot(base), patches.transpose(1, 2))
        return self._patches[2]

    def extra_repr(self) -> str:
        return f"map_k={self.map_k}, groups={self.conv_groups}, refocus_weight={tuple(self.refocus_weight.shape)}"


def _is_compiling() -> bool:
    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


def _cache_key(*tensors: torch.Tensor) -> tuple:
    """Where the inputs live and how they are laid out (a copy, ``.to(...)`` or ``.float()`` makes a new cache: the
    cached result keeps its inputs' memory format, and channels_last and contiguous convs round differently), and
    whether inference mode is on (inference tensors must not leak into training or fusing). The values are checked
    separately, against a snapshot."""
    layout = tuple((t.data_ptr(), t.stride(), t.dtype, t.device, t.shape) for t in tensors)
    return torch.is_inference_mode_enabled(), layout


def _snapshot(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(t.detach().clone() for t in tensors)


def init_refocus_weight(weight: torch.Tensor, init: str) -> None:
    """``xavier`` (paper), ``zeros`` (starts exactly at the pretrained model), ``kaiming`` (PyTorch's conv default)."""
    with torch.no_grad():
        if init == "xavier":
            nn.init.xavier_uniform_(weight)
        elif init == "zeros":
            nn.init.zeros_(weight)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        else:
            raise RefconvError(f"refocus init {init!r} is unknown: use one of {', '.join(INITS)}")
