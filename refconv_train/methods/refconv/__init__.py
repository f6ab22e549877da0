"""RefConv: refocus a frozen pretrained kernel with a learnable convolution run over the kernel itself.

- :mod:`.kernel_math`: the math as pure functions (the transform, its GEMM form, the step gain);
- :mod:`.parametrization`: :class:`Refocus`, the ``torch.nn.utils.parametrize`` module holding ``W_r``;
- :mod:`.inject`: inject into a model, find, fuse a model or a state dict back;
- :mod:`.step_norm`: optimizer parameter groups for step normalisation;
- :mod:`.per_step`: its per-step hook, ``W_t`` once per optimizer step (the kernel-sized all-reduce under DDP).

Its registry entry is in :mod:`refconv_train.methods.builtin`.
"""

from .inject import (
    BASE_INITS,
    BASE_KEY,
    BASES,
    REFOCUS_KEY,
    RefocusedLayer,
    RefocusReport,
    fuse_state_dict,
    is_refocus_state_dict,
    refocus_model,
    refocus_parameters,
    refocused_convs,
    refocused_kernels,
)
from .inject import (
    fuse_model as fuse_refocus,
)
from .kernel_math import (
    conv_kind,
    kernel_kind,
    kernel_patches,
    refocus_delta,
    refocus_delta_gemm,
    refocus_shape,
    refocus_transform,
    step_gain,
)
from .parametrization import INITS, Refocus, init_refocus_weight
from .step_norm import STEP_NORMS, refocus_param_groups

__all__ = [
    "INITS", "Refocus", "init_refocus_weight", "STEP_NORMS", "refocus_param_groups", "BASE_INITS", "BASE_KEY",
    "BASES", "REFOCUS_KEY", "RefocusedLayer", "RefocusReport", "fuse_refocus", "fuse_state_dict",
    "is_refocus_state_dict", "refocus_model", "refocus_parameters", "refocused_convs", "refocused_kernels",
    "conv_kind", "kernel_kind", "kernel_patches", "refocus_delta", "refocus_delta_gemm", "refocus_shape",
    "refocus_transform", "step_gain",
]
