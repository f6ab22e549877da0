"""Build a backbone by name (timm, or ``torchvision:<name>``) with library, local or no pretrained weights."""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from ..checkpoint import read_state_dict
from ..errors import RefconvError
from ..state_dicts import with_versions

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"


def build_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool | str | os.PathLike = False,
    **kwargs: Any,
) -> nn.Module:
    """A timm model (``mobilenetv2_100``) or a torchvision one (``torchvision:shufflenet_v2_x1_0``).

    ``pretrained``: ``True`` loads the library's weights through the library's own loader (timm hub /
    torchvision weights enum); ``False`` keeps the random init; a path loads a local checkpoint or state dict
    (plain, timm, torchvision-references, or ours; RefConv checkpoints are fused on the fly) strictly: only the
    classifier may differ in shape (it is then re-initialised for ``num_classes``). ``kwargs`` go to the model
    constructor (timm: ``create_model``; e.g. ``pretrained_cfg_overlay=dict(file=...)`` for a local hub file).
    """
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "false"):
        pretrained = pretrained.lower() == "true"
    from_library = pretrained is True
    if name.startswith(TORCHVISION_PREFIX):
        model = _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, from_library, **kwargs)
    else:
        model = _build_timm(name, num_classes, from_library, **kwargs)
    if not isinstance(pretrained, bool):
        load_pretrained_file(model, pretrained)
    return model


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


# ----------------------------------------------------------------------------------------------- local weights
def load_pretrained_file(model: nn.Module, path: str | os.PathLike) -> None:
    load_state_dict_checked(model, read_state_dict(path), source=str(path))


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
