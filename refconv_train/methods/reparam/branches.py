"""The training-time branches of ACB, RepVGG and DBB and the forward hook that adds them to their conv's output.

Each branch reads the conv's input zero-padded for its kernel's place inside the conv's ``kh x kw`` frame
(``transforms.branch_padding``), so it is aligned with the conv's output by construction, and folds itself into a
``(kernel, bias)`` pair in that frame (``kernel_bias``). structural.py builds them, attaches them, fuses them.
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


def _fold(kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``T.fold_bn`` of a branch BN, in fp32 at least (fp64 for an fp64 model)."""
    dt = torch.promote_types(bn.running_mean.dtype, torch.float32)
    return T.fold_bn(kernel.to(dt), bn.running_mean.to(dt), bn.running_var.to(dt), bn.weight.to(dt), bn.bias.to(dt),
                     bn.eps)


class Branch(nn.Module):
    """One branch: a ``size`` kernel at ``offset`` in the frame, run with the conv's stride and dilation on an input
    already padded for it; in eval mode it is one conv, :meth:`kernel_bias` (fp32 at least, grouped like the main
    conv, ``size`` only: ``RepBranches.kernel_bias`` places it in the frame)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if conv.kernel_size == (1, 1) and conv.stride != (1, 1):
            # A strided 1x1 conv reads every s-th pixel: subsample, then stride 1 (the same values, less work). On CPU,
            # oneDNN's strided 1x1 weight gradient with channels_last input and fewer channels than its block
            # (RepVGG's / DBB's 1x1 branch on a 3-channel stem) crashes or is wrong (oneDNN issue #6035).
            x = x[:, :, :: conv.stride[0], :: conv.stride[1]]
            return self.bn(F.conv2d(x, conv.weight, None, 1, 0, 1, conv.groups))
        return self.bn(conv(x))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _fold(self.conv.weight, self.bn)


class IdentityBN(Branch):
    """RepVGG's identity branch: a BN on the input (stride 1, ``C_in == C_out``), per group an identity kernel."""

    def __init__(self, main: nn.Conv2d, offset: tuple[int, int]) -> None:
        super().__init__((1, 1), offset)
        self.groups = main.groups
        self.bn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = T.identity_kernel(self.bn.num_features, self.groups, device=self.bn.running_mean.device)
        return _fold(eye, self.bn)


class AvgBranch(Branch):
    """DBB's average branch: (``1x1`` conv + BN unless depthwise) -> ``kh x kw`` average pool -> BN. The pool runs
    as a fixed depthwise conv of ``1 / (kh * kw)`` with the main stride and dilation: ``AvgPool2d`` without padding
    where the dilation is 1, a dilated window average where it is not; one conv for the fuse either way."""

    def __init__(self, main: nn.Conv2d, with_conv: bool) -> None:
        super().__init__(main.kernel_size, (0, 0))
        self.groups, self.stride, self.dilation = main.groups, main.stride, main.dilation
        if with_conv:
            self.conv = nn.Conv2d(main.in_channels, main.out_channels, 1, groups=main.groups, bias=False)
            self.bn = nn.BatchNorm2d(main.out_channels)
        self.avgbn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            x = self.bn(self.conv(x))
        c = x.shape[1]
        pool = T.avg_pool_kernel(c, self.size, c, dtype=x.dtype, device=x.device)
        return self.avgbn(F.conv2d(x, pool, None, self.stride, 0, self.dilation, c))

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
    ``kh x kw`` conv (main stride, dilation, groups) + BN. The input is zero-padded before the ``1x1``, so the
    ``kxk`` conv sees the first BN's value for a zero pixel in its padding, exactly as DBB's ``BNAndPadLayer`` in
    eval mode and for the fuse. (In train mode this BN's batch statistics also count the padded pixels, which
    ``BNAndPadLayer`` leaves out: a small difference in training only; the same holds for :class:`AvgBranch`.)"""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self._first()(x))))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.conv1.weight if hasattr(self, "conv1") else self.idconv1.kernel()
        return T.merge_1x1_kxk(*_fold(first, self.bn1), *_fold(self.conv2.weight, self.bn2), self.groups)


class RepBranches(nn.Module):
    """The branches of one conv (``conv.rep_branches``); ``forward(conv, x)`` is their summed output."""

    def __init__(self, method: str, frame: tuple[int, int], bias_to: str) -> None:
        super().__init__()
        self.method, self.frame, self.bias_to = method, tuple(frame), bias_to

    def forward(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        main = main_padding(conv, x.shape[-2], x.shape[-1])
        padded: dict[tuple[int, ...], torch.Tensor] = {}
        out = None
        for branch in self.children():
            pad = T.branch_padding(main, self.frame, branch.size, branch.offset, conv.dilation)
            if pad not in padded:
                padded[pad] = F.pad(x, pad) if any(pad) else x
            y = branch(padded[pad])
            out = y if out is None else out + y
        return out

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of all branches as one ``kh x kw`` kernel + bias (fp32)."""
        pairs = [(T.pad_to_frame(k, self.frame, b.offset), bias) for b in self.children() for k, bias in
                 [b.kernel_bias()]]
        return T.add_branches([k for k, _ in pairs], [bias for _, bias in pairs])


def _add_branches(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook (module level, so deep copies and pickles keep it): the conv's output plus its branches'."""
    return output + conv.rep_branches(conv, args[0]).to(output.dtype)
