"""The training run behind ``refconv-train``: baseline or refocus, one recipe, one CPU or many GPUs (torchrun)."""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import data as data_lib
from .checkpoint import atomic_save, load_training_checkpoint, rng_state, set_rng_state
from .config import Config, OptimConfig, config_to_dict, save_config
from .distributed import DistInfo, all_gather, barrier, broadcast_flag, cleanup, init_distributed
from .engine import EvalResult, StepSettings, evaluate, train_one_epoch
from .errors import RefconvError
from .faults import Fault
from .fusing import fuse_and_verify, fused_outputs, write_fused
from .models import CHECKPOINT_FORMAT, build_model
from .per_step import PerStepTransform
from .refocus import refocus_model, refocus_param_groups

log = logging.getLogger("refconv_train")


@dataclass
class RunResult:
    output: Path
    epochs_done: int
    best_top1: float
    last_eval: EvalResult | None
    fused_max_abs_diff: float | None = None
    history: list[dict] = field(default_factory=list)
    stopped: bool = False  # by a signal (preemption): last.pth holds the step reached


def build_training_model(cfg: Config, pretrained: bool | str | None = None) -> tuple[nn.Module, object]:
    """The backbone with its pretrained weights, refocused when ``refocus.enabled`` (the report is returned)."""
    m = cfg.model
    model = build_model(m.name, num_classes=m.num_classes,
                        pretrained=m.pretrained if pretrained is None else pretrained, **m.kwargs)
    report = None
    if cfg.refocus.enabled:
        r = cfg.refocus
        report = refocus_model(model, map_k=r.map_k, init=r.init, exclude=r.exclude, base=r.base,
                               base_init=r.base_init)
    return model, report


def use_sync_bn(sync_bn: bool, distributed: bool, device: torch.device) -> bool:
    """SyncBatchNorm only matters with several processes, and PyTorch's only runs on CUDA (DDP refuses it on CPU
    with a traceback): say so in one line instead."""
    if sync_bn and distributed and device.type != "cuda":
        raise RefconvError(f"train.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only), this run "
                           f"is on {device.type}: set train.sync_bn=false")
    return sync_bn and distributed


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
    optimizer's (already scaled to the global batch). Call ``step_update(num_updates=global_step)`` after each step."""
    peak = optimizer.defaults["lr"]
    return CosineLRScheduler(
        optimizer, t_initial=max(optim.epochs * steps_per_epoch, 1), lr_min=optim.min_lr,
        warmup_t=optim.warmup_epochs * steps_per_epoch, warmup_lr_init=peak * optim.warmup_start_factor,
        warmup_prefix=True, t_in_epochs=False)


