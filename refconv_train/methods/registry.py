"""The one registry of re-parameterization methods (docs/design.md section 6): a method's name maps to its
:class:`Method` entry once, like timm's ``register_model``; callers ask the registry and never compare names.

A method is a small duck-typed interface, the same for RefConv, the paper's comparison methods and a user's own:

- ``options``: a dataclass whose fields are the keys of the method's config section (``dbb: {branch_scale: 1}``),
  with type annotations (checked like every config key) and defaults; a ``CHECKS`` class attribute
  ``{field: (predicate, "be >= 0")}`` adds value checks;
- ``apply(model, options, example=None, fresh=True) -> ReparamReport | None``: in place; ``example`` is an input
  batch (conv -> BN pairs, the start check), ``fresh=False`` when the weights come from a checkpoint afterwards
  (skip the checks of the start); ``None`` only for the plain run;
- ``fuse(model) -> list[str]``: fold what this method holds back into plain convs, in place, idempotent;
- ``convs(model) -> dict``: the convs this method currently holds;
- ``param_groups(model, options)`` (default: one group of every trainable parameter) and
  ``per_step(model, options, distributed)`` (default none): an object whose ``step()`` context wraps each optimizer
  step (RefConv computes ``W_t`` once per step there);
- ``check(options, pretrained)`` (optional): a config-level check of the start (RefConv refuses random kernels);
- ``fuse_state_dict(state) -> state`` (optional): fold the method's keys of a bare state dict without building the
  model (RefConv's W_b / W_r pairs), for weight files that are not our training checkpoints.

Methods from outside the package register with :func:`register`, from a module named in the config's top-level
``plugins:`` list (imported before the config is read) or from a ``refconv_train.methods`` entry point.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from ..errors import RefconvError

ENTRY_POINT_GROUP = "refconv_train.methods"


@dataclass(frozen=True)
class NoOptions:
    """A method without options (its config section, if any, must be empty)."""


def plain_param_groups(model: nn.Module, options: Any = None) -> list[dict]:
    """One optimizer group holding every trainable parameter: the layout of plain training."""
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def no_per_step(model: nn.Module, options: Any = None, distributed: bool = False) -> None:
    return None


def no_check(options: Any, pretrained: Any) -> None:
    return None


def keep_state_dict(state: dict) -> dict:
    return state


@dataclass(frozen=True)
class Method:
    """One registry entry. ``title``: the name in messages (``RefConv``); ``kind``: what a restored training
    checkpoint of this method is called (``refocus`` for RefConv, ``baseline`` for none, else the name)."""

    name: str
    apply: Callable[..., Any]
    fuse: Callable[[nn.Module], list[str]]
    convs: Callable[[nn.Module], dict]
    options: type = NoOptions
    param_groups: Callable[..., list[dict]] = plain_param_groups
    per_step: Callable[..., Any] = no_per_step
    check: Callable[[Any, Any], None] = no_check
    fuse_state_dict: Callable[[dict], dict] = keep_state_dict
    title: str = ""
    kind: str = ""
    paper: str = ""
    bench: str = ""  # what scripts/benchmark.py calls this method's training step (default: the name)
    # What the method's training-time modules compute, versioned: training checkpoints record it, and one of another
    # layout is refused (its state dict would load strictly and compute another function). docs/design.md section 6.
    layout: int = 1
    deploys_fused: bool = True  # False: a run's deployable file is its last.pth (nothing to fuse: plain training)

    def __post_init__(self) -> None:
        object.__setattr__(self, "title", self.title or self.name.upper())
        object.__setattr__(self, "kind", self.kind or self.name)


_REGISTRY: dict[str, Method] = {}
_entry_points_loaded = False


def register(method: Method | None = None, *, replace: bool = False, **fields: Any) -> Method:
    """Add a method: ``register(Method(...))`` or ``register(name=..., apply=..., fuse=..., convs=..., ...)``.
    Re-registering the same name is an error unless ``replace`` (re-importing a plugin module registers the same
    functions again: that is allowed)."""
    if method is None:
        method = Method(**fields)
    missing = [a for a in ("name", "apply", "fuse", "convs", "options") if not hasattr(method, a)]
    if missing or not dataclasses.is_dataclass(method.options):
        what = f"lacks {', '.join(missing)}" if missing else "has options that are not a dataclass"
        raise RefconvError(f"method {getattr(method, 'name', method)!r} {what}: see refconv_train.methods.Method")
    if not method.name.isidentifier() or method.name in ("method", "plugins", "model", "data", "optim", "train"):
        raise RefconvError(f"method name {method.name!r} must be an identifier and not a config section's name")
    old = _REGISTRY.get(method.name)
    same = old is not None and (old.apply, old.fuse) == (method.apply, method.fuse)
    if old is not None and not (replace or same or _same_source(old, method)):
        raise RefconvError(f"method {method.name!r} is already registered; pick another name or pass replace=True")
    _REGISTRY[method.name] = method
    return method


def _same_source(a: Method, b: Method) -> bool:
    """The same definition run again (a plugin module imported under two names: as a file and as a package)."""
    code = [getattr(m.apply, "__code__", None) for m in (a, b)]
    where = [(c.co_filename, c.co_firstlineno) if c is not None else None for c in code]
    return where[0] is not None and where[0] == where[1]


def get(name: str) -> Method:
    """The entry of ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        raise RefconvError(f"unknown method {name!r}: use one of {', '.join(names())}, or register your own "
                           f"(refconv_train.methods.register, a 'plugins:' module or a '{ENTRY_POINT_GROUP}' "
                           f"entry point)")
    return _REGISTRY[name]


def names() -> list[str]:
    load_entry_points()
    return list(_REGISTRY)


def registered() -> list[Method]:
    """Every entry, in registration order (built-ins first): the order :func:`fuse_model` folds them in."""
    load_entry_points()
    return list(_REGISTRY.values())


def load_entry_points() -> None:
    """Import the ``refconv_train.methods`` entry points once: each names a module (which registers on import), a
    :class:`Method`, or a function returning one (or a list of them)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin names itself, in one line
            raise RefconvError(f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP} failed to load: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        for item in _as_methods(obj() if callable(obj) and not isinstance(obj, Method) else obj):
            register(item)


def _as_methods(obj: Any) -> Iterable[Method]:
    if isinstance(obj, Method):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [m for m in obj if isinstance(m, Method)]
    return []  # a module that registered itself on import


def import_plugins(modules: Iterable[str]) -> None:
    """Import the modules a config's ``plugins:`` names (each registers its methods on import); one-line errors."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise RefconvError(f"plugins: cannot import {name!r} ({e}); make the module importable (install it or "
                               f"add its folder to PYTHONPATH)") from None
