"""One optimizer step, the loss and finiteness flags of an epoch's steps, evaluation: what the trainer's loop, the
benchmarks and a custom loop share."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from .distributed import all_reduce_sum
from .errors import RefconvError


class StepHook(Protocol):
    """A method's per-step hook (``Method.per_step``): ``step()`` wraps one optimizer step (RefConv's
    PerStepTransform computes W_t once there)."""

    def step(self) -> AbstractContextManager: ...

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepSettings:
    """How one optimizer step runs: device, precision, clipping, loss."""

    device: torch.device
    amp: str = "none"
    clip_grad_norm: float = 0.0
    channels_last: bool = False
    label_smoothing: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN  # of uint8 batches (normalize_images); float batches pass unchanged
    std: tuple[float, ...] = IMAGENET_STD

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy a batch to the device (``uint8`` images: a quarter of float32's bytes), then normalize it there."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return normalize_images(images, self.mean, self.std), targets.to(self.device, non_blocking=True)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss of the micro-batches, on the device (reading it syncs)
    finite: torch.Tensor  # every micro-batch's loss was finite (bool, on the device)
    images: int
    stepped: bool = True  # False: a non-finite step was skipped, the weights are untouched


@dataclass
class EpochStats:
    """One training epoch as the trainer's loop measured it."""

    loss: float
    images: int  # over all ranks
    seconds: float
    lr: float
    stopped: bool  # a stop was requested mid-epoch (preemption)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_step(model: nn.Module, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, settings: StepSettings,
               transform: StepHook | None = None, skip_nonfinite: bool = False) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation; under DDP gradients are synchronised on the
    last one only), then clipping, the (scaled) optimizer step and ``zero_grad``. ``transform``: the method's
    per-step hook (RefConv's :class:`PerStepTransform`: ``W_t`` once per step). ``skip_nonfinite``: read the loss
    now (a sync) and
    skip the update when it is not finite. The loss is otherwise not read: no host sync per step."""
    losses = []
    images = 0
    with transform.step() if transform is not None else contextlib.nullcontext():
        for i, (x, y) in enumerate(micro_batches):
            x, y = settings.to_device(x, y)
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                with settings.autocast():
                    loss = F.cross_entropy(model(x), y, label_smoothing=settings.label_smoothing)
                scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            images += x.shape[0]
    loss = torch.stack(losses).mean()
    finite = torch.isfinite(torch.stack(losses)).all()
    if skip_nonfinite and not finite.item():
        optimizer.zero_grad(set_to_none=True)  # drop this step's gradients: the weights stay finite
        return StepResult(loss, finite, images, stepped=False)
    if settings.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], settings.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, finite, images)


class LossMeter:
    """An epoch's running loss and its steps' finiteness flags, kept on the device until :meth:`read`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = torch.zeros((), device=device, dtype=torch.float64)
        self.steps = 0
        self._flags: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, result: StepResult) -> None:
        self.total += torch.where(result.finite, result.loss, 0.0)
        self.steps += 1
        self._flags.append((step, result.finite))

    def read(self, epoch: int, lr: float) -> float:
        """The mean loss so far (one host sync); raises at the first non-finite step since the last read: its
        update has been applied, so no checkpoint may be written after it."""
        if self._flags:
            ok = torch.stack([f for _, f in self._flags]).cpu().tolist()
            bad = [s for (s, _), good in zip(self._flags, ok) if not good]
            self._flags = []
            if bad:
                raise RefconvError(f"non-finite loss at epoch {epoch} step {bad[0]} (lr={lr:.4g}); the last good "
                                   f"checkpoint is kept: lower optim.lr, use train.amp=bf16, or set "
                                   f"train.max_nonfinite_skips")
        return float(self.total) / max(self.steps, 1)


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The contract line of refconv-eval (docs/design.md section 5)."""
        return (f"top1={self.top1:.3f} top5={self.top5:.3f} loss={self.loss:.4f} images={self.images} "
                f"img_per_s={self.images_per_second:.1f}")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, settings: StepSettings, show_progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Top-1/top-5 accuracy and mean cross-entropy; sums are reduced over ranks, so with a non-padding sampler every
    image counts exactly once."""
    was_training = model.training
    model.eval()
    device = settings.device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, loss_sum, count
    t0 = time.perf_counter()
    for x, y in tqdm(batches, desc=desc, disable=not show_progress, dynamic_ncols=True, leave=False):
        x, y = settings.to_device(x, y)
        with settings.autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(y[:, None])
        sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                             F.cross_entropy(logits, y, reduction="sum"), torch.tensor(y.numel(), device=device)]
                            ).to(torch.float64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    c1, c5, loss_sum, count = all_reduce_sum(sums.tolist(), device)
    model.train(was_training)
    n = max(count, 1)
    return EvalResult(top1=100 * c1 / n, top5=100 * c5 / n, loss=loss_sum / n, images=int(count), seconds=seconds)

