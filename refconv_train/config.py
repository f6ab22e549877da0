"""YAML file + dotted command-line overrides -> one validated, typed :class:`Config` (docs/design.md section 3).

Every key has a type annotation; values are checked against it as they are set, so an error names the exact key
(file or override) and says how to fix it. Checkpoints store :func:`config_to_dict` (plain data, loadable with
``torch.load(weights_only=True)``) and :func:`config_from_dict` rebuilds a config from it with the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config_types import Dumper, Loader, Mismatch, coerce, describe
from .errors import RefconvError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ModelConfig:
    name: str = "mobilenetv2_100"  # timm name, or torchvision:<name>
    num_classes: int = 1000
    pretrained: bool | str = True  # true = library weights, false = random, or a path to a checkpoint/state_dict
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm.create_model


@dataclass
class RefocusConfig:
    enabled: bool = True  # false = plain baseline training with the same recipe
    map_k: int = 3
    init: Literal["xavier", "zeros", "kaiming"] = "xavier"
    exclude: list[str] = field(default_factory=list)  # regexes over module names
    base: Literal["frozen", "trainable"] = "frozen"  # ablation (paper Fig. 5)
    base_init: Literal["pretrained", "random"] = "pretrained"  # ablation (paper Fig. 5)
    # W_t once per optimizer step and dL/dW_t (not dL/dW_r) all-reduced under DDP (refconv_train.per_step);
    # false = plain autograd through the transform on every micro-batch.
    per_step_transform: bool = True
    # none (paper) | layer: each W_r's lr divided by its layer's step gain lambda (docs/design.md section 1)
    step_norm: Literal["none", "layer"] = "none"
    weight_decay: float | None = None  # for W_r only (pulls W_t towards W_b); null = optim.weight_decay


@dataclass
class ReparamConfig:
    """The paper's comparison methods (refconv_train.reparam, docs/design.md section 6); RefConv stays refocus.*."""

    method: Literal["none", "acb", "repvgg", "dbb", "orepa", "wn", "cwn", "own"] = "none"
    exclude: list[str] = field(default_factory=list)  # regexes over module names
    branch_scale: float = 0.0  # acb/repvgg/dbb: initial scale of each new branch's last BN; 0 = exact start
    own_group: int = 0  # own: output filters per whitening group; 0 = fan-in - 1 (the most)


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
    model: ModelConfig = field(default_factory=ModelConfig)
    refocus: RefocusConfig = field(default_factory=RefocusConfig)
    reparam: ReparamConfig = field(default_factory=ReparamConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
KEYS: dict[str, Any] = {f"{s}.{k}": t for s, cls in SECTIONS.items() for k, t in typing.get_type_hints(cls).items()}

_Check = tuple[Callable[[Any], bool], str]
_POS: _Check = (lambda v: v > 0, "be > 0")
_NONNEG: _Check = (lambda v: v >= 0, "be >= 0")
_AT_LEAST_1: _Check = (lambda v: v >= 1, "be >= 1")
_FRACTION: _Check = (lambda v: 0 <= v < 1, "be in [0, 1)")
_RGB: _Check = (lambda v: len(v) == 3, "hold 3 values, one per RGB channel")
CHECKS: dict[str, _Check] = {
    "model.name": (bool, "not be empty"),
    "model.num_classes": _POS,
    "refocus.map_k": (lambda v: v > 0 and v % 2 == 1, "be an odd positive integer"),
    "refocus.weight_decay": (lambda v: v is None or v >= 0, "be >= 0 or null"),
    "reparam.branch_scale": _NONNEG, "reparam.own_group": _NONNEG,
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


def _unknown(key: str) -> RefconvError:
    """Error for a key that does not exist, suggesting the closest valid dotted key (also matched by its leaf)."""
    close = difflib.get_close_matches(key, KEYS, n=1)
    if not close:
        leaves = {k.rsplit(".", 1)[1]: k for k in KEYS}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=1)]
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid sections: {', '.join(SECTIONS)}"
    return RefconvError(f"unknown config key '{key}'{hint}")


def _key_type(key: str) -> Any:
    """Type annotation of the field that dotted ``key`` sets (``model.kwargs.<name>`` sets ``model.kwargs``)."""
    section, _, rest = key.partition(".")
    name, _, sub = rest.partition(".")
    tp = KEYS.get(f"{section}.{name}")
    if tp is None or (sub and typing.get_origin(tp) is not dict):
        raise _unknown(key)
    return tp


def _set(cfg: Config, key: str, value: Any) -> None:
    """Set dotted ``key`` (``section.key``, or ``model.kwargs.<name>``) to ``value``, checking its type."""
    tp = _key_type(key)
    section, name, *sub = key.split(".", 2)
    if sub:
        value = {**getattr(getattr(cfg, section), name), sub[0]: value}
    try:
        value = coerce(value, tp)
    except Mismatch:
        if typing.get_origin(tp) is Literal:
            allowed = ", ".join(typing.get_args(tp))
            raise RefconvError(f"config key '{key}' must be one of {allowed}; got {value!r}") from None
        got = f"{value!r} ({type(value).__name__})"
        raise RefconvError(f"config key '{key}' expects {describe(tp)}, got {got}") from None
    setattr(getattr(cfg, section), name, value)


