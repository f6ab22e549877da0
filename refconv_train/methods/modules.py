"""What every re-parameterization (RefConv and the comparison methods) shares when it edits a model."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RefconvError


def compile_patterns(exclude: Iterable[str], method: str) -> list[re.Pattern]:
    """The ``exclude`` regular expressions (one string is one pattern); a bad one is a one-line error."""
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = []
    for text in exclude:
        try:
            patterns.append(re.compile(text))
        except re.error as e:
            raise RefconvError(f"{method} exclude pattern {text!r} is not a valid regular expression ({e})") from None
    return patterns


def bake_weight(conv: nn.Module) -> None:
    """Replace a parametrized ``weight`` by a plain parameter holding its current value, in place: the module gets
    back its original class and parameter names; ``requires_grad`` is kept."""
    requires_grad = any(p.requires_grad for p in conv.parametrizations.weight.parameters())
    # Deep copies (EMA, verification) share parametrize's generated class with the original, and removal
    # deletes the `weight` property from that class: give this module a private copy of it first.
    cls = type(conv)
    conv.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    with torch.no_grad():
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    conv.weight.requires_grad_(requires_grad)


def same_values(old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> bool:
    """Whether an eval-mode cache's inputs still hold these values (shapes, dtypes, devices included): the caches'
    layout keys (pointers, strides) do not see a tensor changed in place, by ``load_state_dict`` or an optimizer."""
    return len(old) == len(new) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(old, new, strict=True))
