"""Checkpoints: atomic writes, weights-only reads, RNG state, the training and fused formats (DESIGN 4)."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import RefconvError
from .models import CHECKPOINT_FORMAT, safe_torch_load
from .refocus import is_refocus_state_dict

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
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RefconvError(f"cannot write '{path}' ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------- RNG
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
    return ckpt


def describe(obj: Any) -> str:
    """What a loaded checkpoint is, in words, for error messages."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if obj.get("format") == FUSED_FORMAT:
        return "a fused checkpoint (already the original architecture)"
    if obj.get("format") == CHECKPOINT_FORMAT:
        kind = "RefConv" if is_refocus_state_dict(obj.get("model", {})) else "baseline"
        return f"a {kind} training checkpoint"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a plain state dict of {len(obj)} tensors"
    keys = ", ".join(list(map(str, obj))[:5])
    return f"a dict with keys {keys}"


def fused_checkpoint(model: nn.Module, arch: str, num_classes: int, config: dict, max_abs_diff: float) -> dict:
    """The deployable format: the original architecture's state dict plus provenance. ``state_dict`` is the key that
    timm's ``load_checkpoint`` (``create_model(checkpoint_path=...)``, validate.py) reads."""
    return {
        "format": FUSED_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "arch": arch,
        "num_classes": num_classes,
        "config": config,
        "max_abs_diff": float(max_abs_diff),
    }
