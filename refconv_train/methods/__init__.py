"""The re-parameterization methods behind one registry (docs/design.md section 6).

- :mod:`.registry`: the :class:`Method` entry, :func:`register`, :func:`get`, entry points and ``plugins:`` modules;
- :mod:`.builtin`: the entries of none, RefConv (:mod:`.refconv`) and the paper's comparison methods (:mod:`.reparam`);
- :mod:`.protocol`: what they share (targets, the one report type :class:`ReparamReport`, the start check);
- :mod:`.modules`: exclude patterns and baking a parametrized weight.

``apply_method(model, "dbb", branch_scale=1.0)`` applies any registered method; ``fuse_model(model)`` folds whatever
the model holds back into the original architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import RefconvError
from . import builtin  # noqa: F401  (registers the built-in methods)
from .protocol import ChangedLayer, ReparamReport
from .registry import ENTRY_POINT_GROUP, Method, NoOptions, get, import_plugins, names, register, registered


def make_options(name: str, **options: Any) -> Any:
    """The options dataclass of method ``name`` with ``options`` set (unknown keys are a one-line error)."""
    cls = get(name).options
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RefconvError(f"method {name!r} has no option {unknown[0]!r}; its options: {', '.join(known) or 'none'}")
    return cls(**options)


def apply_method(model: nn.Module, name: str, example: torch.Tensor | None = None, **options: Any
                 ) -> ReparamReport | None:
    """Re-parameterize ``model`` in place with the registered method ``name`` and its ``options`` (the keys of its
    config section); returns its report (``None`` for ``none``). ``example``: an input batch for the start check."""
    return get(name).apply(model, make_options(name, **options), example=example, fresh=True)


def fuse_model(model: nn.Module) -> list[str]:
    """Fold every re-parameterization ``model`` holds, of any registered method, back into plain convs, in place;
    returns the fused conv names. Idempotent; a model holding none is returned unchanged."""
    fused: list[str] = []
    for method in registered():
        fused += method.fuse(model)
    return fused


def held_methods(model: nn.Module) -> list[str]:
    """The names of the registered methods whose convs ``model`` currently holds."""
    return [m.name for m in registered() if m.convs(model)]


__all__ = ["ENTRY_POINT_GROUP", "Method", "NoOptions", "ChangedLayer", "ReparamReport", "apply_method",
           "fuse_model", "get", "held_methods", "import_plugins", "make_options", "names", "register", "registered"]
