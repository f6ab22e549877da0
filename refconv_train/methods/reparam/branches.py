"""The training-time branches of ACB, RepVGG and DBB, as in the authors' blocks.

Each branch reads the conv's input padded for its kernel's place inside the conv's ``kh x kw`` frame
(``transforms.branch_padding``), so it is aligned with the conv's output by construction, and folds itself into a
``(kernel, bias)`` pair in that frame (``kernel_bias``). A symmetric padding is the branch conv's own (no padded copy
of the input, as ACBlock's ``hor_conv``/``ver_conv``); only asymmetric or negative ones (timm's dynamic "same", a
crop) go through ``F.pad``. DBB's two-stage branches pad AFTER their inner BN with that BN's eval-mode value for a
zero pixel (``BNAndPadLayer``), so train-mode batch statistics never count the border. placement.py adds the sum
where the authors do (after the conv's own BN); structural.py builds, attaches and fuses them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same_arg
from torch import nn

from . import kernel_algebra as T


def main_padding(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int, int, int]:
    """The conv's effective zero padding ``(left, right, top, bottom)`` for an input of this size."""
    if isinstance(conv, Conv2dSameExport) and conv.pad is not None:
        return tuple(conv.pad.padding)
    if isinstance(conv, (Conv2dSame, Conv2dSameExport)):  # timm's dynamic TF "same"
        return tuple(pad_same_arg([height, width], conv.kernel_size, conv.stride, conv.dilation))
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":  # PyTorch: total d * (k - 1), the odd pixel at the end
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = conv.padding
    return pw, pw, ph, ph


def _conv(x: torch.Tensor, weight: torch.Tensor, pad: tuple[int, int, int, int], stride, dilation,
          groups: int) -> torch.Tensor:
    """``conv2d`` of ``x`` zero-padded by ``pad`` (``left, right, top, bottom``): the conv's own padding where the
    amounts are symmetric and not negative, else ``F.pad`` first (negative amounts crop)."""
    left, right, top, bottom = pad
    if left == right and top == bottom and min(pad) >= 0:
        return F.conv2d(x, weight, None, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, pad), weight, None, stride, 0, dilation, groups)


