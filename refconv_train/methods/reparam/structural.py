"""ACB, RepVGG and DBB as extra branches on any pretrained model's spatial convs, fused back exactly.

The conv keeps its own module, class, parameters and padding logic (timm's dynamic "same" padding included). Its
branches live in ``conv.rep_branches`` (a :class:`RepBranches`) and are summed where the authors' blocks sum them:
after the conv's own BatchNorm, ``BN(conv x) + sum_b BN_b(branch_b x)`` (placement.py: forward hooks on the conv and
its BN), or on the conv's output for a conv that feeds no BatchNorm but has a bias. State dicts, deep copies (EMA),
pickling and SyncBN conversion see ordinary modules. Each branch reads the conv's input padded for its kernel's place
inside the conv's ``kh x kw`` frame (``transforms.branch_padding``), so it is aligned with the conv's output by
construction.

The conv -> BN pairs come from one hooked eval-mode forward at apply (``bn_pairs``, never from names), on ``example``
or, without one, on random images at the model's fixed input size (timm's ``pretrained_cfg``) or 64 px; a forward that
fails there is a one-line error. The pairs are stored on the branches, so the fuse runs no forward.

Exact start: each branch's LAST BatchNorm starts with ``gamma = branch_scale`` (default 0) and ``beta = 0``, so every
branch outputs exact zeros in train and eval mode and the model starts at the pretrained function, while ``gamma``
still receives a gradient (zero-init of the last BN, as in DBB's ``single_init`` / Goyal et al.'s zero-init residual).
Zeroing a conv instead would leave a train-mode BN normalizing a constant. All other branch layers keep the papers'
inits: PyTorch's default conv init, BN ``gamma = 1``, DBB's identity-based ``1x1`` (a learned delta on the identity,
starting at 0). ``branch_scale=1.0`` is the papers' block from scratch.

Fusing folds every branch into ``conv.weight`` (scaled by sigma / gamma of the conv's BN where the sum comes after
it); the branches' bias goes into that BN's beta (its running mean for a BN without affine parameters) or into
``conv.bias``; then the submodule and the hooks go: the original architecture, loadable strictly into a freshly built
model.
"""

from __future__ import annotations

import warnings

import torch
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn
from torch.nn.utils import parametrize

from ...errors import RefconvError
from ..protocol import ReparamReport, eval_outputs, layer_info, nothing_changed, spatial_targets
from . import kernel_algebra as T
from .bn_pairs import bn_pairs_and_output, model_example
from .branches import AvgBranch, ConvBN, IdentityBN, OneByOneKxK, RepBranches
from .placement import attach, cannot_sum_after, folding

METHODS = ("acb", "repvgg", "dbb")
_KNOWN_FORWARDS = (nn.Conv2d.forward, Conv2dSame.forward, Conv2dSameExport.forward)
NO_BIAS_SINK = "no bias and no BatchNorm reading its output directly: a branch bias could not be folded"


def make_branches(conv: nn.Conv2d, method: str, bias_to: str) -> tuple[RepBranches, str]:
    """The method's branches for this conv (fresh inits, last BNs not yet scaled) and a one-line description."""
    frame = tuple(conv.kernel_size)
    rep = RepBranches(method, frame, bias_to)
    center = T.center_offset(frame, (1, 1))
    if method == "acb":
        rep.add_module("ver", ConvBN(conv, (frame[0], 1), (0, center[1])))
        rep.add_module("hor", ConvBN(conv, (1, frame[1]), (center[0], 0)))
        text = f"{frame[0]}x1 + 1x{frame[1]} branches"
    elif method == "repvgg":
        rep.add_module("conv1x1", ConvBN(conv, (1, 1), center))
        if conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1):
            rep.add_module("identity", IdentityBN(conv, center))
            text = "1x1 + identity branches"
        else:
            why = f"stride {conv.stride[0]}" if tuple(conv.stride) != (1, 1) else \
                f"{conv.in_channels} -> {conv.out_channels} channels"
            text = f"1x1 branch (no identity branch: {why})"
    else:  # DBB's grouping; its test `groups < out_channels` would give a conv with groups == C_out != C_in a
        # pool-only branch of the wrong width: such a conv takes the group-conv branches here
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if not depthwise:
            rep.add_module("conv1x1", ConvBN(conv, (1, 1), center))
        rep.add_module("avg", AvgBranch(conv, with_conv=not depthwise))
        rep.add_module("conv1x1_kxk", OneByOneKxK(conv, depthwise))
        text = "avg + 1x1(2x channels)-kxk branches (depthwise)" if depthwise else "1x1 + 1x1-avg + 1x1-kxk branches"
    where = f"after {bias_to.rsplit('.', 1)[0]}" if bias_to != "conv.bias" else "on the conv output"
    return rep.to(conv.weight.device, conv.weight.dtype), f"{text}, summed {where}, bias -> {bias_to}"


def _reason_to_skip(conv: nn.Conv2d, method: str) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: branches assume zero padding"
    if type(conv).forward not in _KNOWN_FORWARDS:
        return f"custom forward ({type(conv).__name__}): its padding or weight use is unknown"
    if method == "acb" and min(conv.kernel_size) == 1:
        return "ACB needs a kernel larger than 1 in both dimensions"
    return None


def _branch_module_ids(model: nn.Module) -> set[int]:
    return {id(m) for rep in model.modules() if isinstance(rep, RepBranches) for m in rep.modules()}


