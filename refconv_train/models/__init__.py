"""Backbones: build any timm/torchvision model by name (architectures.py), with local weights or as a run's
re-parameterized model (build.py); architectures of the paper that neither library has are registered with timm here
(importing this package registers them)."""

from . import hbonet, mobilenext, shufflenetv1  # noqa: F401  (registers the paper's models with timm)
from .architectures import TORCHVISION_PREFIX, classifier_prefixes, create_architecture, load_state_dict_checked
from .build import build_model, build_training_model, load_pretrained_file, read_state_dict, rebuild_training_model

__all__ = ["TORCHVISION_PREFIX", "build_model", "build_training_model", "classifier_prefixes", "create_architecture",
           "load_pretrained_file", "load_state_dict_checked", "read_state_dict", "rebuild_training_model"]
