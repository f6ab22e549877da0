"""ShuffleNet (V1), 1.0x, g = 3 groups: Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional
Neural Network for Mobile Devices", CVPR 2018 (arXiv 1707.01083). Registered with timm as ``shufflenetv1_g3_100``.

ShuffleNet unit (paper Fig. 2b, 2c), bottleneck width = out / 4::

    1x1 group conv (g) + BN + ReLU -> channel shuffle -> dw 3x3 stride s + BN -> 1x1 group conv (g) + BN
    stride 1: ReLU(x + branch)
    stride 2: ReLU(cat(avgpool 3x3 s2 (x), branch)), the branch producing out - in channels

The first 1x1 conv of stage 2 is not grouped: its input has only 24 channels (paper Sec. 3.3).

Layout (paper Table 1, g = 3): conv 3x3 s2 (24) + BN + ReLU -> maxpool 3x3 s2 -> stages of 4 / 8 / 4 units with
240 / 480 / 960 channels, the first unit of each with stride 2 -> global pool -> FC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._common import ClassifierNet, build_untrained, conv_bn, pretrained_cfg

STAGE_CHANNELS = {3: (240, 480, 960)}  # paper Table 1, per number of groups (1.0x)
STAGE_UNITS = (4, 8, 4)
STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, g * n, h, w) -> channels reordered so that every group of the next group conv sees all input groups."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int, group_first: bool = True):
        super().__init__()
        self.stride = stride
        branch_chs = out_chs - in_chs if stride == 2 else out_chs
        mid = out_chs // 4
        self.shuffle_groups = groups if group_first else 1  # no shuffle after an ungrouped conv
        self.reduce = conv_bn(in_chs, mid, 1, groups=self.shuffle_groups, act=nn.ReLU)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, branch_chs, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.reduce(x)
        if self.shuffle_groups > 1:
            out = channel_shuffle(out, self.shuffle_groups)
        out = self.expand(self.dw(out))
        if self.stride == 2:
            return F.relu(torch.cat((F.avg_pool2d(x, 3, 2, 1), out), 1))
        return F.relu(x + out)


class ShuffleNetV1(ClassifierNet):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, groups: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"ShuffleNetV1 with {groups} groups is not defined here; use {list(STAGE_CHANNELS)}")
        self.stem = nn.Sequential(*conv_bn(in_chans, STEM_CHANNELS, 3, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1))
        chs, units = STEM_CHANNELS, []
        for stage, (out_chs, n) in enumerate(zip(STAGE_CHANNELS[groups], STAGE_UNITS)):
            for i in range(n):
                units.append(ShuffleUnit(chs, out_chs, 2 if i == 0 else 1, groups, group_first=stage > 0 or i > 0))
                chs = out_chs
        self.blocks = nn.Sequential(*units)
        self.num_features = chs
        self.init_head(num_classes, drop_rate)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


default_cfgs = generate_default_cfgs({"shufflenetv1_g3_100": pretrained_cfg()})


@register_model
def shufflenetv1_g3_100(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    """ShuffleNetV1 1.0x, g=3: 1.87M params, 137M MAdds (paper: 140M). No published weights: see ``build_untrained``."""
    return build_untrained(ShuffleNetV1, "shufflenetv1_g3_100", pretrained, **dict(kwargs, groups=3))
