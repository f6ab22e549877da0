"""Which conv feeds a BatchNorm directly: found by running the model, not from module names.

The structural methods sum their branches after the BatchNorm that reads a conv's output, unchanged and nowhere else,
as the authors' blocks do, and fold them back through that BN's statistics and affine parameters (placement.py). Which
BN that is, module names cannot tell (``conv2`` -> ``bn2`` in ResNet, ``conv_dw`` -> ``bn1`` in timm, ``features.0.0``
-> ``features.0.1`` in torchvision, LayerNorm after ConvNeXt's ``conv_dw``), so one eval-mode forward records it:
forward hooks keep each conv's output tensor object, BN pre-hooks the input object, and a ``TorchFunctionMode``
counts every other op that reads a conv output (a residual add, an in-place activation before the BN, a feature
hook): such a conv is not paired.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..protocol import example_input


class _UseCounter(TorchFunctionMode):
    """Counts, per conv output (by object), the torch ops that read it and return a tensor (metadata reads such as
    ``x.shape`` or ``x.ndim`` do not return one and do not count)."""

    def __init__(self, watched: dict[int, list]) -> None:
        super().__init__()
        self.watched = watched  # id(output tensor) -> [output tensor, number of reads]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(out)):
            seen = set()
            for leaf in tree_leaves((args, kwargs or {})):
                entry = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if entry is not None and entry[0] is leaf and id(leaf) not in seen:
                    seen.add(id(leaf))
                    entry[1] += 1
        return out


def model_example(model: nn.Module) -> torch.Tensor:
    """Seeded random images for the pairing forward: at the model's own input size where it has a fixed one (timm's
    ``pretrained_cfg`` with ``fixed_input_size``: LeViT, CoAtNet, ...), else 64 px (``protocol.example_input``), which
    every other model takes and which keeps the forward cheap."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if cfg.get("fixed_input_size") else None
    return example_input(model) if not size else example_input(model, size=int(size[-1]))


def find_bn_pairs(model: nn.Module, convs: Iterable[str] | None = None,
                  example: torch.Tensor | None = None) -> dict[str, str]:
    """Conv name -> name of the BatchNorm it feeds directly, for the named convs (default: every ``nn.Conv2d``).

    A pair needs, over one eval-mode forward on ``example`` (default :func:`model_example`): every call of
    the conv returns a tensor that the same BN (a ``_BatchNorm`` with running statistics) takes as its input and
    that no other op reads, and every call of that BN takes such an output. The model's mode is restored.
    """
    return bn_pairs_and_output(model, convs, example)[0]


@torch.no_grad()
def bn_pairs_and_output(model: nn.Module, convs: Iterable[str] | None = None,
                        example: torch.Tensor | None = None) -> tuple[dict[str, str], object]:
    """:func:`find_bn_pairs` and the model's eval-mode output of that forward (as ``protocol.eval_outputs``)."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)] if convs is None else list(convs)
    watched: dict[int, list] = {}  # id(conv output) -> [tensor, reads]
    outputs: dict[str, list[int]] = {n: [] for n in names}
    owner: dict[int, str] = {}
    bn_inputs: dict[str, list[int]] = {}

    def conv_hook(name):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor):
                watched[id(out)] = [out, 0]
                outputs[name].append(id(out))
                owner[id(out)] = name
        return hook

    def bn_hook(name):
        def hook(_module, args):
            x = args[0] if args else None
            entry = watched.get(id(x)) if isinstance(x, torch.Tensor) else None
            bn_inputs.setdefault(name, []).append(id(x) if entry is not None and entry[0] is x else None)
        return hook

    # Conv hooks go last, so that they see the output after any other forward hook (e.g. structural branches).
    handles = [modules[n].register_forward_hook(conv_hook(n)) for n in names]
    handles += [m.register_forward_pre_hook(bn_hook(n)) for n, m in modules.items()
                if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
    mode = model.training
    model.eval()
    try:
        x = model_example(model) if example is None else example
        with _UseCounter(watched):
            out = model(x)
    finally:
        model.train(mode)
        for h in handles:
            h.remove()

    pairs: dict[str, str] = {}
    for bn, inputs in bn_inputs.items():
        sources = {owner.get(i) for i in inputs}
        if len(sources) != 1 or None in sources:
            continue
        conv = sources.pop()
        if set(outputs[conv]) == set(inputs) and all(watched[i][1] == 1 for i in outputs[conv]):
            pairs[conv] = bn
    return pairs, out.float() if isinstance(out, torch.Tensor) else out
