"""Backbones: build any timm/torchvision model by name; architectures of the paper that neither library has are
registered with timm here (importing this package registers them)."""

from . import hbonet, mobilenext, shufflenetv1  # noqa: F401  (registers the paper's models with timm)
from .build import TORCHVISION_PREFIX, build_model, classifier_prefixes, load_pretrained_file, load_state_dict_checked

__all__ = ["TORCHVISION_PREFIX", "build_model", "classifier_prefixes", "load_pretrained_file",
           "load_state_dict_checked"]
