"""Create a bare architecture by name (timm, or ``torchvision:<name>``), with the library's weights or none, and
load a state dict into it strictly (models/build.py adds local weight files and our training checkpoints)."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from ..errors import RefconvError
from ..state_dicts import with_versions

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"


def create_architecture(name: str, num_classes: int = 1000, from_library: bool = False, **kwargs: Any) -> nn.Module:
    """The architecture ``name`` with the library's pretrained weights (``from_library``) or its random init."""
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, from_library, **kwargs)
    return _build_timm(name, num_classes, from_library, **kwargs)


def _build_timm(name: str, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    if not timm.is_model(name):
        raise RefconvError(f"unknown model {name!r}{_suggest(name, timm.list_models())}; "
                           f"torchvision models are named 'torchvision:<name>'")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as e:  # the hub raises many kinds (network, auth, missing file): all mean "no weights here"
        if not pretrained:
            raise
        raise RefconvError(f"could not load timm's pretrained weights for {name!r} ({_first_line(e)}); offline? "
                           f"set model.pretrained to a local weights file") from None


def _build_torchvision(name: str, num_classes: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise RefconvError(f"unknown torchvision model {name!r}{_suggest(name, available)}")
    model = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:  # network errors of urllib and friends: all mean "no weights here"
            raise RefconvError(f"could not load torchvision's pretrained weights {weights} ({_first_line(e)}); "
                               f"offline? set model.pretrained to a local weights file") from None
        load_state_dict_checked(model, state, source=str(weights))
    return model


# ----------------------------------------------------------------------------------------------- loading
def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                            allow_new_classifier: bool = True) -> None:
    """Strict load that names the first mismatching keys. Only the classifier may differ in shape (when
    ``allow_new_classifier``): it keeps its fresh init (fine-tuning to another class count), with a warning."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RefconvError(f"weights '{source}' do not fit the model: missing {_few(missing)}, unexpected "
                           f"{_few(unexpected)}; check model.name (and that the file is for this architecture)")
    wrong_shape = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    head = classifier_prefixes(model)
    not_head = [k for k in wrong_shape if not (allow_new_classifier and any(k.startswith(p + ".") for p in head))]
    if not_head:
        k = not_head[0]
        raise RefconvError(f"weights '{source}' do not fit the model: {k} has shape {tuple(state[k].shape)}, the "
                           f"model expects {tuple(own[k].shape)} ({len(not_head)} mismatching tensors)")
    if wrong_shape:
        log.warning("classifier %s re-initialised: weights '%s' were trained for another number of classes",
                    ", ".join(wrong_shape), source)
        state = with_versions({k: own[k] if k in wrong_shape else v for k, v in state.items()}, state)
    model.load_state_dict(state, strict=True)


def classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of the final classifier: timm's ``pretrained_cfg['classifier']``, else the last Linear/Conv."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    if head:
        return [head] if isinstance(head, str) else list(head)
    last = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return last[-1:]


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
