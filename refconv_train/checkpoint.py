"""Checkpoint formats and I/O: the training and fused formats (docs/design.md section 4), atomic writes,
weights-only reads, the raw state dict inside any file we accept, and the training checkpoint's layout. Rebuilding
and fusing a training checkpoint's model lives above this module (models/build.py, run/restore.py)."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import methods
from .errors import RefconvError
from .methods.legacy import translate_legacy
from .state_dicts import read_safetensors, safetensors_header, strip_prefixes, with_versions

CHECKPOINT_FORMAT = "refconv-train/1"
FUSED_FORMAT = "refconv-train/fused/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a crash or a full disk never
    leaves a half-written file at ``path``, and the previous file stays intact until the new one is complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RefconvError(f"cannot write checkpoint '{path}' ({e.strerror or e}); fix the folder's space or "
                           f"permissions (the previous checkpoint is intact)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RefconvError(f"cannot write checkpoint '{path}' ({e.strerror or e}); fix the folder's space or "
                               f"permissions (the previous checkpoint is intact)") from None
        raise


def atomic_save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """The bare state dict as ``.safetensors``, its module versions in the header (:mod:`.state_dicts`)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp),
                  metadata=safetensors_header(state_dict))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RefconvError(f"cannot write '{path}' ({e.strerror or e})") from None


def cpu_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's state dict on CPU, with the module versions (``_metadata``) that ``load_state_dict`` hands to each
    module's loader: torchvision's MNASNet refuses a state dict without its version (a plain dict drops it)."""
    state = unwrap(model).state_dict()
    return with_versions(OrderedDict((k, v.detach().cpu()) for k, v in state.items()), state)


# ----------------------------------------------------------------------------------------------- reading
def read_weights_file(path: str | os.PathLike) -> Any:
    """What a weights file holds: a ``.safetensors`` state dict, or the weights-only-loaded object of any other
    file (a training checkpoint is returned whole: rebuilding its model is the caller's job)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return safe_torch_load(path)
    if not path.is_file():
        raise RefconvError(f"pretrained weights file '{path}' not found")
    return read_safetensors(path)  # with the module versions its header keeps (state_dicts.py)


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def checkpoint_method(obj: Any) -> str:
    """The method a training checkpoint was trained with: recorded by name (``method``), or, in a checkpoint
    written before that, as its stored config says (``refocus.enabled`` / ``reparam.method``)."""
    if isinstance(obj.get("method"), str):
        return obj["method"]
    return str(translate_legacy(obj.get("config") or {}).get("method", "refconv"))


def state_dict_of(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file (training checkpoint: its ``model``; timm / torchvision references /
    EMA layouts; a ``.safetensors`` state dict), with DDP and torch.compile prefixes stripped and the module versions
    kept."""
    return strip_prefixes(_extract_state_dict(obj, Path(path)))


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with one-line errors; pickled code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise RefconvError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if not found:
            raise RefconvError(f"checkpoint '{path}' is not a readable PyTorch file (corrupt or truncated?)") from None
        raise RefconvError(f"checkpoint '{path}' holds pickled objects or code ({found.group(1)}) that weights-only "
                           f"loading refuses; re-save it as a plain state dict if you trust it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise RefconvError(f"checkpoint '{path}' is not a readable PyTorch file ({_first_line(e)[:160]})") from None


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        if obj.get("format") == CHECKPOINT_FORMAT:
            obj = obj["model"]
        else:
            for key in ("state_dict", "model", "state_dict_ema", "model_ema"):  # fused/timm, torchvision refs, EMA
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return with_versions(obj, obj)
    raise RefconvError(f"'{path}' holds no model state dict (expected a state dict or a checkpoint with "
                       f"'state_dict' or 'model')")


# ----------------------------------------------------------------------------------------------- training checkpoints
@dataclass
class Progress:
    """Where a run stands: what a training checkpoint holds besides the model and optimizer states."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_top1: float = -1.0
    history: list[dict] = field(default_factory=list)  # one summary row per epoch


def training_checkpoint(model: nn.Module, optimizer, scheduler, scaler, progress: Progress, rng: list,
                        config: dict) -> dict[str, Any]:
    """The ``refconv-train/1`` dict: every state a bit-identical resume needs, as weights-only-loadable data.
    ``rng``: every rank's :func:`rng_state` (model RNG such as dropout differs per rank)."""
    state = cpu_state_dict(model)
    return {"format": CHECKPOINT_FORMAT, "model": state, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch, "global_step": progress.global_step,
            "best_top1": progress.best_top1, "history": progress.history, "world_size": len(rng), "rng": rng,
            "method": config["method"], "method_layout": methods.get(config["method"]).layout, "config": config}


def resume_path(resume: bool | str, output: Path) -> Path | None:
    """The checkpoint a run continues from: ``train.resume`` is ``auto`` (``output/last.pth`` if it exists),
    ``false``, or a path."""
    if resume is False or resume in ("", "none", "false"):
        return None
    if resume in ("auto", True):
        path = output / "last.pth"
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise RefconvError(f"train.resume='{resume}' not found; use auto, false or an existing last.pth")
    return path


def restore_training(ckpt: dict[str, Any], model: nn.Module, optimizer, scheduler, scaler, rank: int,
                     world_size: int) -> tuple[Progress, bool]:
    """Load a training checkpoint into a run's objects (the model strictly; the optimizer with each group's
    ``lr_scale``) and set this rank's RNG state. Returns the progress, and whether the checkpoint has this world
    size (if not, rank 0's RNG state is used and data order continues only approximately)."""
    try:
        model.load_state_dict(with_versions(ckpt["model"], model), strict=True)
    except RuntimeError as e:
        raise RefconvError(f"resume checkpoint does not fit this model/config ({str(e).splitlines()[0]}); "
                           f"use another train.output or train.resume=false") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    same_world = ckpt.get("world_size", 1) == world_size
    set_rng_state(ckpt["rng"][rank] if same_world else ckpt["rng"][0])
    progress = Progress(int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0)), int(ckpt["global_step"]),
                        float(ckpt["best_top1"]), list(ckpt.get("history", [])))
    return progress, same_world


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches, as weights-only-loadable data (tensors, ints, lists)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


