"""Fuse a refocused model into the original architecture, prove it computes the same function, write it out."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_save, atomic_save_safetensors, fused_checkpoint, unwrap
from .errors import RefconvError
from .models import build_model
from .refocus import fuse_state_dict, refocused_convs
from .verify import output_diff, randomize_bn_stats

FORMATS = ("pth", "safetensors", "onnx")


@dataclass
class FuseResult:
    model: nn.Module  # the original architecture with the fused weights, freshly built and strictly loaded
    max_abs_diff: float


@torch.no_grad()
def fuse_and_verify(refocused: nn.Module, name: str, num_classes: int, img_size: int, atol: float = 1e-4,
                    batch: int = 4, seed: int = 0) -> FuseResult:
    """Fuse ``refocused``'s weights (the model is left untouched), load them **strictly** into a freshly built
    ``name`` model, and compare eval-mode outputs on random fp32 inputs of ``img_size``. Raises above ``atol``."""
    source = unwrap(refocused)
    if not refocused_convs(source):
        raise RefconvError("the model holds no RefConv layer: nothing to fuse")
    device = next(source.parameters()).device
    fresh = build_model(name, num_classes=num_classes, pretrained=False)
    try:
        fresh.load_state_dict(fuse_state_dict(source.state_dict()), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise RefconvError(f"fused weights do not load strictly into a fresh {name!r}: {first}") from None
    fresh.to(device)
    # Our own copy (its norm statistics are randomized below), in the fresh model's dtype and memory format: the
    # check is about the fused weights, not about channels_last and contiguous convs rounding differently (1 thread,
    # a from-scratch model with large activations: 0.01 apart with identical weights, measured).
    reference = copy.deepcopy(source).float().to(memory_format=torch.contiguous_format)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)).to(device)
    # Once with the trained statistics (what is deployed), once with randomized norm statistics in both models
    # (near-identity BN can hide a wrong kernel; RepVGG's lesson).
    diff = output_diff(reference, fresh, x)
    fresh_rand = copy.deepcopy(fresh)
    randomize_bn_stats(reference, seed)
    randomize_bn_stats(fresh_rand, seed)
    diff = max(diff, output_diff(reference, fresh_rand, x))
    if not diff <= atol:  # also catches NaN
        raise RefconvError(f"fused model differs from the RefConv model: max_abs_diff={diff:.3g} > atol={atol:g}; "
                           f"the checkpoint was not written")
    return FuseResult(model=fresh.cpu(), max_abs_diff=diff)


def fused_outputs(out: str | os.PathLike, formats: tuple[str, ...] = ("pth", "safetensors")) -> dict[str, Path]:
    """Format -> path for a fused checkpoint named ``out``: the ``pth`` is ``out`` itself, the others sit beside it
    with their own suffix (an ``out`` named ``.safetensors``/``.onnx`` names the set: the checkpoint gets ``.pth``)."""
    out = Path(out)
    if out.suffix in (".safetensors", ".onnx"):
        out = out.with_suffix(".pth")
    paths = {"pth": out, "safetensors": out.with_suffix(".safetensors"), "onnx": out.with_suffix(".onnx")}
    return {fmt: paths[fmt] for fmt in dict.fromkeys(formats)}


def write_fused(result: FuseResult, outputs: dict[str, Path], arch: str, num_classes: int, config: dict,
                img_size: int) -> list[Path]:
    """Write each output atomically: the fused checkpoint of docs/design.md section 4 (``pth``), its bare state dict
    (``safetensors``), an ONNX export with a dynamic batch axis (``onnx``, ``pip install .[onnx]``)."""
    for fmt, path in outputs.items():
        if fmt == "pth":
            atomic_save(fused_checkpoint(result.model, arch, num_classes, config, result.max_abs_diff), path)
        elif fmt == "safetensors":
            atomic_save_safetensors(result.model.state_dict(), path)
        else:
            export_onnx(result.model, img_size, path)
    return list(outputs.values())


def export_onnx(model: nn.Module, img_size: int, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(model.eval(), (torch.randn(1, 3, img_size, img_size),), str(tmp), dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    tmp.replace(path)