def _apply_mapping(cfg: Config, data: Any, where: str) -> None:
    """Apply a nested ``{section: {key: value}}`` mapping (YAML file or stored dict); missing keys keep defaults."""
    if not isinstance(data, Mapping):
        raise RefconvError(f"{where} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    for section, keys in data.items():
        if section not in SECTIONS and isinstance(keys, Mapping):
            close = difflib.get_close_matches(str(section), SECTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid sections: {', '.join(SECTIONS)}"
            raise RefconvError(f"unknown config section '{section}'{hint}")
        if section not in SECTIONS:
            raise _unknown(str(section))
        if keys is not None and not isinstance(keys, Mapping):
            raise RefconvError(f"config section '{section}' in {where} must be a mapping of keys, got {keys!r}")
        for key, value in (keys or {}).items():
            _set(cfg, f"{section}.{key}", value)


def _finish(cfg: Config, name: str) -> Config:
    """Substitute ``<name>`` in ``train.output`` and check value ranges (after all keys are set)."""
    cfg.train.output = cfg.train.output.replace("<name>", re.sub(r"[/:\\]", "_", name))
    for key, (ok, text) in CHECKS.items():
        section, attr = key.split(".")
        value = getattr(getattr(cfg, section), attr)
        if not ok(value):
            raise RefconvError(f"config key '{key}' must {text}, got {value!r}")
    _check_method(cfg)
    return cfg


# Options that only one family of methods reads: set for another method, they would be silently ignored.
_METHOD_OPTIONS = {"branch_scale": ("acb", "repvgg", "dbb", "orepa"), "own_group": ("own",)}


def _check_method(cfg: Config) -> None:
    """One re-parameterization per run, and no option that the chosen method would ignore."""
    method = cfg.reparam.method
    if method != "none" and cfg.refocus.enabled:
        raise RefconvError(f"reparam.method={method} and refocus.enabled=true ask for two re-parameterizations: set "
                           f"refocus.enabled=false to train {method}, or reparam.method=none to train RefConv")
    defaults = ReparamConfig()
    for key, methods in _METHOD_OPTIONS.items():
        if getattr(cfg.reparam, key) != getattr(defaults, key) and method not in methods:
            raise RefconvError(f"config key 'reparam.{key}' applies to reparam.method {' / '.join(methods)} only, "
                               f"not {method}: remove it or pick one of those methods")


def parse_override(item: str) -> tuple[str, Any]:
    """``'optim.lr=0.05'`` -> ``('optim.lr', 0.05)``; the value parses as a YAML scalar or flow value."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or " " in key:
        raise RefconvError(f"malformed override {item!r}: expected the form section.key=value, e.g. optim.lr=0.05")
    tp = _key_type(key)
    if tp is str or typing.get_origin(tp) is Literal:
        return key, text  # a name or path stays as typed, even if YAML would read it as a number or bool
    try:
        return key, yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise RefconvError(f"override {item!r}: value is not valid YAML ({getattr(e, 'problem', e)})") from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``section.key=value``), validated."""
    cfg = Config()
    overrides = [overrides] if isinstance(overrides, str) else overrides
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RefconvError(f"config file '{os.fspath(path)}' not found") from None
        except OSError as e:
            raise RefconvError(f"config file '{os.fspath(path)}' cannot be read: {e.strerror}") from None
        try:
            data = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise RefconvError(f"config file '{os.fspath(path)}'{line}: invalid YAML ({problem})") from None
        _apply_mapping(cfg, {} if data is None else data, f"config file '{os.fspath(path)}'")
    for item in overrides:
        _set(cfg, *parse_override(item))
    return check_refocus_base(_finish(cfg, Path(path).stem if path is not None else cfg.model.name))


def check_refocus_base(cfg: Config) -> Config:
    """RefConv refocuses trained kernels: ``refocus.enabled`` with ``model.pretrained=false`` refocuses a random
    init, which the paper's Fig. 5 shows hurts; only ``refocus.base_init=random`` (that ablation) asks for it.
    Checked on the configs runs start from, not on those stored in checkpoints (their weights are in the file)."""
    if cfg.refocus.enabled and cfg.model.pretrained is False and cfg.refocus.base_init == "pretrained":
        raise RefconvError("refocus.enabled=true with model.pretrained=false would refocus randomly initialised "
                           "kernels: load the baseline's weights with model.pretrained=<checkpoint or true>, or ask "
                           "for the paper's ablation with refocus.base_init=random")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (str/int/float/bool/None/list/dict only): safe for YAML and ``weights_only`` checkpoints."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a config from :func:`config_to_dict` output (e.g. stored in a checkpoint); missing keys get defaults."""
    cfg = Config()
    _apply_mapping(cfg, data, "stored config")
    return _finish(cfg, cfg.model.name)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (parent directories created); :func:`load_config` reads it back equal."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=Dumper, sort_keys=False, default_flow_style=False)
    Path(path).write_text(text, encoding="utf-8")
