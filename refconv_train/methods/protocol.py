"""What every re-parameterization method shares: which convs it targets, what it reports, the exact-start check.

A method is one :class:`~refconv_train.methods.registry.Method` entry of the registry (docs/design.md section 6):
``apply`` (in place, returns the one report type, :class:`ReparamReport`; raises :class:`RefconvError` when it finds
nothing to change), ``fuse(model) -> list[str]`` (in place, idempotent: the original module classes, parameter names
and shapes come back) and ``convs(model) -> dict`` (the convs it currently holds).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RefconvError
from .modules import compile_patterns
from .refconv.kernel_math import conv_kind
from .refconv.parametrization import Refocus


@dataclass
class ChangedLayer:
    name: str  # module name of the conv
    kind: str  # dense | depthwise | group
    kernel: tuple[int, int]
    added_params: int  # trainable values the method adds to this conv during training
    detail: str = ""  # e.g. "3x1 + 1x3 branches, bias -> bn1.running_mean"


@dataclass
class ReparamReport:
    """What a method's ``apply`` did: changed convs, skipped convs with the reason, how far the start moved."""

    method: str
    layers: list[ChangedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # max |f(x) - f_original(x)| right after apply, eval mode, random inputs (0 for methods with an exact start)
    start_max_abs_diff: float | None = None
    table_file: ClassVar[str] = "reparam_report.txt"  # where a run writes table()

    @property
    def added_params(self) -> int:
        return sum(layer.added_params for layer in self.layers)

    def counts(self) -> dict[str, int]:
        """Changed convs per kind (dense, depthwise, group)."""
        return dict(Counter(layer.kind for layer in self.layers))

    def summary(self) -> str:
        text = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        start = "" if self.start_max_abs_diff is None else f", start moved by {self.start_max_abs_diff:.3g}"
        return (f"{self.method}: changed {len(self.layers)} convs ({text}), added params={self.added_params:,}"
                f"{start}; skipped {len(self.skipped)}")

    def table(self) -> str:
        rows = [f"{'layer':40s} {'kind':9s} {'kernel':7s} {'added params':>12s}  detail"]
        for layer in self.layers:
            kernel = "x".join(map(str, layer.kernel))
            rows.append(f"{layer.name:40s} {layer.kind:9s} {kernel:7s} {layer.added_params:>12,}  {layer.detail}")
        rows += [f"{name:40s} skipped: {why}" for name, why in self.skipped]
        rows.append(self.summary())
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {**asdict(self), "added_params": self.added_params}


def spatial_targets(model: nn.Module, method: str, exclude: Iterable[str] = (),
                    is_taken=lambda conv: False) -> tuple[list[tuple[str, nn.Conv2d]], list[tuple[str, str]]]:
    """Every ``nn.Conv2d`` (subclasses included) with a kernel larger than 1x1, by module name, minus those matched
    by an ``exclude`` regular expression and those ``is_taken`` says are already changed (someone else's
    parametrization).
    Returns ``(targets, skipped)``; skipped 1x1 convs are listed with their reason. Warns about unused patterns.
    A model that already holds one of our re-parameterizations is refused (:func:`refuse_another_method`)."""
    refuse_another_method(model, method)
    patterns = compile_patterns(exclude, method)
    used: set[str] = set()
    targets, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or ".rep_branches." in f".{name}.":
            continue  # the convs inside a structural method's branches are that method's, not targets
        hits = [p.pattern for p in patterns if p.search(name)]
        used.update(hits)
        if hits:
            skipped.append((name, f"excluded by {hits[0]!r}"))
        elif is_taken(module):
            skipped.append((name, "weight already parametrized"))  # not by us: refused above
        elif tuple(module.kernel_size) == (1, 1):
            skipped.append((name, "1x1"))
        else:
            targets.append((name, module))
    for pattern in patterns:
        if pattern.pattern not in used:
            warnings.warn(f"{method} exclude pattern {pattern.pattern!r} matches no convolution", stacklevel=3)
    return targets, skipped


def held_method(model: nn.Module) -> tuple[str, str] | None:
    """``(method, conv name)`` of the first conv holding one of our re-parameterizations: RefConv's parametrization,
    a structural method's branches (``rep_branches``), a weight method's parametrization; None for a plain model."""
    for name, module in model.named_modules():
        if hasattr(module, "rep_branches"):
            return getattr(module.rep_branches, "method", "structural"), name
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                method = "refconv" if isinstance(p, Refocus) else getattr(p, "reparam_method", None)
                if method:
                    return method, name
    return None


def refuse_another_method(model: nn.Module, method: str) -> None:
    """One method per model: a second one would re-parameterize the first one's convs (RefConv refocused DBB's branch
    kernels) or skip every conv, and no fuse is defined for the mix. Raises a one-line :class:`RefconvError`."""
    held = held_method(model)
    if held is not None:
        names = {"refconv": "RefConv"}
        raise RefconvError(f"{names.get(method, method)}: the model is already re-parameterized with "
                           f"{names.get(held[0], held[0])} (conv '{held[1]}'); one method per model: fuse it first "
                           f"(refconv-fuse, or fuse_reparam(model)) or start from the plain model")


def nothing_changed(method: str, skipped: list[tuple[str, str]]) -> RefconvError:
    """The one-line error of a method that found no conv to change."""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        key = why.split(" by ")[0] if why.startswith("excluded") else why
        reasons[key] = reasons.get(key, 0) + 1
    seen = ", ".join(f"{n} {why}" for why, n in reasons.items()) or "no Conv2d at all"
    return RefconvError(f"{method} found no convolution to change ({seen}): it needs convs with a kernel larger "
                        f"than 1x1; check the model and the exclude patterns")


def layer_info(name: str, conv: nn.Conv2d, added_params: int, detail: str = "") -> ChangedLayer:
    return ChangedLayer(name, conv_kind(conv), tuple(conv.kernel_size), int(added_params), detail)


def example_input(model: nn.Module, size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded random images for a model: as many channels as its first conv takes, on its device, in its dtype."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    param = next(model.parameters(), None)
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return x if param is None else x.to(param.device, param.dtype)


@torch.no_grad()
def eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode output on ``x`` (its mode is restored); for measuring how far ``apply`` moved it."""
    mode = model.training
    model.eval()
    try:
        out = model(x)
        return out.float() if isinstance(out, torch.Tensor) else out
    finally:
        model.train(mode)
