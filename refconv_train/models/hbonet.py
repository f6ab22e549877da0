"""HBONet 1.0x: Li, Zhou, Yao, "HBONet: Harmonious Bottleneck on Two Orthogonal Dimensions", ICCV 2019
(arXiv 1908.03888). Registered with timm as ``hbonet_100``.

Harmonious bottleneck: a spatial contraction-expansion around a channel expansion-contraction.
The main branch computes only half of the output channels, at half the resolution::

    main = dw 5x5 s2 + BN -> 1x1 expand (in * t) + BN + ReLU6 -> dw 3x3 + BN + ReLU6 -> 1x1 to out/2 + BN
    stride 1: out = cat(x[:, -(out - out/2):], dw 5x5 + BN (x[:, :out/2] + upsample2x(main)))
    stride 2: out = cat(avgpool2(x[:, -(out - out/2):]), main)

The passed-through channels are the harmonious bottleneck's cheap half (no weights); channel slices may overlap when
the block widens (20 -> 36).

Layout (the authors' released 1.0x model): conv 3x3 s2 (32) -> inverted residual (t=1, 20) -> harmonious bottlenecks
(t=2: 36, 72 x3 s2, 96 x4 s2, 192 x4 s2, 288) -> 1x1 conv to 144 + BN (linear) -> inverted residuals (t=6: 200 x2 s2,
400) -> 1x1 conv to 1600 + BN + ReLU6 -> global pool -> FC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._common import ClassifierNet, build_untrained, conv_bn, pretrained_cfg

# (block, expansion t, out channels c, blocks n, first stride s)
STAGES = [("ir", 1, 20, 1, 1), ("hb", 2, 36, 1, 1), ("hb", 2, 72, 3, 2), ("hb", 2, 96, 4, 2), ("hb", 2, 192, 4, 2),
          ("hb", 2, 288, 1, 1), ("pw", 0, 144, 1, 1), ("ir", 6, 200, 2, 2), ("ir", 6, 400, 1, 1)]
HEAD_CHANNELS = 1600


class InvertedResidual(nn.Module):
    """MobileNetV2's block: [1x1 expand + BN + ReLU6] -> dw 3x3 + BN + ReLU6 -> 1x1 project + BN (+ input)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int):
        super().__init__()
        mid = in_chs * expansion
        layers = [conv_bn(in_chs, mid, 1, act=nn.ReLU6)] if expansion != 1 else []
        layers += [conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU6), conv_bn(mid, out_chs, 1)]
        self.conv = nn.Sequential(*layers)
        self.has_shortcut = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out + x if self.has_shortcut else out


class HarmoniousBottleneck(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int):
        super().__init__()
        mid, self.half = in_chs * expansion, out_chs // 2
        self.keep = out_chs - self.half  # passed-through channels
        if max(self.half, self.keep) > in_chs:
            raise ValueError(f"harmonious bottleneck {in_chs} -> {out_chs}: more than twice as wide")
        self.stride = stride
        self.main = nn.Sequential(
            conv_bn(in_chs, in_chs, 5, 2, groups=in_chs),  # spatial contraction
            conv_bn(in_chs, mid, 1, act=nn.ReLU6),  # channel expansion
            conv_bn(mid, mid, 3, groups=mid, act=nn.ReLU6),
            conv_bn(mid, self.half, 1),  # channel contraction
        )
        # spatial expansion: upsample, add the input's first half, refine with a depthwise 5x5
        self.expand = conv_bn(self.half, self.half, 5, groups=self.half) if stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main, keep = self.main(x), x[:, -self.keep:]
        if self.expand is None:  # stride 2: the main branch is already at the output resolution
            return torch.cat((F.avg_pool2d(keep, 2, ceil_mode=True), main), 1)
        main = F.interpolate(main, size=x.shape[-2:], mode="nearest")  # 2x for even sizes
        return torch.cat((keep, self.expand(x[:, :self.half] + main)), 1)


class HBONet(ClassifierNet):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        chs = 32
        self.stem = conv_bn(in_chans, chs, 3, 2, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        for kind, t, c, n, s in STAGES:
            for i in range(n):
                if kind == "pw":
                    blocks.append(conv_bn(chs, c, 1))
                else:
                    block = InvertedResidual if kind == "ir" else HarmoniousBottleneck
                    blocks.append(block(chs, c, s if i == 0 else 1, t))
                chs = c
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = conv_bn(chs, HEAD_CHANNELS, 1, act=nn.ReLU6)
        self.num_features = HEAD_CHANNELS
        self.init_head(num_classes, drop_rate)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_conv(self.blocks(self.stem(x)))


default_cfgs = generate_default_cfgs({"hbonet_100": pretrained_cfg()})


@register_model
def hbonet_100(pretrained: bool = False, **kwargs) -> HBONet:
    """HBONet 1.0x: 4.56M params, 298M MAdds (paper: 4.6M, 305M). No published weights: see ``build_untrained``."""
    return build_untrained(HBONet, "hbonet_100", pretrained, **kwargs)
