"""Build a backbone by name with library, local or no pretrained weights, and the model of a run: the backbone
re-parameterized by the config's method (the registry's entry). A local weights file may be one of our training
checkpoints: its model is rebuilt from the config it stores, loaded strictly and fused (every method, one path)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import methods
from ..checkpoint import (
    check_method_layout,
    checkpoint_method,
    is_training_checkpoint,
    read_weights_file,
    state_dict_of,
)
from ..config import Config, config_from_dict
from ..errors import RefconvError
from ..methods.protocol import ReparamReport, example_input
from ..state_dicts import with_versions
from .architectures import create_architecture, load_state_dict_checked


def build_model(
    name: str,
    num_classes: int = 1000,
    pretrained: bool | str | os.PathLike = False,
    **kwargs: Any,
) -> nn.Module:
    """A timm model (``mobilenetv2_100``) or a torchvision one (``torchvision:shufflenet_v2_x1_0``).

    ``pretrained``: ``True`` loads the library's weights through the library's own loader (timm hub /
    torchvision weights enum); ``False`` keeps the random init; a path loads a local checkpoint or state dict
    (plain, timm, torchvision-references, or ours; re-parameterized training checkpoints are fused on the fly)
    strictly: only the classifier may differ in shape (it is then re-initialised for ``num_classes``). ``kwargs``
    go to the model constructor (timm: ``create_model``; e.g. ``pretrained_cfg_overlay=dict(file=...)``).
    """
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "false"):
        pretrained = pretrained.lower() == "true"
    model = create_architecture(name, num_classes, pretrained is True, **kwargs)
    if not isinstance(pretrained, bool):
        load_pretrained_file(model, pretrained)
    return model


def load_pretrained_file(model: nn.Module, path: str | os.PathLike) -> None:
    load_state_dict_checked(model, read_state_dict(path), source=str(path))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights held by a file in the original architecture's keys: our training/fused checkpoints, timm
    checkpoints, plain state dicts, ``.safetensors``. A training checkpoint of any method is rebuilt from its stored
    config and fused; a bare state dict that a method can fold without its model (RefConv's) is folded. The module
    versions (``_metadata``) are kept: torchvision's MNASNet refuses a state dict without them."""
    obj = read_weights_file(path)
    if is_training_checkpoint(obj) and obj.get("config"):  # without its config: its state dict, folded below
        model, _ = rebuild_training_model(obj, path)
        methods.fuse_model(model)
        return model.state_dict()
    state = state_dict_of(obj, path)
    for method in methods.registered():
        state = with_versions(method.fuse_state_dict(state), state)
    return state


def build_training_model(cfg: Config, pretrained: bool | str | None = None
                         ) -> tuple[nn.Module, ReparamReport | None]:
    """The backbone with its pretrained weights, re-parameterized by ``cfg.method`` with ``cfg``'s section of its
    name; returns the method's report (None for ``none``). ``pretrained=False``: the bare architecture for a
    checkpoint's weights (resume, restore): the method skips its checks of the start."""
    m = cfg.model
    model = build_model(m.name, num_classes=m.num_classes,
                        pretrained=m.pretrained if pretrained is None else pretrained, **m.kwargs)
    fresh = pretrained is None
    # The hooked forward that pairs convs with their BatchNorms, and the start check, at the run's image size.
    example = example_input(model, cfg.data.img_size)
    report = methods.get(cfg.method).apply(model, cfg.method_options, example=example, fresh=fresh)
    return model, report


def rebuild_training_model(ckpt: dict, path: str | os.PathLike) -> tuple[nn.Module, Config]:
    """The model a training checkpoint was saved from (its method applied, as its stored config says), strictly
    loaded, and that config. Checkpoints written before the ``method`` key are translated (methods/legacy.py)."""
    cfg = config_from_dict(ckpt.get("config") or {})
    recorded = checkpoint_method(ckpt)
    check_method_layout(ckpt, path)
    if recorded != cfg.method:
        raise RefconvError(f"'{path}' records method {recorded} but its config says {cfg.method}: the file was "
                           f"edited; use an unedited checkpoint")
    model, _ = build_training_model(cfg, pretrained=False)  # every weight then comes from the checkpoint
    try:
        model.load_state_dict(with_versions(ckpt["model"], model), strict=True)  # old files: the model's versions
    except RuntimeError as e:
        raise RefconvError(f"'{path}' does not fit its own architecture ({str(e).splitlines()[0]}); "
                           f"the file is damaged or was edited") from None
    return model, cfg
