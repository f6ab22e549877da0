"""MobileNeXt, width 1.0: Zhou, Hou, Chen, Feng, Yan, "Rethinking Bottleneck Structure for Efficient Mobile Network
Design", ECCV 2020 (arXiv 2007.02269). Registered with timm as ``mobilenext_100``.

Sandglass block (paper Table 1): the shortcut and the depthwise (spatial) convs sit at the *wide* ends, the
bottleneck in the middle::

    dw 3x3 + BN + ReLU6 -> 1x1 reduce (in / t) + BN -> 1x1 expand (out) + BN + ReLU6 -> dw 3x3 stride s + BN
    (+ input, when stride 1 and in == out)

The bottleneck has at least out / 6 channels (rounded to a multiple of 16). As in the authors' released model, the
first block of a multi-block stage that changes the width has no leading depthwise conv (it would run at the old
width), and none at all when it keeps the resolution: such a block is two 1x1 convs.

Layout (paper Table 2): conv 3x3 s2 (32) -> sandglass stages (t, c, n, s) below -> global pool -> FC. There is no
final 1x1 conv: the last stage already has 1280 channels.
"""

from __future__ import annotations

import math

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._common import ClassifierNet, build_untrained, conv_bn, make_divisible, pretrained_cfg

# (reduction t, out channels c, blocks n, first stride s), paper Table 2
STAGES = [(2, 96, 1, 2), (6, 144, 1, 1), (6, 192, 3, 2), (6, 288, 3, 2), (6, 384, 4, 1), (6, 576, 4, 2),
          (6, 960, 3, 1), (6, 1280, 1, 1)]


class SandglassBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, reduction: int, dw_in: bool = True,
                 dw_out: bool = True):
        super().__init__()
        mid = in_chs // reduction
        if mid < out_chs / 6:
            mid = make_divisible(math.ceil(out_chs / 6), 16)
        layers = [conv_bn(in_chs, in_chs, 3, groups=in_chs, act=nn.ReLU6)] if dw_in else []
        layers += [conv_bn(in_chs, mid, 1), conv_bn(mid, out_chs, 1, act=nn.ReLU6)]
        if dw_out:
            layers.append(conv_bn(out_chs, out_chs, 3, stride, groups=out_chs))
        elif stride != 1:
            raise ValueError("a strided sandglass block needs its output depthwise conv")
        self.conv = nn.Sequential(*layers)
        self.has_shortcut = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out + x if self.has_shortcut else out


class MobileNeXt(ClassifierNet):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        chs = 32
        self.stem = conv_bn(in_chans, chs, 3, 2, act=nn.ReLU6)
        blocks = []
        for t, c, n, s in STAGES:
            for i in range(n):
                full = n == 1 or chs == c  # the width-changing first block of a longer stage is trimmed
                blocks.append(SandglassBlock(chs, c, s if i == 0 else 1, t, dw_in=full, dw_out=full or s > 1))
                chs = c
        self.blocks = nn.Sequential(*blocks)
        self.num_features = chs
        self.init_head(num_classes, drop_rate)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


default_cfgs = generate_default_cfgs({"mobilenext_100": pretrained_cfg()})


@register_model
def mobilenext_100(pretrained: bool = False, **kwargs) -> MobileNeXt:
    """MobileNeXt 1.0: 3.54M params, 311M MAdds (paper: 3.4M, 300M). No published weights: see ``build_untrained``."""
    return build_untrained(MobileNeXt, "mobilenext_100", pretrained, **kwargs)
