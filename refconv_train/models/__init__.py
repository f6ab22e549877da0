"""Backbones: build any timm/torchvision model by name; architectures of the paper that neither library has are
registered with timm here (importing this package registers them)."""

from . import hbonet, mobilenext, shufflenetv1  # noqa: F401  (registers the paper's models with timm)
from .build import (
    CHECKPOINT_FORMAT,
    TORCHVISION_PREFIX,
    build_model,
    classifier_prefixes,
    load_pretrained_file,
    load_state_dict_checked,
    read_state_dict,
    safe_torch_load,
)

__all__ = [
    "CHECKPOINT_FORMAT", "TORCHVISION_PREFIX", "build_model", "classifier_prefixes", "load_pretrained_file",
    "load_state_dict_checked", "read_state_dict", "safe_torch_load",
]
