"""The loss landscape of a trained model (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018;
the RefConv paper's Fig. 8) as small functions of a parameter dict, so that every piece is testable on its own.

- A *loss* is a list of weighted terms ``(w, fn)``, ``fn(params) -> scalar tensor``, ``sum(w) = 1``:
  :func:`dataset_terms` makes one per batch of a fixed image subset (mean cross-entropy of the model called with
  ``params`` through ``torch.func.functional_call``: the model itself is never edited), a test can pass a bowl.
- Directions (:func:`random_directions`): seeded Gaussians, *filter-normalized*: each output filter (row) of every
  weight with ``dim > 1`` is rescaled to the norm of the model's filter; ``dim <= 1`` parameters (norm weights and
  biases, conv/linear biases) get a zero direction and buffers (BN statistics) are never touched. A filter scaled by
  ``c`` ahead of a BatchNorm gets a direction scaled by ``c``: the numbers do not change (the reason it exists).
- Numbers: the 2-D surface ``L(theta + a d1 + b d2)`` on a grid (:func:`loss_surface`), the rise of the loss at
  radius ``r`` along ``K`` directions (:func:`radius_rises`), and the top Hessian eigenvalue by power iteration on
  exact Hessian-vector products (``torch.func``: reverse over reverse), with its history
  (:func:`top_hessian_eigenvalue`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp
from torch.overrides import TorchFunctionMode

from ..errors import RefconvError

Params = dict[str, torch.Tensor]
LossTerm = tuple[float, Callable[[Params], torch.Tensor]]


# ----------------------------------------------------------------------------------------------- directions
def model_params(model: nn.Module) -> Params:
    """The model's parameters by name, detached (the point the landscape is drawn around)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def random_direction(params: Params, generator: torch.Generator) -> Params:
    """A standard Gaussian for every parameter with ``dim > 1``, zeros for the others. Drawn on the CPU in parameter
    order, so direction ``k`` of a seed depends only on the shapes: models of one architecture get the same draws."""
    return {name: (torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) if p.dim() > 1
                   else torch.zeros_like(p)) for name, p in params.items()}


def filter_normalize(direction: Params, params: Params, eps: float = 1e-10) -> Params:
    """Each output filter (first-axis slice) of every ``dim > 1`` direction rescaled to the norm of the model's
    filter; ``dim <= 1`` entries become zero."""
    out = {}
    for name, p in params.items():
        d = direction[name]
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)
            continue
        scale = p.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + eps)
        out[name] = d * scale.view(-1, *[1] * (p.dim() - 1))
    return out


def random_directions(params: Params, count: int, seed: int) -> list[Params]:
    """``count`` filter-normalized random directions from one seeded generator (direction ``k`` is the same for any
    ``count > k``)."""
    generator = torch.Generator().manual_seed(seed)
    return [filter_normalize(random_direction(params, generator), params) for _ in range(count)]


def offset(params: Params, directions: Sequence[Params], coeffs: Sequence[float]) -> Params:
    """``theta + sum_i c_i d_i`` (new tensors; a zero coefficient adds nothing, so ``offset(theta, ., 0) == theta``)."""
    out = {}
    for name, p in params.items():
        for c, d in zip(coeffs, directions, strict=True):
            if c != 0.0:
                p = p + c * d[name]
        out[name] = p
    return out


# ----------------------------------------------------------------------------------------------- the loss
def _batch_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, params: Params) -> torch.Tensor:
    return F.cross_entropy(functional_call(model, params, (images,)), targets)


