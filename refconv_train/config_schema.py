"""The config's schema (docs/design.md section 3): the sections as typed dataclasses with their defaults, the
top-level keys (``method``, ``plugins``), each method's section (its options dataclass, from the registry) and the
value checks. config.py reads YAML and overrides into it."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import methods

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ModelConfig:
    name: str = "mobilenetv2_100"  # timm name, or torchvision:<name>
    num_classes: int = 1000
    pretrained: bool | str = True  # true = library weights, false = random, or a path to a checkpoint/state_dict
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm.create_model


@dataclass
class DataConfig:
    root: str = "imagenet/"  # holds <train_split>/ and <val_split>/ as ImageFolder trees
    img_size: int = 224
    batch_size: int = 256  # global, over all processes
    workers: int = 8
    train_split: str = "train"
    val_split: str = "val"
    crop_pct: float = 0.875
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized crop: area fraction (timm's)
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # random-resized crop: aspect ratio range
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    on_bad_image: Literal["error", "skip"] = "error"
    eval_batch_size: int = 0  # 0 = same as batch_size


@dataclass
class OptimConfig:
    lr: float = 0.1  # for a global batch of 256; scaled linearly with batch_size
    momentum: float = 0.9
    weight_decay: float = 4.0e-5
    epochs: int = 100  # cosine annealing epochs, to min_lr
    warmup_epochs: int = 5  # linear warmup epochs run BEFORE the cosine ones (the authors run 5 + 100)
    min_lr: float = 5.0e-7
    nesterov: bool = False
    label_smoothing: float = 0.0
    warmup_start_factor: float = 5.0e-6  # the authors' LinearLR start factor
    clip_grad_norm: float = 0.0  # 0 = off
    accum_steps: int = 1


@dataclass
class TrainConfig:
    output: str = "runs/<name>"  # <name> = config file stem, or model.name without a file
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 42
    resume: bool | str = "auto"  # auto = continue from output/last.pth if present; false = fresh; or a path
    checkpoint_every_steps: int = 0  # > 0: also write last.pth every N optimizer steps, mid-epoch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    eval_every: int = 1  # epochs
    log_every: int = 10  # optimizer steps between reads of the loss and the stop flag on CUDA (CPU: every step)
    max_nonfinite_skips: int = 0
    deterministic: bool = False
    max_steps_per_epoch: int = 0  # 0 = whole epoch; for smoke tests
    stop_after_epoch: int = 0  # > 0: stop cleanly after this epoch (time-boxed jobs); resume continues
    verify_fuse_atol: float = 1.0e-4


@dataclass
class Config:
    method: str = "refconv"  # none | refconv | acb | repvgg | dbb | orepa | wn | cwn | own | a registered name
    plugins: list[str] = field(default_factory=list)  # modules imported first: they register their own methods
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # method name -> its options dataclass: the config section of that name (`dbb: {branch_scale: 1}`)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def method_options(self) -> Any:
        """The chosen method's options (its defaults when the config has no section for it)."""
        return self.options[self.method] if self.method in self.options else methods.get(self.method).options()


TOP_KEYS: dict[str, Any] = {"method": str, "plugins": list[str]}
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
                             if f.name not in (*TOP_KEYS, "options")}
KEYS: dict[str, Any] = {f"{s}.{k}": t for s, cls in SECTIONS.items() for k, t in typing.get_type_hints(cls).items()}


def option_types(method: str) -> dict[str, Any]:
    """Key -> type annotation of a method's config section (its options dataclass's fields)."""
    cls = methods.get(method).options
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

_Check = tuple[Callable[[Any], bool], str]
_POS: _Check = (lambda v: v > 0, "be > 0")
_NONNEG: _Check = (lambda v: v >= 0, "be >= 0")
_AT_LEAST_1: _Check = (lambda v: v >= 1, "be >= 1")
_FRACTION: _Check = (lambda v: 0 <= v < 1, "be in [0, 1)")
_RGB: _Check = (lambda v: len(v) == 3, "hold 3 values, one per RGB channel")
CHECKS: dict[str, _Check] = {
    "model.name": (bool, "not be empty"),
    "model.num_classes": _POS,
    "data.img_size": _POS, "data.batch_size": _POS, "data.workers": _NONNEG, "data.eval_batch_size": _NONNEG,
    "data.crop_pct": (lambda v: 0 < v <= 1, "be in (0, 1]"), "data.mean": _RGB,
    "data.scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "be [min, max] with 0 < min <= max <= 1"),
    "data.ratio": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "be [min, max] with 0 < min <= max"),
    "data.std": (lambda v: len(v) == 3 and min(v) > 0, "hold 3 positive values, one per RGB channel"),
    "optim.lr": _POS, "optim.min_lr": _NONNEG, "optim.momentum": _FRACTION, "optim.weight_decay": _NONNEG,
    "optim.epochs": _NONNEG, "optim.warmup_epochs": _NONNEG, "optim.label_smoothing": _FRACTION,
    "optim.warmup_start_factor": (lambda v: 0 < v <= 1, "be in (0, 1]"), "optim.clip_grad_norm": _NONNEG,
    "optim.accum_steps": _AT_LEAST_1,
    "train.output": (bool, "not be empty"), "train.seed": _NONNEG, "train.checkpoint_every_steps": _NONNEG,
    "train.eval_every": _AT_LEAST_1, "train.log_every": _AT_LEAST_1, "train.max_nonfinite_skips": _NONNEG,
    "train.max_steps_per_epoch": _NONNEG, "train.stop_after_epoch": _NONNEG, "train.verify_fuse_atol": _POS,
}
