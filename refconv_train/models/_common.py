"""Shared plumbing of the architectures registered here (the paper's models that neither timm nor torchvision has):
conv + BN (+ act) blocks, a timm-style classifier head, pretrained cfgs, and a builder that refuses
``pretrained=True`` unless weights are given (no published weights exist for these re-implementations)."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

from ..errors import RefconvError


def pretrained_cfg(first_conv: str = "stem.0", classifier: str = "classifier", **kwargs: Any) -> dict[str, Any]:
    """timm pretrained cfg for ImageNet-1k at 224 px, without a weight source (``file`` may be overlaid)."""
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv=first_conv, classifier=classifier, **kwargs)


def build_untrained(cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg``; ``pretrained=True`` without a weights source is an error, not a random init."""
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.file or cfg.url or cfg.hf_hub_id or cfg.state_dict is not None):
            raise RefconvError(f"no pretrained weights exist for {variant} (it is not in timm or torchvision): train "
                               f"the baseline config first and pass its best.pth as model.pretrained, or give "
                               f"pretrained_cfg_overlay=dict(file=...)")
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


def conv_bn(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = None) -> nn.Sequential:
    """Plain ``nn.Conv2d`` (no bias, "same" padding for odd kernels) + BatchNorm (+ activation)."""
    layers: list[nn.Module] = [nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out_chs)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def make_divisible(v: float, divisor: int) -> int:
    """Round to the nearest multiple of ``divisor``, never more than 10% down (the MobileNet convention)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ClassifierNet(nn.Module):
    """timm's model interface over ``forward_features``: global average pool, dropout, ``self.classifier`` (Linear).

    Subclasses set ``self.num_features`` and call :meth:`init_head` and :meth:`init_weights` at the end of
    ``__init__``.
    """

    num_features: int

    def init_head(self, num_classes: int, drop_rate: float) -> None:
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.head_hidden_size = self.num_features
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        if global_pool != "avg":
            raise ValueError(f"{type(self).__name__} supports global_pool='avg' only")
        self.init_head(num_classes, self.drop_rate)
        if isinstance(self.classifier, nn.Linear):
            nn.init.normal_(self.classifier.weight, 0, 0.01)
            nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