class Trainer:
    """Owns the pieces of one run; ``run()`` trains to the end (or to a stop request) and returns a summary."""

    def __init__(self, cfg: Config, config_path: str | None = None):
        self.cfg = cfg
        if cfg.train.deterministic:  # bit-exact reruns and resumes, at some speed cost on GPU
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # cudnn.benchmark stays off: it autotunes every conv shape, including the refocus transform of dense convs
        # (a conv with n = C_out*C_in groups over one tiny image), where a bf16 + channels_last run on an H200 did
        # not finish its first step in 4 minutes.
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.out = Path(cfg.train.output)
        self.config_path = config_path
        self._check_batch()

    # --------------------------------------------------------------------------------------------- set-up
    def _check_batch(self) -> None:
        d, o = self.cfg.data, self.cfg.optim
        per_step = self.dist.world_size * o.accum_steps
        if d.batch_size % per_step:
            raise RefconvError(f"data.batch_size={d.batch_size} (global) is not divisible by world_size "
                               f"{self.dist.world_size} x optim.accum_steps {o.accum_steps}; pick a multiple")
        self.micro_batch = d.batch_size // per_step
        self.lr = o.lr * d.batch_size / 256  # linear scaling rule: lr is given for a global batch of 256

    def _build_data(self) -> None:
        d, dist = self.cfg.data, self.dist
        root = Path(d.root)
        train_tf = data_lib.build_transform(d.img_size, True, d.crop_pct, d.scale, d.ratio)
        val_tf = data_lib.build_transform(d.img_size, False, d.crop_pct)
        self.train_set = data_lib.build_dataset(root, d.train_split, train_tf, self.cfg.model.num_classes,
                                                d.on_bad_image)
        self.val_set = data_lib.build_dataset(root, d.val_split, val_tf, self.cfg.model.num_classes, d.on_bad_image)
        if len(self.train_set) < self.micro_batch * dist.world_size:
            raise RefconvError(f"training split has {len(self.train_set)} images, fewer than one global batch "
                               f"({d.batch_size}); lower data.batch_size")
        common = dict(workers=d.workers, distributed=dist.distributed, rank=dist.rank, world_size=dist.world_size,
                      seed=self.cfg.train.seed, pin_memory=dist.device.type == "cuda")
        self.train_loader = data_lib.build_loader(self.train_set, self.micro_batch, train=True, **common)
        eval_batch = (d.eval_batch_size or d.batch_size) // dist.world_size or 1
        self.val_loader = data_lib.build_loader(self.val_set, eval_batch, train=False, **common)
        self.steps_per_epoch = len(self.train_loader) // self.cfg.optim.accum_steps
        if self.cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.cfg.train.max_steps_per_epoch)

    def _build_model(self, resuming: bool) -> None:
        cfg, dev = self.cfg, self.dist.device
        # When resuming, the checkpoint holds every weight: do not fetch pretrained ones (maybe not reachable).
        model, self.report = build_training_model(cfg, pretrained=False if resuming else None)
        if self.report is not None and self.dist.is_main:
            log.info(self.report.summary())
            (self.out / "refocus_report.txt").write_text(self.report.table() + "\n")
        if use_sync_bn(cfg.train.sync_bn, self.dist.distributed, dev):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(dev)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: state dicts and fusing use this one
        o, r = cfg.optim, cfg.refocus
        # Step gains come from the pretrained W_b; a resumed run gets its groups' lr_scale back from the checkpoint.
        groups = refocus_param_groups(model, r.step_norm if r.enabled else "none",
                                      r.weight_decay if r.enabled else None)
        self.optimizer = build_sgd(groups, self.lr, o)
        self.scheduler = build_scheduler(self.optimizer, o, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.amp == "fp16")
        self.transform = None
        if self.report is not None and cfg.refocus.per_step_transform:
            self.transform = PerStepTransform(model, distributed=self.dist.distributed)
            if self.dist.distributed:  # W_r's gradients come from the transform, already averaged over ranks
                PerStepTransform.exclude_from_ddp(model)
                self.transform.broadcast()
        wrapped: nn.Module = model
        if self.dist.distributed:
            wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        if cfg.train.compile:
            wrapped = torch.compile(wrapped)
        self.wrapped = wrapped
        self.settings = StepSettings(device=dev, amp=cfg.train.amp, accum_steps=o.accum_steps,
                                     clip_grad_norm=o.clip_grad_norm, channels_last=cfg.train.channels_last,
                                     label_smoothing=o.label_smoothing,
                                     max_nonfinite_skips=cfg.train.max_nonfinite_skips,
                                     mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))

    # --------------------------------------------------------------------------------------------- state
    def _state(self, epoch: int, step_in_epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,  # completed epochs
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "history": self.history,
            "world_size": self.dist.world_size,
            "rng": all_gather(rng_state()),  # every rank's: model RNG (dropout, drop-path) differs per rank
            "refocus": self.cfg.refocus.enabled,
            "config": config_to_dict(self.cfg),
        }

    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume is False or resume in ("", "none", "false"):
            return None
        if resume in ("auto", True):
            path = self.out / "last.pth"
            return path if path.is_file() else None
        path = Path(resume)
        if not path.is_file():
            raise RefconvError(f"train.resume='{resume}' not found; use auto, false or an existing last.pth")
        return path

    def _load(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise RefconvError(f"resume checkpoint does not fit this model/config ({str(e).splitlines()[0]}); "
                               f"use another train.output or train.resume=false") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        self.start_step = int(ckpt.get("step_in_epoch", 0))
        self.global_step = int(ckpt["global_step"])
        self.best_top1 = float(ckpt["best_top1"])
        self.history = list(ckpt.get("history", []))
        states = ckpt["rng"]
        same_world = ckpt.get("world_size", 1) == self.dist.world_size
        if not same_world and self.dist.is_main:
            log.warning("resuming with %d processes, the checkpoint had %d: data order and RNG continue "
                        "approximately, not exactly", self.dist.world_size, ckpt.get("world_size", 1))
        set_rng_state(states[self.dist.rank] if same_world else states[0])

    def _save(self, name: str, epoch: int, step_in_epoch: int = 0) -> None:
        """Collective (every rank contributes its RNG state); rank 0 writes."""
        state = self._state(epoch, step_in_epoch)
        if self.dist.is_main:
            atomic_save(state, self.out / name)

    def _on_step(self, epoch: int, step_in_epoch: int, global_step: int, flush) -> bool:
        """After every optimizer step: step checkpoints, preemption, fault injection. True = stop now."""
        self.global_step = global_step
        stop = broadcast_flag(self._stop_requested, self.dist.device)
        every = self.cfg.train.checkpoint_every_steps
        due = every > 0 and global_step % every == 0 and step_in_epoch < self.steps_per_epoch
        if stop or due:
            flush()  # never checkpoint weights that a non-finite loss has touched
            self._save("last.pth", epoch, step_in_epoch)
        self.fault.fire(global_step)
        return stop

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the current step, write last.pth, exit cleanly. A second SIGINT aborts at once."""
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame) -> None:
            self._stop_requested = True
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            log.warning("%s received: stopping after the current step", signal.Signals(signum).name)

        self._previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _restore_signal_handlers(self) -> None:
        """Library use (a test, a notebook): the caller's handlers come back when the run ends."""
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)

    # --------------------------------------------------------------------------------------------- run
    def run(self) -> RunResult:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        barrier()
        self._build_data()  # data problems first: they are the most common and the cheapest to find
        resume = self._resume_path()
        ckpt = load_training_checkpoint(resume) if resume else None
        torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
        self._build_model(resuming=ckpt is not None)
        self.start_epoch, self.start_step, self.global_step, self.best_top1, self.history = 0, 0, 0, -1.0, []
        self.fault = Fault.from_env(dist.rank)
        self._install_signal_handlers()
        if ckpt is not None:
            self._load(ckpt)
            if dist.is_main:
                log.info("resumed from %s at epoch %d, step %d of the epoch (global step %d)", resume,
                         self.start_epoch, self.start_step, self.global_step)
        else:
            torch.manual_seed(cfg.train.seed + dist.rank)
        # The lr of the coming step in every group, lr_scale applied: timm's scheduler only sets it at construction
        # when there is a warmup, and W_r's first step must not run at the unscaled lr.
        self.scheduler.step_update(num_updates=self.global_step)
        try:
            result = self._loop()
        finally:
            self._restore_signal_handlers()
        # Process-group teardown only after success: on an error path, with a peer already dead, it can block and
        # leave the other ranks waiting in their collectives until the timeout. Exiting closes the sockets anyway.
        cleanup()
        return result

    def _loop(self) -> RunResult:
        writer = _tensorboard(self.out) if self.dist.is_main else None
        try:
            return self._epochs(writer)
        finally:
            if writer is not None:
                writer.close()

    def _epochs(self, writer) -> RunResult:
        cfg, dist = self.cfg, self.dist
        total_epochs = cfg.optim.warmup_epochs + cfg.optim.epochs
        last_eval = None
        for epoch in range(self.start_epoch, total_epochs):
            start_step = self.start_step if epoch == self.start_epoch else 0
            accum = cfg.optim.accum_steps
            sampler = self.train_loader.sampler
            sampler.set_epoch(epoch)
            sampler.skip_next(start_step * accum * self.micro_batch)  # mid-epoch resume: same remaining samples
            batches = _take(self.train_loader, (self.steps_per_epoch - start_step) * accum)
            self.train_set.reset_bad_images()
            epoch_start_global = self.global_step
            stats = train_one_epoch(
                self.wrapped, batches, self.optimizer, self.scheduler, self.scaler, self.settings, epoch=epoch,
                global_step=self.global_step, world_size=dist.world_size, total_steps=self.steps_per_epoch,
                start_step=start_step, show_progress=dist.is_main, nan_at_step=self.fault.nan_step,
                transform=self.transform,
                on_step=lambda step, gstep, flush, e=epoch: self._on_step(e, step, gstep, flush))
            self.global_step = epoch_start_global + stats.steps
            if stats.stopped:
                log.info("stopped at epoch %d step %d (global step %d); %s holds that step: rerun the same command "
                         "to resume", epoch, start_step + stats.steps, self.global_step, self.out / "last.pth")
                return RunResult(self.out, epoch, self.best_top1, last_eval, history=self.history, stopped=True)
            bad = self.train_set.bad_images
            if bad and dist.is_main:
                log.warning("epoch %d: skipped %d unreadable training images (data.on_bad_image=skip)", epoch + 1,
                            bad)
            done = epoch + 1
            if done % cfg.train.eval_every == 0 or done == total_epochs:
                # The bare module, not DDP: unpadded eval shards can differ by a batch between ranks, and DDP's
                # per-forward buffer broadcast would then hang. Sums are all-reduced once at the end.
                last_eval = evaluate(self.model, self.val_loader, self.settings, show_progress=dist.is_main)
            row = {"epoch": done, "train_loss": stats.loss, "top1": last_eval.top1 if last_eval else math.nan,
                   "top5": last_eval.top5 if last_eval else math.nan,
                   "val_loss": last_eval.loss if last_eval else math.nan, "lr": stats.lr,
                   "img_per_s": stats.images_per_second, "epoch_s": stats.seconds}
            self.history.append(row)
            is_best = last_eval is not None and last_eval.top1 > self.best_top1
            if is_best:
                self.best_top1 = last_eval.top1
            self._save("last.pth", done)
            if is_best:
                self._save("best.pth", done)
            if dist.is_main:
                _report_epoch(row, total_epochs, self.out, writer)
            stop = cfg.train.stop_after_epoch and done >= cfg.train.stop_after_epoch and done < total_epochs
            if broadcast_flag(bool(stop), dist.device):
                log.info("stopping after epoch %d as asked (train.stop_after_epoch); resume with the same command",
                         done)
                return RunResult(self.out, done, self.best_top1, last_eval, history=self.history)
        return self._finish(last_eval)

    def _finish(self, last_eval: EvalResult | None) -> RunResult:
        cfg = self.cfg
        diff = None
        if cfg.refocus.enabled and self.dist.is_main:
            fused = fuse_and_verify(self.model, cfg.model.name, cfg.model.num_classes, cfg.data.img_size,
                                    atol=cfg.train.verify_fuse_atol)
            write_fused(fused, fused_outputs(self.out / "fused.pth"), cfg.model.name, cfg.model.num_classes,
                        config_to_dict(cfg), cfg.data.img_size)
            diff = fused.max_abs_diff
            log.info("wrote %s (original architecture, max_abs_diff=%.3g)", self.out / "fused.pth", diff)
        barrier()
        epochs = cfg.optim.warmup_epochs + cfg.optim.epochs
        return RunResult(self.out, epochs, self.best_top1, last_eval, diff, self.history)


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            break
        yield batch


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tb"))


def _report_epoch(row: dict, total_epochs: int, out: Path, writer) -> None:
    log.info("epoch %d/%d  train_loss %.4f  val top1 %.2f  top5 %.2f  lr %.3g  %.1f img/s  %.1fs",
             row["epoch"], total_epochs, row["train_loss"], row["top1"], row["top5"], row["lr"], row["img_per_s"],
             row["epoch_s"])
    path = out / "summary.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    if writer is not None:
        step = row["epoch"]
        writer.add_scalar("train/loss", row["train_loss"], step)
        writer.add_scalar("train/lr", row["lr"], step)
        writer.add_scalar("train/img_per_s", row["img_per_s"], step)
        if not math.isnan(row["top1"]):
            writer.add_scalar("val/top1", row["top1"], step)
            writer.add_scalar("val/top5", row["top5"], step)
            writer.add_scalar("val/loss", row["val_loss"], step)
        writer.flush()


def configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")


def run_training(cfg: Config, config_path: str | None = None) -> RunResult:
    configure_logging(int(os.environ.get("RANK", "0")))
    t0 = time.time()
    result = Trainer(cfg, config_path).run()
    log.info("done in %.0fs: best top1 %.2f, output %s", time.time() - t0, result.best_top1, result.output)
    return result
