"""The built-in registry entries: none, RefConv, the paper's six comparison methods and OREPA, each an options dataclass
(its config section) and the functions of :class:`~.registry.Method`. Importing this module registers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import RefconvError
from . import refconv as rc
from .protocol import eval_outputs, example_input
from .refconv.per_step import PerStepTransform
from .registry import Method, register
from .reparam import PAPERS
from .reparam.orepa import apply_orepa, fuse_orepa, orepa_convs
from .reparam.structural import apply_structural, fuse_structural, structural_convs
from .reparam.weight import apply_weight_reparam, fuse_weight, weight_reparam_convs

_NONNEG = (lambda v: v >= 0, "be >= 0")


# ----------------------------------------------------------------------------------------------- none
def _apply_none(model: nn.Module, options: Any, example: torch.Tensor | None = None, fresh: bool = True) -> None:
    return None


register(Method("none", apply=_apply_none, fuse=lambda model: [], convs=lambda model: {}, title="baseline",
                kind="baseline", paper="plain training with the same recipe", bench="baseline", deploys_fused=False))


# ----------------------------------------------------------------------------------------------- RefConv
@dataclass
class RefconvOptions:
    map_k: int = 3
    init: Literal["xavier", "zeros", "kaiming"] = "xavier"
    exclude: list[str] = field(default_factory=list)  # regexes over module names
    base: Literal["frozen", "trainable"] = "frozen"  # ablation (paper Fig. 5)
    base_init: Literal["pretrained", "random"] = "pretrained"  # ablation (paper Fig. 5)
    # W_t once per optimizer step and dL/dW_t (not dL/dW_r) all-reduced under DDP (methods/refconv/per_step.py);
    # false = plain autograd through the transform on every micro-batch.
    per_step_transform: bool = True
    # none (paper) | layer: each W_r's lr divided by its layer's step gain lambda (docs/design.md section 1)
    step_norm: Literal["none", "layer"] = "none"
    weight_decay: float | None = None  # for W_r only (pulls W_t towards W_b); null = optim.weight_decay
    CHECKS: ClassVar[dict] = {"map_k": (lambda v: v > 0 and v % 2 == 1, "be an odd positive integer"),
                              "weight_decay": (lambda v: v is None or v >= 0, "be >= 0 or null")}


def _apply_refconv(model: nn.Module, o: RefconvOptions, example: torch.Tensor | None = None,
                   fresh: bool = True) -> rc.RefocusReport:
    """:func:`refocus_model`, and (for a fresh start) how far the start moved, measured like the other methods':
    xavier and kaiming move it, zeros does not."""
    x = (example if example is not None else example_input(model)) if fresh else None
    before = eval_outputs(model, x) if x is not None else None
    report = rc.refocus_model(model, map_k=o.map_k, init=o.init, exclude=o.exclude, base=o.base,
                              base_init=o.base_init, check_base=fresh)
    if isinstance(before, torch.Tensor):
        after = eval_outputs(model, x)
        if isinstance(after, torch.Tensor):
            report.start_max_abs_diff = (after - before).abs().max().item()
    return report


def _refconv_per_step(model: nn.Module, o: RefconvOptions, distributed: bool = False) -> PerStepTransform | None:
    if not o.per_step_transform:
        return None
    transform = PerStepTransform(model, distributed=distributed)
    if distributed:  # W_r's gradients come from the transform, already averaged over ranks
        PerStepTransform.exclude_from_ddp(model)
        transform.broadcast()
    return transform


def _refconv_check(o: RefconvOptions, pretrained: Any) -> None:
    """RefConv refocuses trained kernels: from a random init only as the paper's Fig. 5 ablation."""
    if pretrained is False and o.base_init == "pretrained":
        raise RefconvError("method refconv with model.pretrained=false would refocus randomly initialised kernels: "
                           "load the baseline's weights with model.pretrained=<checkpoint or true>, or ask for the "
                           "paper's ablation with refconv.base_init=random")


register(Method("refconv", apply=_apply_refconv, fuse=rc.fuse_refocus, convs=rc.refocused_convs,
                options=RefconvOptions, param_groups=lambda m, o: rc.refocus_param_groups(m, o.step_norm,
                                                                                           o.weight_decay),
                per_step=_refconv_per_step, check=_refconv_check, title="RefConv", kind="refocus",
                bench="refocus_per_step", fuse_state_dict=rc.fuse_state_dict,
                paper="RefConv: re-parameterized refocusing convolution (Cai et al., 2023)"))


# ----------------------------------------------------------------------------------------------- ACB, RepVGG, DBB
@dataclass
class BranchOptions:
    exclude: list[str] = field(default_factory=list)  # regexes over module names
    branch_scale: float = 0.0  # initial scale of each new branch's last BN; 0 = exact start
    CHECKS: ClassVar[dict] = {"branch_scale": _NONNEG}


def _structural(name: str) -> Method:
    def apply(model, o: BranchOptions, example=None, fresh=True):
        return apply_structural(model, name, exclude=o.exclude, branch_scale=o.branch_scale, example=example)

    def convs(model):
        return {n: m for n, m in structural_convs(model).items() if m.rep_branches.method == name}

    # layout 2: the branches summed after the conv's own BatchNorm, as the authors' blocks (layout 1 summed before it)
    return Method(name, apply=apply, fuse=fuse_structural, convs=convs, options=BranchOptions, paper=PAPERS[name],
                  layout=2)


# ----------------------------------------------------------------------------------------------- WN, CWN, OWN
@dataclass
class WeightOptions:
    exclude: list[str] = field(default_factory=list)  # regexes over module names


@dataclass
class OwnOptions:
    exclude: list[str] = field(default_factory=list)  # regexes over module names
    group: int = 0  # output filters per whitening group; 0 = fan-in - 1 (the most)
    CHECKS: ClassVar[dict] = {"group": _NONNEG}


def _weight(name: str, options: type) -> Method:
    def apply(model, o, example=None, fresh=True):
        return apply_weight_reparam(model, name, exclude=o.exclude, own_group=getattr(o, "group", 0),
                                    example=example)

    def convs(model):
        return {n: m for n, m in weight_reparam_convs(model).items()
                if m.parametrizations.weight[0].reparam_method == name}

    return Method(name, apply=apply, fuse=fuse_weight, convs=convs, options=options, paper=PAPERS[name])


for _name in ("acb", "repvgg", "dbb"):
    register(_structural(_name))
register(Method("orepa", apply=lambda model, o, example=None, fresh=True: apply_orepa(
    model, exclude=o.exclude, branch_scale=o.branch_scale, example=example), fuse=fuse_orepa, convs=orepa_convs,
    options=BranchOptions, title="OREPA", paper=PAPERS["orepa"]))
for _name, _options in (("wn", WeightOptions), ("cwn", WeightOptions), ("own", OwnOptions)):
    register(_weight(_name, _options))
