"""The pieces of a run built from its config: SGD with the method's parameter groups, the per-step LR schedule
(the model: refconv_train.models.build_training_model). Training and the benchmarks share them without importing
the trainer."""

from __future__ import annotations

import torch
from timm.layers import convert_sync_batchnorm
from timm.scheduler import CosineLRScheduler
from torch import nn

from .. import methods
from ..config import Config, OptimConfig
from ..errors import RefconvError


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Every trainable parameter once, grouped as the config's method says (RefConv: ``refconv.step_norm`` /
    ``refconv.weight_decay``; the others: one group)."""
    return methods.get(cfg.method).param_groups(model, cfg.method_options)


def build_sgd(params: list[nn.Parameter] | list[dict], lr: float, optim: OptimConfig) -> torch.optim.SGD:
    """SGD with the fused kernel where PyTorch has one: W_r can hold 10x the model's parameters (mobilenetv2_100:
    40.6M), and the fused step was measured 2.3x faster than the default one on them (docs/performance.md)."""
    kwargs = dict(lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    try:
        return torch.optim.SGD(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.SGD(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-step LR: linear warmup over ``warmup_epochs`` from ``lr * warmup_start_factor``, then cosine over ``epochs``
    down to ``min_lr``; the warmup runs before the cosine epochs (the authors run 5 + 100). The peak LR is the
    optimizer's (already scaled to the global batch); each group's ``lr_scale`` multiplies it. Call
    ``step_update(num_updates=global_step)`` before the first step and after each one."""
    peak = optimizer.defaults["lr"]
    return CosineLRScheduler(
        optimizer, t_initial=max(optim.epochs * steps_per_epoch, 1), lr_min=optim.min_lr,
        warmup_t=optim.warmup_epochs * steps_per_epoch, warmup_lr_init=peak * optim.warmup_start_factor,
        warmup_prefix=True, t_in_epochs=False)


def to_sync_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm as a SyncBatchNorm, through timm's converter: torch's turns timm's ``BatchNormAct2d`` into a
    plain ``SyncBatchNorm`` and silently drops the activation (and drop) fused into it."""
    return convert_sync_batchnorm(model)


def use_sync_bn(sync_bn: bool, distributed: bool, device: torch.device) -> bool:
    """SyncBatchNorm only matters with several processes, and PyTorch's only runs on CUDA (DDP refuses it on CPU
    with a traceback): say so in one line instead."""
    if sync_bn and distributed and device.type != "cuda":
        raise RefconvError(f"train.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only), this run "
                           f"is on {device.type}: set train.sync_bn=false")
    return sync_bn and distributed
