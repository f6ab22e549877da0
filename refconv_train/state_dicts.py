"""State dicts with their module versions (``_metadata``): ``load_state_dict`` hands each module its own version, and
torchvision's MNASNet refuses a state dict without one (``version should be set to 1 or 2``). A plain ``dict`` drops
them, and so does ``.safetensors``, which holds tensors and str -> str metadata only: our files keep them in the
header under :data:`VERSIONS_KEY`, as JSON."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RefconvError

VERSIONS_KEY = "state_dict_metadata"


def with_versions(state: dict[str, torch.Tensor], source: Any) -> OrderedDict[str, torch.Tensor]:
    """``state`` as an ``OrderedDict`` carrying the module versions (``_metadata``) of ``source`` (a state dict, or
    a model, whose own versions are taken) when it has none of its own. A model's versions are right for files
    written by this package from a model built the same way (training and fused checkpoints written before their
    versions were kept); a foreign state dict may predate a module's current version: pass it as it is."""
    versions = getattr(state, "_metadata", None)
    if versions is None:
        versions = getattr(source.state_dict() if isinstance(source, nn.Module) else source, "_metadata", None)
    out = OrderedDict(state)
    if versions is not None:
        out._metadata = versions
    return out


def read_safetensors(path: Path) -> OrderedDict[str, torch.Tensor]:
    """A ``.safetensors`` state dict with the module versions its header holds (files we wrote)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = OrderedDict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        versions = (f.metadata() or {}).get(VERSIONS_KEY)
    if versions is not None:
        try:
            state._metadata = OrderedDict(json.loads(versions))
        except ValueError:
            raise RefconvError(f"'{path}': its header entry {VERSIONS_KEY!r} is not valid JSON; the file was edited "
                               f"or damaged") from None
    return state


def safetensors_header(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The str -> str metadata of a ``.safetensors`` file holding ``state``: its module versions, when it has any."""
    versions = getattr(state, "_metadata", None)
    return {"format": "pt", **({} if versions is None else {VERSIONS_KEY: json.dumps(versions)})}


def strip_prefixes(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Keys and module versions without wrapper prefixes. A version's key is a module name ("" = the root): the
    wrapper's own entry comes first and the wrapped model's root (``module`` -> "") replaces it."""
    out = OrderedDict((_strip_key(k), v) for k, v in state.items())
    versions = getattr(state, "_metadata", None)
    if versions is not None:
        out._metadata = OrderedDict((_strip_key(k + ".")[:-1], v) for k, v in versions.items())
    return out


def _strip_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DDP and torch.compile wrappers
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")
