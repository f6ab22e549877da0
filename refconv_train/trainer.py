"""The training run behind ``refconv-train``: any registered method (the config's ``method``), one recipe, one CPU
or many GPUs (torchrun)."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import data as data_lib
from . import methods
from .checkpoint import (
    Progress,
    atomic_save,
    load_training_checkpoint,
    restore_training,
    resume_path,
    rng_state,
    training_checkpoint,
)
from .config import Config, config_to_dict, save_config
from .distributed import DistInfo, all_gather, all_reduce_sum, barrier, broadcast_flag, cleanup, init_distributed
from .engine import EpochStats, EvalResult, LossMeter, StepSettings, evaluate, train_step
from .errors import RefconvError
from .faults import Fault
from .models import build_training_model
from .preemption import StopOnSignal
from .run.factories import build_scheduler, build_sgd, param_groups, to_sync_bn, use_sync_bn
from .run.fusing import fuse_and_verify, fused_outputs, write_fused
from .run_log import RunLog, write_json, write_method_report

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


class Trainer:
    """Owns the pieces of one run; ``run()`` trains to the end (or to a stop request) and returns a summary."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        if cfg.train.deterministic:  # bit-exact reruns and resumes, at some speed cost on GPU
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        # cudnn.benchmark stays off: it autotunes every conv shape, including the refocus transform of dense convs
        # (a conv with n = C_out*C_in groups over one tiny image), where an H200 did not finish its first step.
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.out = Path(cfg.train.output)
        d, o = cfg.data, cfg.optim
        per_step = self.dist.world_size * o.accum_steps
        if d.batch_size % per_step:
            raise RefconvError(f"data.batch_size={d.batch_size} (global) is not divisible by world_size "
                               f"{self.dist.world_size} x optim.accum_steps {o.accum_steps}; pick a multiple")
        self.micro_batch = d.batch_size // per_step
        self.lr = o.lr * d.batch_size / 256  # linear scaling rule: lr is given for a global batch of 256
        self.progress = Progress()

    # --------------------------------------------------------------------------------------------- set-up
    def _build_data(self) -> None:
        d, dist = self.cfg.data, self.dist
        train_tf = data_lib.build_transform(d.img_size, True, d.crop_pct, d.scale, d.ratio)
        val_tf = data_lib.build_transform(d.img_size, False, d.crop_pct)
        classes = self.cfg.model.num_classes
        self.train_set = data_lib.build_dataset(d.root, d.train_split, train_tf, classes, d.on_bad_image)
        self.val_set = data_lib.build_dataset(d.root, d.val_split, val_tf, classes, d.on_bad_image)
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
        cfg, dev, t = self.cfg, self.dist.device, self.cfg.train
        # When resuming, the checkpoint holds every weight: do not fetch pretrained ones (maybe not reachable).
        model, report = build_training_model(cfg, pretrained=False if resuming else None)
        self.method = methods.get(cfg.method)
        self.report = write_method_report(self.out, model, report, cfg.method) if self.dist.is_main else None
        if use_sync_bn(t.sync_bn, self.dist.distributed, dev):
            model = to_sync_bn(model)
        model.to(dev)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: state dicts and fusing use this one
        # Step gains come from the pretrained W_b; a resumed run gets its groups' lr_scale back from the checkpoint.
        self.optimizer = build_sgd(param_groups(model, cfg), self.lr, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=t.amp == "fp16")
        # The method's per-step hook (RefConv: W_t once per optimizer step), set up before DDP wraps the model.
        self.transform = self.method.per_step(model, cfg.method_options, self.dist.distributed)
        wrapped: nn.Module = model
        if self.dist.distributed:
            wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.wrapped = torch.compile(wrapped) if t.compile else wrapped
        self.settings = StepSettings(device=dev, amp=t.amp, clip_grad_norm=cfg.optim.clip_grad_norm,
                                     channels_last=t.channels_last, label_smoothing=cfg.optim.label_smoothing,
                                     mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))

    def _save(self, name: str) -> None:
        """Collective (every rank contributes its RNG state); rank 0 writes."""
        state = training_checkpoint(self.model, self.optimizer, self.scheduler, self.scaler, self.progress,
                                    all_gather(rng_state()), config_to_dict(self.cfg))
        if self.dist.is_main:
            atomic_save(state, self.out / name)

    # --------------------------------------------------------------------------------------------- run
    def run(self) -> RunResult:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        barrier()
        self._build_data()  # data problems first: they are the most common and the cheapest to find
        resume = resume_path(cfg.train.resume, self.out)
        ckpt = load_training_checkpoint(resume) if resume else None
        torch.manual_seed(cfg.train.seed)  # same init on every rank; DDP also broadcasts rank 0's weights
        self._build_model(resuming=ckpt is not None)
        self.fault = Fault.from_env(dist.rank)
        self.fault.install(self.model, lambda: self.progress.global_step)
        if ckpt is not None:
            self.progress, same_world = restore_training(ckpt, self.model, self.optimizer, self.scheduler,
                                                         self.scaler, dist.rank, dist.world_size)
            if dist.is_main:
                p = self.progress
                if not same_world:
                    log.warning("resuming with %d processes, the checkpoint had %d: data order and RNG continue "
                                "approximately, not exactly", dist.world_size, ckpt.get("world_size", 1))
                log.info("resumed from %s at epoch %d, step %d of the epoch (global step %d)", resume, p.epoch,
                         p.step_in_epoch, p.global_step)
        else:
            torch.manual_seed(cfg.train.seed + dist.rank)
            self._evaluate_moved_start()
        # Each group's lr for the coming step with its lr_scale: timm sets it at construction only with a warmup.
        self.scheduler.step_update(num_updates=self.progress.global_step)
        run_log = RunLog(self.out, cfg.optim.warmup_epochs + cfg.optim.epochs) if dist.is_main else None
        try:
            with StopOnSignal() as self.signals:
                result = self._epochs(run_log)
        finally:
            if run_log is not None:
                run_log.close()
        # Process-group teardown only after success: on an error path, with a peer already dead, it can block and
        # leave the other ranks waiting in their collectives until the timeout. Exiting closes the sockets anyway.
        cleanup()
        return result

    def _evaluate_moved_start(self) -> None:
        """A start that moved (RefConv's xavier / kaiming W_r, CWN's and OWN's projections): its cost before the first
        step (the report holds the output difference, this the accuracy), measured on a forked torch RNG (the loader
        seeds its workers from it): the run trains the same with or without the measurement."""
        moved = broadcast_flag(bool(self.report and (self.report.get("start_max_abs_diff") or 0) > 0),
                               self.dist.device)
        if not moved:
            return
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            start = evaluate(self.model, self.val_loader, self.settings, show_progress=self.dist.is_main)
        if self.dist.is_main:
            log.info("%s moved the start (max |output change| %.3g): before training top1 %.2f, loss %.4f",
                     self.cfg.method, self.report["start_max_abs_diff"], start.top1, start.loss)
            self.report.update(start_top1=start.top1, start_loss=start.loss)
            write_json(self.out / "reparam_report.json", self.report)

    def _epochs(self, run_log: RunLog | None) -> RunResult:
        cfg, p = self.cfg, self.progress
        total_epochs = cfg.optim.warmup_epochs + cfg.optim.epochs
        last_eval = None
        for epoch in range(p.epoch, total_epochs):
            stats = self._train_epoch(epoch)
            if stats.stopped:
                log.info("stopped at epoch %d step %d (global step %d); %s holds that step: rerun the same command "
                         "to resume", epoch, p.step_in_epoch, p.global_step, self.out / "last.pth")
                return RunResult(self.out, epoch, p.best_top1, last_eval, history=p.history, stopped=True)
            bad = self.train_set.bad_images
            if bad and self.dist.is_main:
                log.warning("epoch %d: skipped %d unreadable training images (data.on_bad_image=skip)", epoch + 1,
                            bad)
            done = epoch + 1
            if done % cfg.train.eval_every == 0 or done == total_epochs:
                # The bare module, not DDP: unpadded eval shards can differ by a batch between ranks, and DDP's
                # per-forward buffer broadcast would then hang. Sums are all-reduced once at the end.
                last_eval = evaluate(self.model, self.val_loader, self.settings, show_progress=self.dist.is_main)
            e = last_eval
            row = {"epoch": done, "train_loss": stats.loss, "top1": e.top1 if e else math.nan,
                   "top5": e.top5 if e else math.nan, "val_loss": e.loss if e else math.nan, "lr": stats.lr,
                   "img_per_s": stats.images_per_second, "epoch_s": stats.seconds}
            p.history.append(row)
            p.epoch, p.step_in_epoch = done, 0
            is_best = e is not None and e.top1 > p.best_top1
            if is_best:
                p.best_top1 = e.top1
            self._save("last.pth")
            if is_best:
                self._save("best.pth")
            if run_log is not None:
                run_log.epoch(row)
            stop = cfg.train.stop_after_epoch and done >= cfg.train.stop_after_epoch and done < total_epochs
            if broadcast_flag(bool(stop), self.dist.device):
                log.info("stopping after epoch %d as asked (train.stop_after_epoch); resume with the same command",
                         done)
                return RunResult(self.out, done, p.best_top1, last_eval, history=p.history)
        return self._finish(last_eval)

    def _train_epoch(self, epoch: int) -> EpochStats:
        """The training loop: one optimizer step per ``accum_steps`` micro-batches; after each, the LR schedule, and
        on one cadence (every step on CPU, where it is free; every ``train.log_every`` on CUDA, and before every
        checkpoint) the loss, the finiteness flags and the stop flag are read: one host sync."""
        cfg, dist, p = self.cfg, self.dist, self.progress
        accum, max_skips, every = cfg.optim.accum_steps, cfg.train.max_nonfinite_skips, cfg.train.checkpoint_every_steps
        sampler = self.train_loader.sampler
        sampler.set_epoch(epoch)
        sampler.skip_next(p.step_in_epoch * accum * self.micro_batch)  # mid-epoch resume: same remaining samples
        self.train_set.reset_bad_images()
        batches = iter(self.train_loader)
        meter, images, skips, stop = LossMeter(dist.device), 0, 0, False
        lr = self.optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        with tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {epoch}", dynamic_ncols=True,
                  disable=not dist.is_main, leave=False) as bar:  # closed on errors too: the message gets its line
            while p.step_in_epoch < self.steps_per_epoch and not stop:
                micro = list(itertools.islice(batches, accum))
                if len(micro) < accum:
                    break
                result = train_step(self.wrapped, micro, self.optimizer, self.scaler, self.settings, self.transform,
                                    skip_nonfinite=max_skips > 0)
                images += result.images
                if not result.stepped:
                    skips += 1
                    if skips > max_skips:
                        raise RefconvError(f"{skips} non-finite steps in epoch {epoch}, more than "
                                           f"train.max_nonfinite_skips={max_skips}: lower optim.lr or use bf16")
                    continue
                meter.add(p.step_in_epoch, result)  # 0-based, as the epoch, in error messages
                p.step_in_epoch += 1
                p.global_step += 1
                self.scheduler.step_update(num_updates=p.global_step)
                lr = self.optimizer.param_groups[0]["lr"]
                checkpoint = every > 0 and p.global_step % every == 0 and p.step_in_epoch < self.steps_per_epoch
                if checkpoint or dist.device.type != "cuda" or p.step_in_epoch % cfg.train.log_every == 0:
                    loss = meter.read(epoch, lr)  # raises before a checkpoint could hold a non-finite update
                    stop = broadcast_flag(self.signals.requested, dist.device)
                    rate = images * dist.world_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")
                bar.update(1)
                if stop or checkpoint:
                    self._save("last.pth")
                self.fault.fire(p.global_step)
            meter.read(epoch, lr)
        if dist.device.type == "cuda":
            torch.cuda.synchronize(dist.device)
        seconds = time.perf_counter() - start
        total, steps, images = all_reduce_sum([meter.total.item(), meter.steps, images], dist.device)
        return EpochStats(loss=total / max(steps, 1), images=int(images), seconds=seconds, lr=lr, stopped=stop)

    def _finish(self, last_eval: EvalResult | None) -> RunResult:
        cfg, p = self.cfg, self.progress
        diff = None
        if self.method.convs(self.model) and self.dist.is_main:
            fused = fuse_and_verify(self.model, cfg.model.name, cfg.model.num_classes, cfg.data.img_size,
                                    atol=cfg.train.verify_fuse_atol, model_kwargs=cfg.model.kwargs)
            write_fused(fused, fused_outputs(self.out / "fused.pth"), cfg.model.name, cfg.model.num_classes,
                        config_to_dict(cfg), cfg.data.img_size)
            diff = fused.max_abs_diff
            log.info("wrote %s (original architecture, max_abs_diff=%.3g)", self.out / "fused.pth", diff)
        barrier()
        return RunResult(self.out, p.epoch, p.best_top1, last_eval, diff, p.history)


def configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")


def run_training(cfg: Config) -> RunResult:
    configure_logging(int(os.environ.get("RANK", "0")))
    t0 = time.time()
    result = Trainer(cfg).run()
    log.info("done in %.0fs: best top1 %.2f, output %s", time.time() - t0, result.best_top1, result.output)
    return result
