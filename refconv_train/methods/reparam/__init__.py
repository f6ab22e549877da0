"""The paper's comparison methods (docs/design.md section 6), beside RefConv (../refconv/); their registry entries
are in ../builtin.py.

- structural (ACB, RepVGG, DBB): training-time branches on each spatial conv, folded back into its kernel;
- weight (WN, CWN, OWN): ``torch.nn.utils.parametrize`` parametrizations of each spatial conv's weight;
- OREPA: linearly scaled branches squeezed into one kernel online (a parametrization of each spatial conv's weight).

``apply_reparam(model, "acb")`` changes a model in place and returns a :class:`ReparamReport`;
``fuse_reparam(model)`` folds RefConv and these seven back into the original architecture, in place. Both predate the
registry and stay for scripts that call them; the trainer, ``refconv-fuse`` and the study go through the registry
(``refconv_train.apply_method`` / ``fuse_model``, which also know registered methods).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ...errors import RefconvError
from ..protocol import ChangedLayer, ReparamReport
from ..refconv import fuse_refocus
from .orepa import apply_orepa, fuse_orepa
from .structural import apply_structural, fuse_structural
from .weight import apply_weight_reparam, fuse_weight

STRUCTURAL = ("acb", "repvgg", "dbb")
WEIGHT = ("wn", "cwn", "own")
ONLINE = ("orepa",)
METHODS = STRUCTURAL + ONLINE + WEIGHT
PAPERS = {
    "acb": "ACNet: asymmetric convolution blocks (Ding et al., ICCV 2019)",
    "repvgg": "RepVGG (Ding et al., CVPR 2021)",
    "dbb": "Diverse Branch Block (Ding et al., CVPR 2021)",
    "orepa": "Online Convolutional Re-parameterization (Hu et al., CVPR 2022)",
    "wn": "weight normalization (Salimans & Kingma, NeurIPS 2016)",
    "cwn": "centered weight normalization (Huang et al., ICCV 2017)",
    "own": "orthogonal weight normalization (Huang et al., AAAI 2018)",
}


def apply_reparam(model: nn.Module, method: str, exclude: Iterable[str] = (), branch_scale: float = 0.0,
                  own_group: int = 0, example: torch.Tensor | None = None) -> ReparamReport:
    """Re-parameterize every spatial conv of ``model`` (kernel > 1, not matched by ``exclude``) with ``method``.

    ``branch_scale``: ACB/RepVGG/DBB, initial scale of each new branch's last BatchNorm (0: the model starts exactly
    where it was). ``own_group``: OWN, output filters per whitening group (0: fan-in - 1, the most). ``example``: an
    input batch for the hooked forward that finds conv -> BatchNorm pairs and measures the start (default: random
    64 px images). Raises :class:`RefconvError` on an unknown method or when nothing can be changed.
    """
    if method in STRUCTURAL:
        return apply_structural(model, method, exclude=exclude, branch_scale=branch_scale, example=example)
    if method in ONLINE:
        return apply_orepa(model, exclude=exclude, branch_scale=branch_scale, example=example)
    if method in WEIGHT:
        return apply_weight_reparam(model, method, exclude=exclude, own_group=own_group, example=example)
    raise RefconvError(f"unknown re-parameterization method {method!r}: use one of {', '.join(METHODS)} "
                       f"(RefConv: refconv_train.refocus_model)")


def fuse_reparam(model: nn.Module) -> list[str]:
    """Fold every re-parameterization in ``model`` (RefConv, structural branches, weight parametrizations) back into
    plain convs, in place; returns the fused conv names. Idempotent; a model holding none is returned unchanged."""
    return fuse_refocus(model) + fuse_structural(model) + fuse_orepa(model) + fuse_weight(model)


__all__ = ["STRUCTURAL", "ONLINE", "WEIGHT", "METHODS", "PAPERS", "ChangedLayer", "ReparamReport", "apply_reparam",
           "fuse_reparam"]
