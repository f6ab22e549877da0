"""refconv-train: RefConv (re-parameterized refocusing convolution) for pretrained ConvNets, and the paper's
comparison methods, every one an entry of one registry (docs/design.md section 6).

Public API::

    model = build_model("mobilenetv2_100", num_classes=1000, pretrained=True)
    report = apply_method(model, "refconv", init="zeros")     # or "acb", "dbb", "own", ..., a registered name
    ...train...
    fuse_model(model)                                         # whatever it holds, back to the original architecture

``refocus_model(model, map_k=3, init="xavier")`` stays RefConv's shorthand; ``register(Method(...))`` adds a method.
"""

from .errors import RefconvError
from .methods import (
    Method,
    ReparamReport,
    apply_method,
    fuse_model,
    held_methods,
    names,
    register,
)
from .methods.refconv import (
    Refocus,
    RefocusReport,
    fuse_state_dict,
    refocus_model,
    refocus_parameters,
    refocus_transform,
    refocused_convs,
)
from .methods.reparam import METHODS, apply_reparam, fuse_reparam
from .models import build_model, read_state_dict
from .verify import max_output_diff, randomize_bn_stats

__all__ = [
    "RefconvError", "build_model", "read_state_dict", "Method", "ReparamReport", "apply_method", "fuse_model",
    "held_methods", "names", "register", "Refocus", "RefocusReport", "fuse_state_dict", "refocus_model",
    "refocus_parameters", "refocus_transform", "refocused_convs", "max_output_diff", "randomize_bn_stats", "METHODS",
    "apply_reparam", "fuse_reparam",
]
__version__ = "0.1.0"