def apply_structural(model: nn.Module, method: str, exclude=(), branch_scale: float = 0.0,
                     example: torch.Tensor | None = None) -> ReparamReport:
    """Add ``method``'s branches (``acb``, ``repvgg``, ``dbb``) to every eligible spatial conv of ``model``, in place.

    ``exclude``: regexes over module names. ``branch_scale``: the last branch BN's gamma (0: exact start). ``example``:
    the input for the conv -> BN forward and the start measurement (default ``protocol.example_input``). Raises
    :class:`RefconvError` for an unknown method or when no conv is eligible.

    A model that already holds another method's re-parameterization is refused (one method per model:
    ``protocol.spatial_targets``). Skipped, with the reason in the report: 1x1 convs, ``exclude`` matches, convs whose
    weight carries a foreign parametrization (e.g. spectral norm), ``padding_mode`` other than zeros,
    subclasses with their own ``forward`` (e.g. timm's ``StdConv2d``; timm's ``Conv2dSame`` is supported), ACB on a
    kernel of height or width 1, and a conv with neither a bias nor a BatchNorm that it feeds directly
    (:data:`NO_BIAS_SINK`). RepVGG adds its identity branch only where ``C_in == C_out`` and the stride is 1."""
    if method not in METHODS:
        raise RefconvError(f"structural method {method!r} is unknown: use one of {', '.join(METHODS)}")
    inside = _branch_module_ids(model)

    def taken(m: nn.Module) -> bool:  # RefConv / WN parametrizations, our branches, and the convs inside them
        return id(m) in inside or parametrize.is_parametrized(m, "weight") or hasattr(m, "rep_branches")

    targets, skipped = spatial_targets(model, method, exclude, is_taken=taken)
    skipped = [(n, why) for n, why in skipped if ".rep_branches." not in f".{n}."]
    x = model_example(model) if example is None else example
    try:
        pairs, before = bn_pairs_and_output(model, [n for n, _ in targets], x)
    except RefconvError:
        raise
    except Exception as e:  # the model's own error, often several lines: one line, and the fix
        shape = "x".join(map(str, x.shape))
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RefconvError(f"{method}: the model's forward on a {shape} example failed ({why}); pass example= with the "
                           f"model's input size (refconv-train: set data.img_size to it)") from e
    modules = dict(model.named_modules())
    report = ReparamReport(method)
    for name, conv in targets:
        why = _reason_to_skip(conv, method)
        if why is None and name in pairs:
            why = cannot_sum_after(modules[pairs[name]])
        if why is None and conv.bias is None and name not in pairs:
            why = NO_BIAS_SINK
        if why is not None:
            skipped.append((name, why))
            continue
        site, sink = None, "conv.bias"
        if name in pairs:  # summed after the conv's own BN, as in the authors' blocks
            bn = pairs[name]
            parent, _, key = bn.rpartition(".")
            site = (modules[parent], key, bn)
            sink = f"{bn}.bias" if modules[bn].bias is not None else f"{bn}.running_mean"
        rep, detail = make_branches(conv, method, sink)
        with torch.no_grad():
            for branch in rep.children():
                branch.last_bn().weight.fill_(branch_scale)
                branch.last_bn().bias.zero_()
        attach(conv, rep, site)
        report.layers.append(layer_info(name, conv, sum(p.numel() for p in rep.parameters() if p.requires_grad),
                                        detail))
    _warn_zero_started_hosts(method, branch_scale, [pairs[layer.name] for layer in report.layers
                                                    if layer.name in pairs], modules)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.skipped = sorted(skipped, key=lambda item: order[item[0]])
    if not report.layers:
        raise nothing_changed(method, skipped)
    after = eval_outputs(model, x)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        report.start_max_abs_diff = (after - before).abs().max().item()
    return report


def _warn_zero_started_hosts(method: str, branch_scale: float, host_bns: list[str], modules: dict) -> None:
    """Branches at a non-zero scale on a host BN that starts at gamma 0 (timm's ``zero_init_last``: each residual
    block starts as the identity) break that start; the authors' blocks start every BN at 1. Measured on resnet18
    from scratch at lr 0.2 the zero start was worth 5.6 test points to the plain model (docs/reproduction.md)."""
    zero = [n for n in host_bns if getattr(modules[n], "weight", None) is not None and not modules[n].weight.any()]
    if branch_scale and zero:
        warnings.warn(f"{method}: {len(zero)} host BatchNorms start at gamma 0 (e.g. {zero[0]}: timm's "
                      f"zero_init_last); branches at branch_scale={branch_scale:g} break that zero start, while the "
                      f"authors' blocks start every BN at 1: build the model with zero_init_last=False "
                      f"(refconv-train: model.kwargs.zero_init_last=false)", UserWarning, stacklevel=3)


def structural_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> conv for every conv that currently carries structural branches."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "rep_branches", None), RepBranches)}


def fuse_structural(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Fold every conv's branches into its weight and bias sink (its BN's beta or running mean, else its bias), remove
    them and their hooks, in place; returns the fused conv names. Idempotent. No forward runs: the pairs were found
    at apply (``example`` is accepted for older callers and ignored). Nothing changes when any conv cannot fuse."""
    convs = structural_convs(model)
    if any(parametrize.is_parametrized(c, "weight") for c in convs.values()):
        raise RefconvError("fuse the weight parametrizations (RefConv, WN) of structural convs before their branches")
    for fold in [folding(conv, name) for name, conv in convs.items()]:
        fold()
    return list(convs)