def _zero_value(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """The BN's eval-mode output for a zero pixel, from running statistics and detached affine parameters (the
    authors' ``BNAndPadLayer``: the border carries no gradient and does not depend on the batch)."""
    weight = None if bn.weight is None else bn.weight.detach()
    bias = None if bn.bias is None else bn.bias.detach()
    return T.bn_zero_value(bn.running_mean, bn.running_var, weight, bias, bn.eps)


def _fold(kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``T.fold_bn`` of a branch BN, in fp32 at least (fp64 for an fp64 model)."""
    dt = torch.promote_types(bn.running_mean.dtype, torch.float32)
    return T.fold_bn(kernel.to(dt), bn.running_mean.to(dt), bn.running_var.to(dt), bn.weight.to(dt), bn.bias.to(dt),
                     bn.eps)


class Branch(nn.Module):
    """One branch: a ``size`` kernel at ``offset`` in the frame, ``forward(x, pad)`` runs it with the conv's stride and
    dilation on the conv's input padded by ``pad`` (``transforms.branch_padding``); in eval mode it is one conv,
    :meth:`kernel_bias` (fp32 at least, grouped like the main conv, ``size`` only: ``RepBranches.kernel_bias`` places it
    in the frame)."""

    def __init__(self, size: tuple[int, int], offset: tuple[int, int]) -> None:
        super().__init__()
        self.size, self.offset = tuple(size), tuple(offset)

    def last_bn(self) -> nn.Module:
        return list(m for m in self.children() if isinstance(m, nn.modules.batchnorm._BatchNorm))[-1]


class ConvBN(Branch):
    """A ``size`` conv (the main conv's groups, stride, dilation) + BN: ACB's ``kx1``/``1xk``, the ``1x1`` branches."""

    def __init__(self, main: nn.Conv2d, size: tuple[int, int], offset: tuple[int, int]) -> None:
        super().__init__(size, offset)
        self.conv = nn.Conv2d(main.in_channels, main.out_channels, size, main.stride, 0, main.dilation, main.groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        conv = self.conv
        if conv.kernel_size == (1, 1) and conv.stride != (1, 1):
            # A strided 1x1 conv reads every s-th pixel: subsample, then stride 1 (the same values, less work). On CPU,
            # oneDNN's strided 1x1 weight gradient with channels_last input and fewer channels than its block
            # (RepVGG's / DBB's 1x1 branch on a 3-channel stem) crashes or is wrong (oneDNN issue #6035).
            x = (F.pad(x, pad) if any(pad) else x)[:, :, :: conv.stride[0], :: conv.stride[1]]
            return self.bn(F.conv2d(x, conv.weight, None, 1, 0, 1, conv.groups))
        return self.bn(_conv(x, conv.weight, pad, conv.stride, conv.dilation, conv.groups))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _fold(self.conv.weight, self.bn)


class IdentityBN(Branch):
    """RepVGG's identity branch: a BN on the input (stride 1, ``C_in == C_out``), per group an identity kernel."""

    def __init__(self, main: nn.Conv2d, offset: tuple[int, int]) -> None:
        super().__init__((1, 1), offset)
        self.groups = main.groups
        self.bn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        return self.bn(F.pad(x, pad) if any(pad) else x)

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = T.identity_kernel(self.bn.num_features, self.groups, device=self.bn.running_mean.device)
        return _fold(eye, self.bn)


class AvgBranch(Branch):
    """DBB's average branch: (``1x1`` conv + BN, padded with that BN's zero-pixel value, unless depthwise) ->
    ``kh x kw`` average pool -> BN. Depthwise, the pool reads the zero-padded input (DBB's ``AvgPool2d(padding=p)``,
    which counts the padding). The pool runs as a fixed depthwise conv of ``1 / (kh * kw)`` with the main stride and
    dilation: ``AvgPool2d`` where the dilation is 1, a dilated window average where it is not; one conv for the fuse
    either way."""

    def __init__(self, main: nn.Conv2d, with_conv: bool) -> None:
        super().__init__(main.kernel_size, (0, 0))
        self.groups, self.stride, self.dilation = main.groups, main.stride, main.dilation
        if with_conv:
            self.conv = nn.Conv2d(main.in_channels, main.out_channels, 1, groups=main.groups, bias=False)
            self.bn = nn.BatchNorm2d(main.out_channels)
        self.avgbn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        if hasattr(self, "conv"):
            x, pad = T.pad_with(self.bn(self.conv(x)), pad, _zero_value(self.bn)), (0, 0, 0, 0)
        c = x.shape[1]
        pool = T.avg_pool_kernel(c, self.size, c, dtype=x.dtype, device=x.device)
        return self.avgbn(_conv(x, pool, pad, self.stride, self.dilation, c))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.avgbn.running_mean
        if not hasattr(self, "conv"):  # depthwise: the pool alone, on the conv's own channels
            pool = T.avg_pool_kernel(self.avgbn.num_features, self.size, self.groups, stats.dtype, stats.device)
            return _fold(pool, self.avgbn)
        pool = T.avg_pool_kernel(self.avgbn.num_features, self.size, self.avgbn.num_features, stats.dtype, stats.device)
        return T.merge_1x1_depthwise(*_fold(self.conv.weight, self.bn), *_fold(pool, self.avgbn))


class IdentityConv1x1(nn.Module):
    """DBB's identity-based ``1x1`` conv: kernel = identity + ``weight``, ``weight`` starting at 0 (so weight decay
    pulls it towards the identity). Not an ``nn.Conv2d``: its kernel is not its weight, no other method may take it."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1))

    def kernel(self) -> torch.Tensor:
        return self.weight + T.identity_kernel(self.weight.shape[0], self.groups, self.weight.dtype, self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), None, 1, 0, 1, self.groups)


class OneByOneKxK(Branch):
    """DBB's ``1x1 -> kxk`` branch: identity-based ``1x1`` (depthwise: a plain ``1x1`` to 2x channels) + BN ->
    ``kh x kw`` conv (main stride, dilation, groups) + BN. The first BN's output is padded with its eval-mode value
    for a zero pixel (DBB's ``BNAndPadLayer``), so its batch statistics see only the image, and in eval mode the
    branch equals the ``1x1`` stage run on a zero-padded input: what ``merge_1x1_kxk`` folds."""

    def __init__(self, main: nn.Conv2d, depthwise: bool) -> None:
        super().__init__(main.kernel_size, (0, 0))
        self.groups, cin = main.groups, main.in_channels
        inner = 2 * cin if depthwise else cin
        if depthwise:
            self.conv1 = nn.Conv2d(cin, inner, 1, groups=main.groups, bias=False)
        else:
            self.idconv1 = IdentityConv1x1(cin, main.groups)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, main.out_channels, main.kernel_size, main.stride, 0, main.dilation, main.groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(main.out_channels)

    def _first(self) -> nn.Module:
        return self.conv1 if hasattr(self, "conv1") else self.idconv1

    def forward(self, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        return self.bn2(self.conv2(T.pad_with(self.bn1(self._first()(x)), pad, _zero_value(self.bn1))))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.conv1.weight if hasattr(self, "conv1") else self.idconv1.kernel()
        return T.merge_1x1_kxk(*_fold(first, self.bn1), *_fold(self.conv2.weight, self.bn2), self.groups)


class RepBranches(nn.Module):
    """The branches of one conv (``conv.rep_branches``); ``forward(conv, x)`` is their summed output. ``bias_to``
    describes where the fuse puts their bias; ``site`` (set by ``placement.attach``) is where the sum joins."""

    def __init__(self, method: str, frame: tuple[int, int], bias_to: str) -> None:
        super().__init__()
        self.method, self.frame, self.bias_to = method, tuple(frame), bias_to
        self.site = None  # (parent module, child name) of the conv's own BatchNorm, or None: see placement.py

    def forward(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        main = main_padding(conv, x.shape[-2], x.shape[-1])
        out = None
        for branch in self.children():
            y = branch(x, T.branch_padding(main, self.frame, branch.size, branch.offset, conv.dilation))
            out = y if out is None else out + y
        return out

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of all branches as one ``kh x kw`` kernel + bias (fp32)."""
        pairs = [(T.pad_to_frame(k, self.frame, b.offset), bias) for b in self.children() for k, bias in
                 [b.kernel_bias()]]
        return T.add_branches([k for k, _ in pairs], [bias for _, bias in pairs])

