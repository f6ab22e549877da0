"""Step normalisation (docs/design.md section 1): optimizer parameter groups that give each ``W_r`` the learning
rate of a plain kernel.

``W_t = W_b + A(W_r)`` is linear in ``W_r``, so an SGD step of ``lr`` on ``W_r`` moves the kernel by
``lr * A A^T g``, ``lambda`` (:func:`~.kernel_math.step_gain`) times a plain step in expectation:
hundreds of times for wide depthwise layers (every kernel channel mixes all the others), about 1/100 for dense ones
(each 2-D kernel mixes only with itself). ``step_norm="layer"`` puts each layer's ``W_r`` in its own group with
``lr_scale = 1 / lambda``, the key timm's schedulers multiply every group's scheduled lr by.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import RefconvError
from .inject import refocused_convs
from .kernel_math import step_gain

STEP_NORMS = ("none", "layer")


def refocus_param_groups(model: nn.Module, step_norm: str = "none",
                         refocus_weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups holding every trainable parameter of ``model`` exactly once, the plain ones first.

    ``step_norm="none"`` (the paper) keeps ``W_r`` with the others; ``"layer"`` gives each layer's ``W_r`` a group
    with ``lr_scale = 1 / lambda``, ``lambda`` computed now from the layer's ``W_b``: call this on the pretrained
    model (with ``refconv.base=trainable`` ``W_b`` moves later on; the scale stays the one of the start).
    ``refocus_weight_decay``: a weight decay for the ``W_r`` groups only (it pulls ``W_t`` towards ``W_b``); ``None``
    keeps the optimizer's. Without either option this is a single group, the layout of plain training.

    The groups' ``lr`` is the optimizer's: timm's schedulers apply ``lr_scale`` at every update (call
    ``scheduler.step_update(0)`` before the first step when there is no warmup); with another scheduler or none,
    set each group's ``lr`` to ``lr * group.get("lr_scale", 1)`` yourself.
    """
    if step_norm not in STEP_NORMS:
        raise RefconvError(f"step_norm {step_norm!r} is unknown: use one of {', '.join(STEP_NORMS)}")
    if refocus_weight_decay is not None and refocus_weight_decay < 0:
        raise RefconvError(f"refocus weight decay must be >= 0, got {refocus_weight_decay}")
    convs = refocused_convs(model)
    refocus_ids = {id(conv.parametrizations.weight[0].refocus_weight) for conv in convs.values()}
    if step_norm == "none" and refocus_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    extra = {} if refocus_weight_decay is None else {"weight_decay": refocus_weight_decay}
    groups: list[dict[str, Any]] = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in refocus_ids]}]
    if step_norm == "none":
        groups.append({"params": [c.parametrizations.weight[0].refocus_weight for c in convs.values()], **extra})
        return groups
    for conv in convs.values():
        refocus = conv.parametrizations.weight[0]
        gain = step_gain(conv.parametrizations.weight.original, refocus.map_k, refocus.conv_groups)
        # A zero kernel gives A = 0: W_r cannot move W_t at any lr, so its scale does not matter.
        groups.append({"params": [refocus.refocus_weight], "lr_scale": 1.0 / gain if gain > 0 else 1.0, **extra})
    return groups

