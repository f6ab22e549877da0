"""Fuse a re-parameterized model (RefConv or any ``reparam`` method) into the original architecture, prove it computes
the same function, write it out."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_save, atomic_save_safetensors, fused_checkpoint, unwrap
from ..errors import RefconvError
from ..methods import fuse_model
from ..models import build_model
from ..verify import output_diff_and_scale, randomize_bn_stats

FORMATS = ("pth", "safetensors", "onnx")


@dataclass
class FuseResult:
    model: nn.Module  # the original architecture with the fused weights, freshly built and strictly loaded
    max_abs_diff: float
    output_scale: float = 1.0  # max |output| of the check (at least 1): the tolerance is atol times this


@torch.no_grad()
def fuse_and_verify(trained: nn.Module, name: str, num_classes: int, img_size: int, atol: float = 1e-4,
                    batch: int = 4, seed: int = 0, model_kwargs: dict | None = None) -> FuseResult:
    """Fuse a copy of ``trained`` (any registered method; the model is left untouched), load the result **strictly**
    into a freshly built ``name`` model (``model_kwargs``: the run's ``model.kwargs``), and compare eval-mode outputs on
    random fp32 inputs of ``img_size``: once with the trained norm statistics (what is deployed),
    once after randomizing every
    norm layer of the trained model (branch BatchNorms included, whose zero-initialised scales then become non-zero) and
    fusing that. Near-identity BatchNorm can hide a wrong kernel or bias (RepVGG's lesson). Raises when the difference
    exceeds ``atol`` times the output's scale (max |output|, at least 1): a branch folded into the kernel sums the same
    products in another order, and fp32 rounding grows with the activations (mobilenetv2 under randomized statistics:
    outputs ~50, differences ~5e-4 in fp32, 1e-12 in fp64, measured)."""
    source = unwrap(trained)
    device = next(source.parameters()).device
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed)).to(device)
    deployed, diff, scale = None, 0.0, 1.0
    for randomized in (False, True):
        # Our own copy, in the fresh model's dtype and memory format: the check is about the fused weights, not about
        # channels_last and contiguous convs rounding differently (1 thread, a from-scratch model with large
        # activations: 0.01 apart with identical weights, measured).
        reference = copy.deepcopy(source).float().to(memory_format=torch.contiguous_format)
        if randomized:
            randomize_bn_stats(reference, seed)
        fused = copy.deepcopy(reference)
        if not fuse_model(fused):
            raise RefconvError("the model holds no re-parameterized layer (its method is none): nothing to fuse")
        fresh = build_model(name, num_classes=num_classes, pretrained=False, **(model_kwargs or {}))
        try:
            fresh.load_state_dict(fused.state_dict(), strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise RefconvError(f"fused weights do not load strictly into a fresh {name!r}: {first}") from None
        fresh.to(device)
        d, s = output_diff_and_scale(reference, fresh, x)
        # max() keeps its first argument against a NaN: a diverged model would pass with diff 0.
        diff, scale = (d, s) if d != d else (max(diff, d), max(scale, s))
        deployed = deployed or fresh
    if diff != diff:
        raise RefconvError("the trained model's outputs are not finite (NaN or inf: did the run diverge?); there is "
                           "no function to preserve, the checkpoint was not written")
    if not diff <= atol * scale:
        raise RefconvError(f"fused model differs from the trained model: max_abs_diff={diff:.3g} > atol={atol:g} x "
                           f"output scale {scale:.3g}; the checkpoint was not written")
    return FuseResult(model=deployed.cpu(), max_abs_diff=diff, output_scale=scale)


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
            atomic_save(fused_checkpoint(result.model, arch, num_classes, config, result.max_abs_diff,
                                         result.output_scale), path)
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
