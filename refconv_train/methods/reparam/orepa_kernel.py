"""OREPA's online kernel (Hu et al., "Online Convolutional Re-parameterization", CVPR 2022): six linearly scaled
branches squeezed into ONE ``kh x kw`` kernel every step, so a single conv runs on the activations.

Each branch is linear (no BatchNorm inside, OREPA's point) and scaled per output channel by a learned vector, the
paper's replacement of the branch BN. A branch is a chain of convs, so its kernel is a product of kernels (the
transforms of :mod:`.transforms`): run on the zero-padded input, a chain without biases equals one conv with that
kernel, exactly, for any stride, dilation and padding. Branches (as the authors' ``OREPA`` block, ``blocks.py``):

- ``origin``: the conv's own (pretrained) ``kh x kw`` kernel ``W``;
- ``avg``: a ``1x1`` conv, then a ``kh x kw`` average pool;
- ``prior``: a ``1x1`` conv, then per output channel a fixed frequency filter (:func:`frequency_prior`);
- ``1x1_kxk``: an identity-based ``1x1`` conv (identity + a learned delta starting at 0) to ``inner`` channels, then a
  ``kh x kw`` conv; ``inner`` = ``C_in`` for ``groups <= 4``, else ``2 C_in`` (the authors' rule);
- ``1x1``: a ``1x1`` conv at the centre of the frame (top/left of centre for an even kernel);
- ``separable``: a depthwise ``kh x kw`` conv with channel multiplier 8, then a ``1x1`` conv (the authors' expand 8).

Left out: nothing of the ``OREPA`` block. Its BN after the summed kernel is the conv's own following layer here (a
pretrained model's BN, untouched; a conv without one gets none: a new BN would move the pretrained function);
``OREPA_LargeConv`` (a stack of 3x3 OREPAs for large kernels) is a
different block, not the default one; ``OREPA_1x1`` (for 1x1 convs) is out of scope, as 1x1 convs are for every
method here (spatial convs only). Two generalizations: the authors' prior is written for 3x3 only (its loops run
to 3; a larger kernel keeps uninitialized memory): it is their cosine basis over ``kh`` rows / ``kw`` columns here;
and their separable kernel permutes the point-wise rows across groups (a relabelling of a random init), while this
is the plain depthwise-separable conv, the paper's definition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import kernel_algebra as T
from .weight import _CachedInEval

BRANCHES = ("origin", "avg", "prior", "1x1_kxk", "1x1", "separable")
# The authors' initial scales (``vector`` rows, init_hyper_gamma=1): origin 0.25, avg 0.25, prior 0, 1x1_kxk 0.5,
# 1x1 1.0, separable 0.5. A pretrained start keeps ``origin`` at 1 (the pretrained kernel as it is); the others start
# at ``branch_scale`` times these (0: exact start; 1: the authors' from-scratch values).
AUTHORS_SCALE = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)
SEPARABLE_EXPANSION = 8


def frequency_prior(channels: int, frame: tuple[int, int], dtype: torch.dtype | None = None,
                    device: torch.device | None = None) -> Tensor:
    """OREPA's fixed prior filters ``(C, 1, kh, kw)``: a DCT-II-like cosine per output channel, along the rows for
    the first half of the channels (``cos(pi (h + 1/2)(c + 1) / kh)``), along the columns for the second half
    (``cos(pi (w + 1/2)(c + 1 - C/2) / kw)``), with the authors' half ``C / 2`` (a float for odd ``C``)."""
    kh, kw = frame
    c = torch.arange(channels, dtype=torch.float64).reshape(-1, 1, 1)
    h = torch.arange(kh, dtype=torch.float64).reshape(1, -1, 1)
    w = torch.arange(kw, dtype=torch.float64).reshape(1, 1, -1)
    half = channels / 2
    rows = torch.cos(math.pi * (h + 0.5) * (c + 1) / kh).expand(-1, kh, kw)
    cols = torch.cos(math.pi * (w + 0.5) * (c + 1 - half) / kw).expand(-1, kh, kw)
    prior = torch.where(c < half, rows, cols)
    return prior.unsqueeze(1).to(dtype=dtype or torch.get_default_dtype(), device=device)


