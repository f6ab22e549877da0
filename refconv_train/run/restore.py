"""Rebuild a ready-to-run model from any checkpoint we know: fused, a training checkpoint of any method (baseline
included), a plain state dict."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .. import methods
from ..checkpoint import FUSED_FORMAT, describe, is_training_checkpoint, safe_torch_load
from ..config import Config, config_from_dict
from ..errors import RefconvError
from ..models import build_model, load_state_dict_checked, read_state_dict, rebuild_training_model
from ..state_dicts import with_versions


@dataclass
class Restored:
    model: nn.Module
    kind: str  # fused | state_dict | library | the method's kind (refocus, baseline, acb, ...: Method.kind)
    arch: str
    num_classes: int
    config: Config | None  # the training config, when the checkpoint carries one


def restore_reparam_training(path: str | os.PathLike) -> Restored:
    """A re-parameterized training checkpoint (any method but none) as the model it was saved from, strictly
    loaded; anything else is a one-line error."""
    ckpt = safe_torch_load(path)
    restored = _restore_training(ckpt, path) if is_training_checkpoint(ckpt) else None
    if restored is None or not methods.held_methods(restored.model):
        raise RefconvError(f"'{path}' is not a re-parameterized training checkpoint (it holds {describe(ckpt)}); "
                           f"refconv-fuse takes the last.pth/best.pth of a run whose method is not none")
    return restored


def _restore_training(ckpt: dict, path: str | os.PathLike) -> Restored:
    """The model a training checkpoint was saved from (its method applied, as its config says)."""
    model, cfg = rebuild_training_model(ckpt, path)
    return Restored(model, methods.get(cfg.method).kind, cfg.model.name, cfg.model.num_classes, cfg)


def restore_any(path: str | os.PathLike | None, model_name: str | None = None,
                num_classes: int | None = None) -> Restored:
    """For evaluation: fused and training checkpoints carry their architecture; plain state dicts need
    ``model_name``; no path at all means the library's pretrained weights of ``model_name``."""
    if path is None:
        if not model_name:
            raise RefconvError("nothing to evaluate: pass --checkpoint CKPT, or --model NAME for library weights")
        model = build_model(model_name, num_classes=num_classes or 1000, pretrained=True)
        return Restored(model, "library", model_name, num_classes or 1000, None)
    obj = safe_torch_load(path) if Path(path).suffix != ".safetensors" else None
    if isinstance(obj, dict) and obj.get("format") == FUSED_FORMAT:
        cfg = config_from_dict(obj["config"]) if obj.get("config") else None
        kwargs = cfg.model.kwargs if cfg is not None and not model_name else {}  # the run's model.kwargs
        model = build_model(model_name or obj["arch"], num_classes=obj["num_classes"], pretrained=False, **kwargs)
        _load_strict(model, obj["state_dict"], path)
        return Restored(model, "fused", obj["arch"], obj["num_classes"], cfg)
    if is_training_checkpoint(obj):
        return _restore_training(obj, path)
    if not model_name:
        what = describe(obj) if obj is not None else "a safetensors state dict"
        raise RefconvError(f"'{path}' carries no architecture (it holds {what}); pass --model NAME")
    state = read_state_dict(path)
    classes = num_classes or _classifier_outputs(state, model_name)
    model = build_model(model_name, num_classes=classes, pretrained=False)
    load_state_dict_checked(model, state, source=str(path), allow_new_classifier=False)
    return Restored(model, "state_dict", model_name, classes, None)


def _classifier_outputs(state: dict, model_name: str) -> int:
    """Number of classes: the output size of the model's classifier weight in the state dict. The classifier is
    found on the architecture (timm's ``get_classifier()``, else its last Linear / Conv2d in module order), not as the
    file's last weight: a ``.safetensors`` file stores its keys sorted (torchvision mnasnet0_5: 24 instead of 10)."""
    probe = build_model(model_name, num_classes=1000, pretrained=False)
    names = {id(m): n for n, m in probe.named_modules()}
    head = getattr(probe, "get_classifier", lambda: None)()
    candidates = [names[id(head)]] if id(head) in names else []
    candidates += [n for n, m in reversed(list(probe.named_modules())) if isinstance(m, (nn.Linear, nn.Conv2d))]
    for name in candidates:
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is not None and weight.ndim in (2, 4):
            return int(weight.shape[0])
    return 1000


def _load_strict(model: nn.Module, state: dict, path) -> None:
    try:
        model.load_state_dict(with_versions(state, model), strict=True)  # files from before versions were kept
    except RuntimeError as e:
        raise RefconvError(f"'{path}' does not fit its own architecture ({str(e).splitlines()[0]}); "
                           f"the file is damaged or was edited") from None
