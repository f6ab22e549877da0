"""RefConv's transform once per optimizer step, not once per micro-batch, and a kernel-sized gradient all-reduce.

The gradient of ``W_r`` is a linear function of the gradient of ``W_t``: ``dL/dW_r = T^T(dL/dW_t)``. So instead of
letting autograd run the transform's forward and backward for every micro-batch, :class:`PerStepTransform` computes
each ``W_t`` once when a step begins, lets the micro-batches accumulate ``dL/dW_t`` on a detached copy, and
backpropagates through the transform once when the step ends. Under DDP the ranks then all-reduce ``dL/dW_t``
(the kernels' size) instead of ``dL/dW_r`` (``C^2 m^2`` per depthwise conv: 40.6M values for mobilenetv2_100, 11.6x
the model), and ``W_r`` stays out of DDP's reducer. The gradients equal plain autograd's up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .inject import refocused_convs
from .parametrization import Refocus


class PerStepTransform:
    """``with transform.step(): <the step's micro-batches, forward + backward>``, then clip and step the optimizer.

    Entering computes each ``W_t`` once; leaving normally backpropagates the accumulated ``dL/dW_t`` into ``W_r``'s
    ``.grad`` (averaged over ranks when ``distributed``, as DDP does for the other parameters); leaving on an error
    drops the pinned ``W_t``, so the parametrization computes it again on its next use."""

    def __init__(self, model: nn.Module, distributed: bool = False) -> None:
        self.layers: list[tuple[Refocus, nn.Parameter]] = [
            (conv.parametrizations.weight[0], conv.parametrizations.weight.original)
            for conv in refocused_convs(model).values()
        ]
        self.distributed = distributed
        self._outputs: list[torch.Tensor] = []

    @staticmethod
    def exclude_from_ddp(model: nn.Module) -> None:
        """Keep the transform's trainable inputs (``W_r``; ``W_b`` when trainable) out of DDP's gradient reducer:
        their gradients come from :meth:`step`, already averaged. Call before wrapping the model in DDP, and make
        sure every rank starts from the same ``W_r`` (DDP does not broadcast what it ignores): :meth:`broadcast`."""
        names = [name for name, p in _transform_inputs(model).items() if p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)

    def broadcast(self) -> None:
        """Rank 0's ``W_r`` (and trainable ``W_b``) to every rank."""
        with torch.no_grad():
            for refocus, base in self.layers:
                for p in (refocus.refocus_weight, base):
                    if p.requires_grad:
                        torch_dist.broadcast(p, src=0)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self._begin()
        try:
            yield
        except BaseException:
            self._clear()
            raise
        self._finish()

    def _begin(self) -> None:
        self._clear()
        with torch.enable_grad():
            for refocus, base in self.layers:
                out = refocus(base)  # the module's own arithmetic (GEMM or grouped conv), with its graph
                refocus.step_weight = out.detach().requires_grad_()
                self._outputs.append(out)

    def _finish(self) -> None:
        if not self._outputs:
            return
        grads = [torch.zeros_like(r.step_weight) if r.step_weight.grad is None else r.step_weight.grad
                 for r, _ in self.layers]
        if self.distributed:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch_dist.all_reduce(flat)
            flat /= torch_dist.get_world_size()
            grads = list(flat.split([g.numel() for g in grads]))
        outputs, self._outputs = self._outputs, []
        for i, (refocus, _) in enumerate(self.layers):
            # Layer by layer, dropping each W_t and dL/dW_t once used: the peak holds one layer's W_r gradient
            # on top of them, not all of them at once (docs/performance.md).
            refocus.step_weight = None
            out, grad, outputs[i], grads[i] = outputs[i], grads[i], None, None
            torch.autograd.backward(out, grad.view_as(out))
            del out, grad

    def _clear(self) -> None:
        self._outputs = []
        for refocus, _ in self.layers:
            refocus.step_weight = None


def ddp_gradient_values(model: nn.Module, per_step: bool) -> int:
    """Gradient values a DDP step all-reduces: every trainable parameter, or, with :class:`PerStepTransform`, the
    kernel-sized ``dL/dW_t`` in place of the transform's trainable inputs (``W_r``)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not per_step:
        return sum(p.numel() for p in trainable.values())
    inputs = _transform_inputs(model)
    plain = sum(p.numel() for name, p in trainable.items() if name not in inputs)
    return plain + sum(base.numel() for _, base in PerStepTransform(model).layers)


def _transform_inputs(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name -> tensor for RefConv's ``W_r`` and ``W_b`` only: other parametrizations of the model (weight
    norm, ...) keep their place in DDP's reducer."""
    out = {}
    for name, conv in refocused_convs(model).items():
        prefix = f"{name}." if name else ""
        out[f"{prefix}parametrizations.weight.original"] = conv.parametrizations.weight.original
        out[f"{prefix}parametrizations.weight.0.refocus_weight"] = conv.parametrizations.weight[0].refocus_weight
    return out