def separable_kernel(dw: Tensor, pw: Tensor, groups: int, expansion: int) -> Tensor:
    """A depthwise ``kh x kw`` conv ``(E C_in, 1, kh, kw)`` (input ``i`` -> channels ``i E .. i E + E - 1``), then a
    ``1x1`` conv ``(C_out, E C_in / g, 1, 1)`` with ``g`` groups, as one conv ``(C_out, C_in / g, kh, kw)``:
    ``k[o, i] = sum_e pw[o, i E + e] * dw[(G C_in/g + i) E + e]`` for ``o`` in group ``G``."""
    cout, inner_g = pw.shape[:2]
    in_g = inner_g // expansion
    kh, kw = dw.shape[-2:]
    d = dw.reshape(groups, in_g, expansion, kh, kw)
    p = pw.reshape(groups, cout // groups, in_g, expansion)
    return torch.einsum("gieyx,goie->goiyx", d, p).reshape(cout, in_g, kh, kw)


def orepa_kernel(weight: Tensor, scale: Tensor, avg_1x1: Tensor, prior_1x1: Tensor, prior: Tensor,
                 inner_1x1: Tensor, conv_kxk: Tensor, conv_1x1: Tensor, dw: Tensor, pw: Tensor,
                 groups: int) -> Tensor:
    """The summed kernel ``sum_b scale[b, o] * K_b[o]`` over :data:`BRANCHES` (``scale``: ``(6, C_out)``).

    ``inner_1x1`` is the identity-based ``1x1``'s whole kernel (identity + delta). Every kernel has the grouped
    layout ``(C_out, C_in / groups, kh, kw)`` of ``weight``."""
    frame = tuple(weight.shape[-2:])
    cout = weight.shape[0]
    zero = weight.new_zeros(())
    avg = T.avg_pool_kernel(cout, frame, cout, weight.dtype, weight.device)  # (C_out, 1, kh, kw) of 1 / (kh kw)
    # Each scale multiplies the branch's smallest factor that carries its output channel (the same product: the scale
    # is linear per output channel): autograd then keeps those small factors for the backward, not six full kernels.
    s = scale.reshape(len(scale), -1, 1, 1, 1)
    out = weight * s[0]  # origin at scale 1.0: W bit for bit
    out = out + T.merge_1x1_depthwise(avg_1x1 * s[1], zero, avg, zero)[0]
    out = out + T.merge_1x1_depthwise(prior_1x1 * s[2], zero, prior, zero)[0]
    out = out + T.merge_1x1_kxk(inner_1x1, weight.new_zeros(inner_1x1.shape[0]), conv_kxk * s[3], zero, groups)[0]
    out = out + T.pad_to_frame(conv_1x1 * s[4], frame, T.center_offset(frame, (1, 1)))
    expansion = dw.shape[0] // (weight.shape[1] * groups)  # E C_in / C_in
    return out + separable_kernel(dw, pw * s[5], groups, expansion)


class OrepaKernel(_CachedInEval):
    """The parametrization ``W -> orepa_kernel(W, branches)`` of one conv's weight: the conv keeps its class,
    padding logic and bias, and one conv runs on the activations. ``original`` (``W``) is the ``origin`` branch.

    ``branch_scale``: each new branch's scale starts at ``branch_scale`` times the authors' (:data:`AUTHORS_SCALE`);
    ``origin``'s at 1. The branch weights take the authors' init (Kaiming uniform, ``a = 0``; the identity-based
    ``1x1``'s delta at 0): with every new scale 0 they receive no gradient until their scale moves off 0."""

    reparam_method = "orepa"

    def __init__(self, conv: nn.Conv2d, branch_scale: float = 0.0) -> None:
        super().__init__()
        cout, in_g, kh, kw = conv.weight.shape
        groups = conv.groups
        cin = in_g * groups
        self.groups, self.frame = groups, (kh, kw)
        inner = cin if groups <= 4 else 2 * cin
        factory = dict(dtype=conv.weight.dtype, device=conv.weight.device)
        rows = [1.0] + [branch_scale * s for s in AUTHORS_SCALE[1:]]
        self.scale = nn.Parameter(torch.tensor(rows, **factory).reshape(-1, 1).repeat(1, cout))
        self.avg_1x1 = nn.Parameter(torch.empty(cout, in_g, 1, 1, **factory))
        self.prior_1x1 = nn.Parameter(torch.empty(cout, in_g, 1, 1, **factory))
        self.delta_1x1 = nn.Parameter(torch.zeros(inner, in_g, 1, 1, **factory))
        self.conv_kxk = nn.Parameter(torch.empty(cout, inner // groups, kh, kw, **factory))
        self.conv_1x1 = nn.Parameter(torch.empty(cout, in_g, 1, 1, **factory))
        self.dw = nn.Parameter(torch.empty(cin * SEPARABLE_EXPANSION, 1, kh, kw, **factory))
        self.pw = nn.Parameter(torch.empty(cout, cin * SEPARABLE_EXPANSION // groups, 1, 1, **factory))
        for p in (self.avg_1x1, self.prior_1x1, self.conv_kxk, self.conv_1x1, self.dw, self.pw):
            nn.init.kaiming_uniform_(p, a=0.0)
        # Constants, rebuilt by __init__ (not in state dicts); they follow .to() / .double() as buffers.
        self.register_buffer("prior", frequency_prior(cout, (kh, kw), **factory), persistent=False)
        self.register_buffer("identity", T.identity_kernel(inner, inner // in_g, **factory), persistent=False)

    def inner_1x1(self) -> Tensor:
        """The identity-based ``1x1``'s kernel ``(inner, C_in / groups, 1, 1)``: identity + delta."""
        return self.identity + self.delta_1x1

    def forward(self, weight: Tensor) -> Tensor:
        return self._cached(weight, *self.parameters(), self.prior, self.identity)

    def _compute(self, weight: Tensor, *_: Tensor) -> Tensor:
        with torch.autocast(weight.device.type, enabled=False):  # the kernel in the parameters' precision
            return orepa_kernel(weight, self.scale, self.avg_1x1, self.prior_1x1, self.prior, self.inner_1x1(),
                                self.conv_kxk, self.conv_1x1, self.dw, self.pw, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, frame={self.frame}, inner={self.identity.shape[0]}"
