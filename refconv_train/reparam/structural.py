"""ACB, RepVGG and DBB as extra branches on any pretrained model's spatial convs, fused back exactly.

The conv keeps its own module, class, parameters and padding logic (timm's dynamic "same" padding included). Its
branches live in ``conv.rep_branches`` (a :class:`RepBranches`) and a forward hook, the module-level function
:func:`_add_branches`, adds their sum to the conv's output: state dicts, deep copies (EMA), pickling and SyncBN
conversion see ordinary modules. Each branch reads the conv's input zero-padded for its kernel's place inside the
conv's ``kh x kw`` frame (``transforms.branch_padding``), so it is aligned with the conv's output by construction.

Exact start: each branch's LAST BatchNorm starts with ``gamma = branch_scale`` (default 0) and ``beta = 0``, so every
branch outputs exact zeros in train and eval mode and the model starts at the pretrained function, while ``gamma``
still receives a gradient (zero-init of the last BN, as in DBB's ``single_init`` / Goyal et al.'s zero-init residual).
Zeroing a conv instead would leave a train-mode BN normalizing a constant. All other branch layers keep the papers'
inits: PyTorch's default conv init, BN ``gamma = 1``, DBB's identity-based ``1x1`` (a learned delta on the identity,
starting at 0). From scratch, ``branch_scale=1.0`` is the papers' default.

Fusing folds every branch into ``conv.weight``; the branches' bias goes into ``conv.bias`` or, for a conv without one,
into the running mean of the BatchNorm that the conv feeds directly (``bn_pairs.find_bn_pairs``); then the submodule
and the hook go: the original architecture, loadable strictly into a freshly built model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same_arg
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RefconvError
from . import transforms as T
from .bn_pairs import bn_pairs_and_output, find_bn_pairs
from .protocol import ReparamReport, eval_outputs, example_input, layer_info, nothing_changed, spatial_targets

METHODS = ("acb", "repvgg", "dbb")
_KNOWN_FORWARDS = (nn.Conv2d.forward, Conv2dSame.forward, Conv2dSameExport.forward)
NO_BIAS_SINK = "no bias and no BatchNorm after it: a branch bias could not be folded"


def main_padding(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int, int, int]:
    """The conv's effective zero padding ``(left, right, top, bottom)`` for an input of this size."""
    if isinstance(conv, Conv2dSameExport) and conv.pad is not None:
        return tuple(conv.pad.padding)
    if isinstance(conv, (Conv2dSame, Conv2dSameExport)):  # timm's dynamic TF "same"
        return tuple(pad_same_arg([height, width], conv.kernel_size, conv.stride, conv.dilation))
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":  # PyTorch: total d * (k - 1), the odd pixel at the end
        (th, tw) = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = conv.padding
    return pw, pw, ph, ph