# ----------------------------------------------------------------------------------------------- formats
def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / torch.compile wrappers (their state-dict keys would carry prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A ``refconv-train/1`` training checkpoint, or a one-line error saying what the file is instead."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RefconvError(f"'{path}' is not a refconv-train training checkpoint (it holds {describe(ckpt)})")
    check_method_layout(ckpt, path)
    return ckpt


def check_method_layout(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """A training checkpoint's method layout (``Method.layout``; 1 when not recorded) must be the one this code
    trains: the same state dict under another layout loads strictly and computes another function."""
    method = methods.get(checkpoint_method(ckpt))
    stored = ckpt.get("method_layout", 1)
    if stored != method.layout:
        raise RefconvError(f"'{path}' is a {method.title or method.name} training checkpoint of layout {stored}; this "
                           f"refconv-train trains and fuses {method.name} as layout {method.layout}, which computes "
                           f"another function from the same weights (docs/design.md section 6): deploy the "
                           f"fused.pth its run wrote, or start a new run from it (model.pretrained=<fused.pth>)")


def describe(obj: Any) -> str:
    """What a loaded checkpoint is, in words, for error messages (a training checkpoint names its method)."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if obj.get("format") == FUSED_FORMAT:
        return "a fused checkpoint (already the original architecture)"
    if obj.get("format") == CHECKPOINT_FORMAT:
        name = checkpoint_method(obj)
        try:
            name = methods.get(name).title  # RefConv, baseline, DBB, ...
        except RefconvError:  # a user's method whose module is not imported here
            pass
        return f"a {name} training checkpoint"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a plain state dict of {len(obj)} tensors"
    keys = ", ".join(list(map(str, obj))[:5])
    return f"a dict with keys {keys}"


def fused_checkpoint(model: nn.Module, arch: str, num_classes: int, config: dict, max_abs_diff: float,
                     output_scale: float = 1.0) -> dict:
    """The deployable format: the original architecture's state dict plus provenance. ``state_dict`` is the key that
    timm's ``load_checkpoint`` (``create_model(checkpoint_path=...)``, validate.py) reads."""
    return {
        "format": FUSED_FORMAT,
        "state_dict": cpu_state_dict(model),
        "arch": arch,
        "num_classes": num_classes,
        "config": config,
        "max_abs_diff": float(max_abs_diff),
        "output_scale": float(output_scale),  # max |output| of the check (at least 1): the tolerance's unit
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
