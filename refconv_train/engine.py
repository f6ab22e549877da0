"""Train one epoch, evaluate: the two loops every entry point shares."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import IMAGENET_MEAN, IMAGENET_STD, normalize_images
from .distributed import all_reduce_sum
from .errors import RefconvError
from .per_step import PerStepTransform

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepSettings:
    """How one optimizer step runs: device, precision, accumulation, clipping."""

    device: torch.device
    amp: str = "none"
    accum_steps: int = 1
    clip_grad_norm: float = 0.0
    channels_last: bool = False
    label_smoothing: float = 0.0
    max_nonfinite_skips: int = 0
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
class EpochStats:
    loss: float = math.nan
    images: int = 0  # over all ranks
    seconds: float = 0.0
    steps: int = 0  # optimizer steps taken in this call
    lr: float = 0.0
    nonfinite_skips: int = 0
    stopped: bool = False  # a stop was requested mid-epoch (preemption)
    extra: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    settings: StepSettings,
    *,
    epoch: int,
    global_step: int,
    world_size: int = 1,
    total_steps: int | None = None,
    start_step: int = 0,
    show_progress: bool = True,
    on_step: Callable[[int, int, Callable[[], None]], bool] | None = None,
    nan_at_step: int = -1,
    transform: PerStepTransform | None = None,
) -> EpochStats:
    """One pass over ``batches`` (micro-batches; ``accum_steps`` of them make one optimizer step).

    ``scheduler.step_update(n)`` runs after every optimizer step (per-step LR). ``on_step(step_in_epoch,
    global_step, flush)`` runs after each optimizer step and returns True to stop early (preemption).
    The loss is checked for NaN/Inf every step without a host sync: the flags are read every 10 steps (every step on
    CPU, where syncing is free) and whenever ``flush()`` is called (before writing a checkpoint: it must never hold
    weights updated with a non-finite loss). ``nan_at_step``: test-only fault injection (global step).
    ``transform``: a refocused model's :class:`PerStepTransform` (W_t once per optimizer step).
    """
    model.train()
    accum = settings.accum_steps
    device = settings.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    loss_count = 0
    bad_steps: list[tuple[int, torch.Tensor]] = []
    skips = 0

    def flush() -> None:
        nonlocal skips
        skips += _check_finite(bad_steps, epoch, optimizer.param_groups[0]["lr"], settings.max_nonfinite_skips - skips)
        bad_steps.clear()

    step = start_step
    images = 0
    stopped = False
    # The bar is closed on errors too: an error message must not land on the bar's line.
    with tqdm(total=total_steps, initial=start_step, desc=f"epoch {epoch}", disable=not show_progress,
              dynamic_ncols=True, leave=False) as bar, _cleared(transform):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(batches):
            x, y = settings.to_device(x, y)
            last_micro = (i + 1) % accum == 0
            if transform is not None and i % accum == 0:
                transform.begin()
            sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with settings.autocast():
                    loss = F.cross_entropy(model(x), y, label_smoothing=settings.label_smoothing)
                if global_step + 1 == nan_at_step:
                    loss = loss * math.nan
                    nan_at_step = -1  # once: a skipped step is retried with the next batch
                scaler.scale(loss / accum).backward()
            if transform is not None and last_micro:
                transform.finish()  # W_r's gradients (all-reduced) before the finiteness check, clipping and step
            loss = loss.detach()
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss, 0.0)
            loss_count += 1
            images += x.shape[0]
            if not last_micro:
                continue
            if settings.max_nonfinite_skips > 0 and not finite.item():  # skipping needs the flag now: one sync
                if skips >= settings.max_nonfinite_skips:
                    bad_steps.append((step, finite))
                    flush()
                skips += 1
                optimizer.zero_grad(set_to_none=True)  # drop this batch's gradients: the weights stay finite
                continue
            bad_steps.append((step, finite))
            if settings.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            global_step += 1
            scheduler.step_update(num_updates=global_step)
            lr = optimizer.param_groups[0]["lr"]
            # Read the finiteness flags at a point that syncs anyway (the progress bar's loss), not every step.
            if device.type != "cuda" or step % 10 == 0 or step == total_steps:
                flush()
                mean_loss = (loss_sum / max(loss_count, 1)).item()
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images * world_size / elapsed:.0f}")
            bar.update(1)
            if on_step is not None and on_step(step, global_step, flush):
                stopped = True
                break
        flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    total_loss, total_count, total_images = all_reduce_sum([loss_sum.item(), loss_count, images], device)
    return EpochStats(loss=total_loss / max(total_count, 1), images=int(total_images), seconds=seconds,
                      steps=step - start_step, lr=optimizer.param_groups[0]["lr"], nonfinite_skips=skips,
                      stopped=stopped)


@contextlib.contextmanager
def _cleared(transform: PerStepTransform | None):
    """A step left unfinished (error, early stop, epoch end mid-accumulation) must not leave W_t pinned."""
    try:
        yield
    finally:
        if transform is not None:
            transform.clear()


def _check_finite(flags: list[tuple[int, torch.Tensor]], epoch: int, lr: float, skips_left: int) -> int:
    """Raise at the first non-finite loss, unless skips are allowed (fp16's GradScaler skips those updates)."""
    if not flags:
        return 0
    ok = torch.stack([f for _, f in flags]).cpu()
    bad = [s for (s, _), good in zip(flags, ok.tolist()) if not good]
    if len(bad) > max(skips_left, 0):
        raise RefconvError(f"non-finite loss at epoch {epoch} step {bad[0]} (lr={lr:.4g}); the last good checkpoint "
                           f"is kept: lower optim.lr, use train.amp=bf16, or set train.max_nonfinite_skips")
    return len(bad)


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
        """The contract line of refconv-eval (DESIGN 5)."""
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