def _fold(kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``T.fold_bn`` of a branch BN, in fp32 at least (fp64 for an fp64 model)."""
    dt = torch.promote_types(bn.running_mean.dtype, torch.float32)
    return T.fold_bn(kernel.to(dt), bn.running_mean.to(dt), bn.running_var.to(dt), bn.weight.to(dt), bn.bias.to(dt),
                     bn.eps)


class Branch(nn.Module):
    """One branch: a ``size`` kernel at ``offset`` in the frame, run with the conv's stride and dilation on an input
    already padded for it; in eval mode it is one conv, :meth:`kernel_bias` (fp32 at least, grouped like the main
    conv, ``size`` only: ``RepBranches.kernel_bias`` places it in the frame)."""

    def __init__(self, size: tuple[int, int], offset: tuple[int, int]) -> None:
        super().__init__()
        self.size, self.offset = tuple(size), tuple(offset)

    def last_bn(self) -> nn.Module:
        return list(m for m in self.children() if isinstance(m, nn.modules.batchnorm._BatchNorm))[-1]


class ConvBN(Branch):
    """A ``size`` conv (the main conv's groups, stride, dilation) + BN: ACB's ``kx1``/``1xk``, the ``1x1`` branches."""

    def __init__(self, main: nn.Conv2d, size: tuple[int, int], offset: tuple[int, int]) -> None:
        super().__init__(size, offset)
        self.conv = nn.Conv2d(main.in_channels, main.out_channels, size, main.stride, 0, main.dilation, main.groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _fold(self.conv.weight, self.bn)


class IdentityBN(Branch):
    """RepVGG's identity branch: a BN on the input (stride 1, ``C_in == C_out``), per group an identity kernel."""

    def __init__(self, main: nn.Conv2d, offset: tuple[int, int]) -> None:
        super().__init__((1, 1), offset)
        self.groups = main.groups
        self.bn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = T.identity_kernel(self.bn.num_features, self.groups, device=self.bn.running_mean.device)
        return _fold(eye, self.bn)


class AvgBranch(Branch):
    """DBB's average branch: (``1x1`` conv + BN unless depthwise) -> ``kh x kw`` average pool -> BN. The pool runs
    as a fixed depthwise conv of ``1 / (kh * kw)`` with the main stride and dilation: ``AvgPool2d`` without padding
    where the dilation is 1, a dilated window average where it is not; one conv for the fuse either way."""

    def __init__(self, main: nn.Conv2d, with_conv: bool) -> None:
        super().__init__(main.kernel_size, (0, 0))
        self.groups, self.stride, self.dilation = main.groups, main.stride, main.dilation
        if with_conv:
            self.conv = nn.Conv2d(main.in_channels, main.out_channels, 1, groups=main.groups, bias=False)
            self.bn = nn.BatchNorm2d(main.out_channels)
        self.avgbn = nn.BatchNorm2d(main.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            x = self.bn(self.conv(x))
        c = x.shape[1]
        pool = T.avg_pool_kernel(c, self.size, c, dtype=x.dtype, device=x.device)
        return self.avgbn(F.conv2d(x, pool, None, self.stride, 0, self.dilation, c))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.avgbn.running_mean
        if not hasattr(self, "conv"):  # depthwise: the pool alone, on the conv's own channels
            pool = T.avg_pool_kernel(self.avgbn.num_features, self.size, self.groups, stats.dtype, stats.device)
            return _fold(pool, self.avgbn)
        pool = T.avg_pool_kernel(self.avgbn.num_features, self.size, self.avgbn.num_features, stats.dtype, stats.device)
        return T.merge_1x1_depthwise(*_fold(self.conv.weight, self.bn), *_fold(pool, self.avgbn))


class IdentityConv1x1(nn.Module):
    """DBB's identity-based ``1x1`` conv: kernel = identity + ``weight``, ``weight`` starting at 0 (so weight decay
    pulls it towards the identity). Not an ``nn.Conv2d``: its kernel is not its weight, no other method may take it."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1))

    def kernel(self) -> torch.Tensor:
        return self.weight + T.identity_kernel(self.weight.shape[0], self.groups, self.weight.dtype, self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), None, 1, 0, 1, self.groups)


class OneByOneKxK(Branch):
    """DBB's ``1x1 -> kxk`` branch: identity-based ``1x1`` (depthwise: a plain ``1x1`` to 2x channels) + BN ->
    ``kh x kw`` conv (main stride, dilation, groups) + BN. The input is zero-padded before the ``1x1``, so the
    ``kxk`` conv sees the first BN's value for a zero pixel in its padding, exactly as DBB's ``BNAndPadLayer`` in
    eval mode and for the fuse. (In train mode this BN's batch statistics also count the padded pixels, which
    ``BNAndPadLayer`` leaves out: a small difference in training only; the same holds for :class:`AvgBranch`.)"""

    def __init__(self, main: nn.Conv2d, depthwise: bool) -> None:
        super().__init__(main.kernel_size, (0, 0))
        self.groups, cin = main.groups, main.in_channels
        inner = 2 * cin if depthwise else cin
        if depthwise:
            self.conv1 = nn.Conv2d(cin, inner, 1, groups=main.groups, bias=False)
        else:
            self.idconv1 = IdentityConv1x1(cin, main.groups)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, main.out_channels, main.kernel_size, main.stride, 0, main.dilation, main.groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(main.out_channels)

    def _first(self) -> nn.Module:
        return self.conv1 if hasattr(self, "conv1") else self.idconv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self._first()(x))))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.conv1.weight if hasattr(self, "conv1") else self.idconv1.kernel()
        return T.merge_1x1_kxk(*_fold(first, self.bn1), *_fold(self.conv2.weight, self.bn2), self.groups)


class RepBranches(nn.Module):
    """The branches of one conv (``conv.rep_branches``); ``forward(conv, x)`` is their summed output."""

    def __init__(self, method: str, frame: tuple[int, int], bias_to: str) -> None:
        super().__init__()
        self.method, self.frame, self.bias_to = method, tuple(frame), bias_to

    def forward(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        main = main_padding(conv, x.shape[-2], x.shape[-1])
        padded: dict[tuple[int, ...], torch.Tensor] = {}
        out = None
        for branch in self.children():
            pad = T.branch_padding(main, self.frame, branch.size, branch.offset, conv.dilation)
            if pad not in padded:
                padded[pad] = F.pad(x, pad) if any(pad) else x
            y = branch(padded[pad])
            out = y if out is None else out + y
        return out

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of all branches as one ``kh x kw`` kernel + bias (fp32)."""
        pairs = [(T.pad_to_frame(k, self.frame, b.offset), bias) for b in self.children() for k, bias in
                 [b.kernel_bias()]]
        return T.add_branches([k for k, _ in pairs], [bias for _, bias in pairs])


def _add_branches(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook (module level, so deep copies and pickles keep it): the conv's output plus its branches'."""
    return output + conv.rep_branches(conv, args[0]).to(output.dtype)


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
    return rep.to(conv.weight.device, conv.weight.dtype), f"{text}, bias -> {bias_to}"


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

    Skipped, with the reason in the report: 1x1 convs, ``exclude`` matches, convs already re-parameterized (RefConv or
    WN parametrizations, branches; the convs inside branches are not listed), ``padding_mode`` other than zeros,
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
    x = example_input(model) if example is None else example
    no_bias = [n for n, c in targets if c.bias is None]
    pairs, before = bn_pairs_and_output(model, no_bias, x) if no_bias else ({}, eval_outputs(model, x))
    report = ReparamReport(method)
    for name, conv in targets:
        why = _reason_to_skip(conv, method)
        if why is None and conv.bias is None and name not in pairs:
            why = NO_BIAS_SINK
        if why is not None:
            skipped.append((name, why))
            continue
        sink = "conv.bias" if conv.bias is not None else f"{pairs[name]}.running_mean"
        rep, detail = make_branches(conv, method, sink)
        with torch.no_grad():
            for branch in rep.children():
                branch.last_bn().weight.fill_(branch_scale)
                branch.last_bn().bias.zero_()
        conv.rep_branches = rep
        conv.register_forward_hook(_add_branches)
        report.layers.append(layer_info(name, conv, sum(p.numel() for p in rep.parameters() if p.requires_grad),
                                        detail))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.skipped = sorted(skipped, key=lambda item: order[item[0]])
    if not report.layers:
        raise nothing_changed(method, skipped)
    after = eval_outputs(model, x)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        report.start_max_abs_diff = (after - before).abs().max().item()
    return report


def structural_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> conv for every conv that currently carries structural branches."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "rep_branches", None), RepBranches)}


@torch.no_grad()
def fuse_structural(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Fold every conv's branches into its weight and bias sink (conv bias, else the following BN's running mean),
    remove them and their hook, in place; returns the fused conv names. Idempotent. ``example``: the input of the
    conv -> BN forward (default ``protocol.example_input``); nothing changes if any bias has no sink."""
    convs = structural_convs(model)
    no_bias = [n for n, c in convs.items() if c.bias is None]
    pairs = find_bn_pairs(model, no_bias, example) if no_bias else {}
    lost = [n for n in no_bias if n not in pairs]
    if lost:
        raise RefconvError(f"cannot fuse {', '.join(lost)}: {NO_BIAS_SINK} (the model changed since apply?)")
    if any(parametrize.is_parametrized(c, "weight") for c in convs.values()):
        raise RefconvError("fuse the weight parametrizations (RefConv, WN) of structural convs before their branches")
    modules = dict(model.named_modules())
    for name, conv in convs.items():
        kernel, bias = conv.rep_branches.kernel_bias()
        conv.weight.add_(kernel.to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.add_(bias.to(conv.bias.dtype))
        else:
            bn = modules[pairs[name]]
            bn.running_mean.copy_(T.absorb_bias_into_bn(bn.running_mean.to(bias.dtype), bias))
        for key in [k for k, fn in conv._forward_hooks.items() if fn is _add_branches]:
            del conv._forward_hooks[key]
            conv._forward_hooks_with_kwargs.pop(key, None)
            conv._forward_hooks_always_called.pop(key, None)
        del conv.rep_branches
    return list(convs)