def dataset_terms(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[LossTerm]:
    """Mean cross-entropy over all images of ``batches`` (normalized float images), one term per batch weighted by
    its share of the images. The model should be in eval mode (:func:`evaluating`): BN uses its running statistics."""
    total = sum(len(y) for _, y in batches)
    if total == 0:
        raise RefconvError("no images to measure the loss on")
    return [(len(y) / total, functools.partial(_batch_loss, model, x, y)) for x, y in batches]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the block, then the model's own mode again."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def loss_at(terms: Sequence[LossTerm], params: Params) -> float:
    """The loss at ``params`` (no graph; float64 sum of the terms)."""
    with torch.no_grad():
        return sum(w * float(fn(params)) for w, fn in terms)


def grid_coords(points: int, span: float) -> list[float]:
    """``points`` (odd: the centre is exactly 0) evenly spaced values from ``-span`` to ``span``."""
    if points < 3 or points % 2 == 0 or span <= 0:
        raise RefconvError(f"the grid needs an odd number of points >= 3 and a span > 0 (got {points}, {span}): "
                           "e.g. --grid 21 --span 1")
    half = (points - 1) // 2
    return [span * i / half for i in range(-half, half + 1)]


def _tick_after(tick: Callable[[], object] | None, value: float) -> float:
    if tick is not None:
        tick()
    return value


def loss_surface(terms: Sequence[LossTerm], params: Params, d1: Params, d2: Params, coords: Sequence[float],
                 tick: Callable[[], object] | None = None) -> torch.Tensor:
    """``Z[i, j] = L(theta + coords[j] d1 + coords[i] d2)`` (rows: ``d2``, columns: ``d1``, as ``contour`` draws).
    ``tick``: called after each point (a progress bar's ``update``)."""
    z = torch.empty(len(coords), len(coords), dtype=torch.float64)
    for i, b in enumerate(coords):
        for j, a in enumerate(coords):
            z[i, j] = _tick_after(tick, loss_at(terms, offset(params, (d1, d2), (a, b))))
    return z


def radius_rises(terms: Sequence[LossTerm], params: Params, directions: Sequence[Params], radii: Sequence[float],
                 loss0: float, tick: Callable[[], object] | None = None) -> torch.Tensor:
    """``(K, R)``: ``L(theta + r d_k) - L(theta)`` for every direction ``k`` and radius ``r``."""
    return torch.tensor([[_tick_after(tick, loss_at(terms, offset(params, (d,), (r,))) - loss0) for r in radii]
                         for d in directions], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- the Hessian
class _TwiceDifferentiable(TorchFunctionMode):
    """Ops without a second derivative in PyTorch, computed as the same function of ops that have one.
    ``hardsigmoid`` (MobileNetV3's squeeze-excite gate) has no double backward: ``relu6(x + 3) / 6`` is equal."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.hardsigmoid:
            return F.relu6(args[0] + 3.0) / 6.0
        return func(*args, **(kwargs or {}))


def hessian_vector_product(terms: Sequence[LossTerm], params: Params, v: Params) -> Params:
    """``H v`` of the loss at ``params``, exactly: reverse-mode over reverse-mode (``torch.func.vjp`` of
    ``torch.func.grad``), summed over the terms."""
    out = {name: torch.zeros_like(p) for name, p in params.items()}
    try:
        with _TwiceDifferentiable():
            for w, fn in terms:
                _, pull_back = vjp(grad(fn), params)
                for name, hv in pull_back(v)[0].items():
                    out[name] += w * hv
    except (RuntimeError, NotImplementedError) as e:
        if "derivative" not in str(e) and "not implemented" not in str(e).lower():
            raise
        raise RefconvError(f"this model has an op without a second derivative in PyTorch "
                           f"({str(e).splitlines()[0][:120]}); use --hessian-iters 0 to skip the Hessian") from None
    return out


def _dot(a: Params, b: Params) -> float:
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


@dataclass
class PowerIteration:
    eigenvalue: float  # the estimate of the last iteration (largest in magnitude, with its sign)
    history: list[float] = field(default_factory=list)  # Rayleigh quotient v^T H v after each product
    converged: bool = False  # relative change below tol before the last allowed iteration


def top_hessian_eigenvalue(terms: Sequence[LossTerm], params: Params, iters: int = 20, tol: float = 1e-3,
                           seed: int = 0) -> PowerIteration:
    """Power iteration ``v <- H v / ||H v||`` from a seeded random unit ``v`` over all parameters; stops when the
    Rayleigh quotient changes by less than ``tol`` (relative) or after ``iters`` products."""
    generator = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=generator).to(p) for k, p in params.items()}
    result = PowerIteration(float("nan"))
    norm = _dot(v, v) ** 0.5
    for _ in range(iters):
        v = {k: t / norm for k, t in v.items()}
        hv = hessian_vector_product(terms, params, v)
        estimate = _dot(v, hv)
        previous, result.eigenvalue = result.eigenvalue, estimate
        result.history.append(estimate)
        norm = _dot(hv, hv) ** 0.5
        if norm == 0.0 or abs(estimate - previous) <= tol * abs(estimate):
            result.converged = True
            break
        v = hv
    return result
