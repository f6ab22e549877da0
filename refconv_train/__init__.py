"""refconv-train: RefConv (re-parameterized refocusing convolution) for pretrained ConvNets.

Public API::

    model = build_model("mobilenetv2_100", num_classes=1000, pretrained=True)
    report = refocus_model(model, map_k=3, init="xavier")   # W_b frozen, W_r learnable
    ...train...
    fuse_model(model)                                         # back to the original architecture

The paper's comparison methods (ACB, RepVGG, DBB, WN, CWN, OWN) behind one protocol::

    report = apply_reparam(model, "dbb")                      # starts exactly at the pretrained model
    ...train...
    fuse_reparam(model)                                       # any method, RefConv included
"""

from .checkpoint import read_state_dict
from .errors import RefconvError
from .methods.refconv import (
    Refocus,
    RefocusReport,
    fuse_model,
    fuse_state_dict,
    refocus_model,
    refocus_parameters,
    refocus_transform,
    refocused_convs,
)
from .methods.reparam import METHODS, ReparamReport, apply_reparam, fuse_reparam
from .models import build_model
from .verify import max_output_diff, randomize_bn_stats

__all__ = [
    "RefconvError", "build_model", "read_state_dict", "Refocus", "RefocusReport", "fuse_model", "fuse_state_dict",
    "refocus_model", "refocus_parameters", "refocus_transform", "refocused_convs", "max_output_diff",
    "randomize_bn_stats", "METHODS", "ReparamReport", "apply_reparam", "fuse_reparam",
]
__version__ = "0.1.0"
