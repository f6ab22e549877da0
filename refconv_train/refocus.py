"""RefConv: refocus a frozen pretrained kernel with a learnable convolution run over the kernel itself.

The math (DESIGN 1, bit-for-bit the grouping of the authors' ``RepConv``): a conv kernel ``W_b`` of shape
``(C_out, C_in/g, kh, kw)`` holds ``n = C_out * C_in / g`` 2-D kernels. Seen as one image ``(1, n, kh, kw)``, it is
convolved with ``W_r`` of shape ``(n, g, m, m)``, ``groups = n / g``, zero padding ``m // 2``, and
``W_t = W_b + conv2d(W_b, W_r)``. The layer convolves its input with ``W_t``.

The mechanism is a ``torch.nn.utils.parametrize`` parametrization of the conv's ``weight``: the conv keeps its class,
padding logic (timm's dynamic "same" padding included) and bias; fusing removes the parametrization and leaves
``W_t`` as a plain weight of the original shape.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .errors import RefconvError

INITS = ("xavier", "zeros", "kaiming")
BASES = ("frozen", "trainable")
BASE_INITS = ("pretrained", "random")

# State-dict key suffixes of a refocused conv (used to recognize RefConv checkpoints without a model).
BASE_KEY = ".parametrizations.weight.original"
REFOCUS_KEY = ".parametrizations.weight.0.refocus_weight"


# ----------------------------------------------------------------------------------------------- pure functions
def refocus_shape(weight_shape: torch.Size | tuple[int, ...], conv_groups: int, map_k: int) -> tuple[int, ...]:
    """Shape of ``W_r`` for a conv weight of ``weight_shape`` and ``conv_groups`` groups: ``(n, g, m, m)``."""
    c_out, c_in_per_group = weight_shape[0], weight_shape[1]
    return (c_out * c_in_per_group, conv_groups, map_k, map_k)


def refocus_delta(base: torch.Tensor, refocus_weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(W_b as (1, n, kh, kw), W_r, groups=n/g, padding=m//2)`` reshaped to ``W_b``'s shape (reference form)."""
    n, g, m, _ = refocus_weight.shape
    kh, kw = base.shape[-2:]
    kernels = base.reshape(1, n, kh, kw)
    return F.conv2d(kernels, refocus_weight, padding=m // 2, groups=n // g).reshape(base.shape)


def refocus_transform(base: torch.Tensor, refocus_weight: torch.Tensor) -> torch.Tensor:
    """The refocused kernel ``W_t = W_b + conv(W_b, W_r)`` (identity mapping of DESIGN 1)."""
    return base + refocus_delta(base, refocus_weight)


def kernel_patches(base: torch.Tensor, map_k: int, conv_groups: int) -> torch.Tensor:
    """The ``m x m`` neighbourhoods of every kernel position, grouped: ``(G, g*m*m, kh*kw)``, ``G = n / g``.

    With these, the transform is one batched GEMM: ``W_r.view(G, g, g*m*m) @ patches``. They depend on ``W_b`` alone,
    so while the base is frozen they are a constant.
    """
    n = base.shape[0] * base.shape[1]
    kh, kw = base.shape[-2:]
    cols = F.unfold(base.reshape(1, n, kh, kw), map_k, padding=map_k // 2)  # (1, n*m*m, kh*kw), channel-major
    return cols.reshape(n // conv_groups, conv_groups * map_k * map_k, kh * kw)


def refocus_delta_gemm(base: torch.Tensor, refocus_weight: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Same value as :func:`refocus_delta`, computed as ``bmm(W_r, patches)`` (see :func:`kernel_patches`)."""
    n, g, m, _ = refocus_weight.shape
    w = refocus_weight.reshape(n // g, g, g * m * m)
    return _PatchGemm.apply(w, patches).reshape(base.shape)


class _PatchGemm(torch.autograd.Function):
    """``bmm(w, patches)`` run in the orientation and the blocking BLAS is fast at for these skinny shapes.

    Forward computes ``(patches^T @ w^T)^T`` and backward ``grad @ patches^T``: with ``patches`` stored transposed
    (``Refocus`` caches it so) neither product copies ``w``, and on CPU (MKL) a depthwise 960-channel layer's
    forward + backward took 8.4 ms instead of autograd's 13.8 ms for plain ``bmm(w, patches)``. Autograd's own
    backward of the transposed product would return ``W_r``'s grad transposed and pay a full-size copy.

    On CPU the rows of ``w`` are also split into equal blocks run as one batched product: a single product with 9
    columns barely uses a second thread in MKL, and writing the gradient in blocks of ~64 rows keeps ``patches``
    in cache (960 channels, 2 threads: forward 3.7 -> 2.0 ms, backward 4.7 -> 2.5 ms; docs/performance.md).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, patches)
        groups, rows, cols = w.shape
        blocks = _cpu_row_blocks(w, torch.get_num_threads())
        w_blocks = w.reshape(groups * blocks, rows // blocks, cols)
        out = torch.bmm(_repeat_blocks(patches.transpose(1, 2), blocks), w_blocks.transpose(1, 2))
        return out.transpose(1, 2).reshape(groups, rows, -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, patches = ctx.saved_tensors  # one dtype: Refocus computes W_t outside autocast
        grad_w = grad_p = None
        if ctx.needs_input_grad[0]:
            groups, rows, cols = w.shape
            blocks = _cpu_row_blocks(w, max(torch.get_num_threads(), rows // 64))
            grad_blocks = grad.reshape(groups * blocks, rows // blocks, -1)
            grad_w = torch.bmm(grad_blocks, _repeat_blocks(patches.transpose(1, 2), blocks)).view(w.shape)
        if ctx.needs_input_grad[1]:
            grad_p = torch.bmm(w.transpose(1, 2), grad)
        return grad_w, grad_p


def _cpu_row_blocks(w: torch.Tensor, target: int) -> int:
    """Equal blocks to split ``w``'s rows into: about ``target`` on CPU, none elsewhere (cuBLAS needs no help)."""
    return _row_blocks(w.shape[1], target) if w.device.type == "cpu" else 1


@functools.cache
def _row_blocks(rows: int, target: int) -> int:
    """The divisor of ``rows`` closest to ``target`` (the number of equal row blocks to split a product into)."""
    return min((d for d in range(1, rows + 1) if rows % d == 0), key=lambda d: (abs(d - target), d))


def _repeat_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """``(G, a, b) -> (G * blocks, a, b)``, group ``i`` repeated for its blocks (a stride-0 view when ``G == 1``)."""
    groups = x.shape[0]
    if blocks == 1:
        return x
    return x.unsqueeze(1).expand(groups, blocks, *x.shape[1:]).reshape(groups * blocks, *x.shape[1:])


def conv_kind(conv: nn.Conv2d) -> str:
    """``dense`` (g = 1), ``depthwise`` (one input channel per group) or ``group`` (in between)."""
    if conv.groups == 1:
        return "dense"
    if conv.in_channels == conv.groups:
        return "depthwise"
    return "group"


# ----------------------------------------------------------------------------------------------- the module
class Refocus(nn.Module):
    """Parametrization ``W_b -> W_b + conv(W_b, W_r)`` holding the learnable ``refocus_weight`` (``W_r``).

    Two caches keep the cost off the hot path, both keyed on the tensors' version counters (bumped by every in-place
    update: optimizer steps, ``load_state_dict``), so they can never serve stale values:
    - the unfolded patches of a frozen ``W_b`` (the transform is then a single GEMM, forward and backward);
    - ``W_t`` itself while autograd is off (evaluation does not recompute it per batch).
    """

    # Dense convs (g = 1) give each 2-D kernel a private m x m filter, and their patch matrix is m*m times the
    # kernel's size (resnet18: 400 MB). On CPU the grouped conv (oneDNN) beat every other form we measured; on CUDA the
    # depthwise kernels behind it took 33 of resnet18's 52 ms per step (H100, batch 32) while the GEMM on cached
    # patches ran the 512-channel layer 4.4x faster (0.33 vs 1.45 ms). None: GEMM on CUDA only; True/False force it.
    dense_gemm: bool | None = None

    def __init__(self, weight_shape: torch.Size, conv_groups: int, map_k: int = 3, init: str = "xavier"):
        super().__init__()
        self.map_k = map_k
        self.conv_groups = conv_groups
        self.refocus_weight = nn.Parameter(torch.empty(refocus_shape(weight_shape, conv_groups, map_k)))
        init_refocus_weight(self.refocus_weight, init)
        self._patches: tuple[tuple, torch.Tensor] | None = None
        self._eval_weight: tuple[tuple, torch.Tensor] | None = None
        self.step_weight: torch.Tensor | None = None  # set by PerStepTransform for the micro-batches of one step

    @classmethod
    def from_weight(cls, refocus_weight: torch.Tensor) -> Refocus:
        """A parametrization holding a given ``W_r`` (its shape ``(n, g, m, m)`` determines everything else)."""
        n, g, m, _ = refocus_weight.shape
        p = cls((n, 1), g, m, init="zeros")
        p.refocus_weight = nn.Parameter(refocus_weight, requires_grad=refocus_weight.requires_grad)
        return p

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if self.step_weight is not None:
            return self.step_weight
        w_r = self.refocus_weight
        if not torch.is_grad_enabled():
            key = _cache_key(base, w_r)
            if self._eval_weight is None or self._eval_weight[0] != key:
                self._eval_weight = (key, self._compute(base, w_r))
            return self._eval_weight[1]
        self._eval_weight = None
        return self._compute(base, w_r)

    def _compute(self, base: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
        # W_t in the parameters' precision (fp32), like any weight under AMP: the conv that uses it casts it.
        with torch.autocast(base.device.type, enabled=False):
            return self._compute_fp32(base, w_r)

    def _compute_fp32(self, base: torch.Tensor, w_r: torch.Tensor) -> torch.Tensor:
        dense_conv = self.conv_groups == 1 and not self._dense_gemm(base)
        if dense_conv or base.requires_grad or torch.jit.is_scripting() or _is_compiling():
            return base + refocus_delta(base, w_r)  # a trainable base needs the graph through W_b
        return base + refocus_delta_gemm(base, w_r, self._frozen_patches(base))

    def _dense_gemm(self, base: torch.Tensor) -> bool:
        return base.device.type == "cuda" if self.dense_gemm is None else self.dense_gemm

    def _frozen_patches(self, base: torch.Tensor) -> torch.Tensor:
        key = (_cache_key(base), torch.is_inference_mode_enabled())  # inference tensors must not leak into training
        if self._patches is None or self._patches[0] != key:
            with torch.no_grad():  # stored transposed (same values): the layout _PatchGemm reads without copies
                patches = kernel_patches(base, self.map_k, self.conv_groups).transpose(1, 2).contiguous()
                self._patches = (key, patches.transpose(1, 2))
        return self._patches[1]

    def extra_repr(self) -> str:
        return f"map_k={self.map_k}, groups={self.conv_groups}, refocus_weight={tuple(self.refocus_weight.shape)}"


def _is_compiling() -> bool:
    return bool(getattr(torch, "compiler", None) and torch.compiler.is_compiling())


def _cache_key(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)


def init_refocus_weight(weight: torch.Tensor, init: str) -> None:
    """``xavier`` (paper), ``zeros`` (starts exactly at the pretrained model), ``kaiming`` (PyTorch's conv default)."""
    with torch.no_grad():
        if init == "xavier":
            nn.init.xavier_uniform_(weight)
        elif init == "zeros":
            nn.init.zeros_(weight)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        else:
            raise RefconvError(f"refocus init {init!r} is unknown: use one of {', '.join(INITS)}")


# ----------------------------------------------------------------------------------------------- model surgery
@dataclass
class RefocusedLayer:
    name: str
    kind: str
    kernel: tuple[int, int]
    weight_shape: tuple[int, ...]
    refocus_shape: tuple[int, ...]

    @property
    def refocus_params(self) -> int:
        return math.prod(self.refocus_shape)


@dataclass
class RefocusReport:
    """What :func:`refocus_model` did: refocused layers and skipped convs with the reason."""

    map_k: int
    layers: list[RefocusedLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def refocus_params(self) -> int:
        return sum(layer.refocus_params for layer in self.layers)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.kind] = out.get(layer.kind, 0) + 1
        return out

    def summary(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items()))
        return (f"refocused {len(self.layers)} convs ({kinds}), map_k={self.map_k}, "
                f"W_r params={self.refocus_params:,}; skipped {len(self.skipped)}")

    def table(self) -> str:
        rows = [f"{'layer':40s} {'kind':9s} {'kernel':8s} {'W_r shape':22s} {'W_r params':>11s}"]
        for layer in self.layers:
            kernel = "x".join(map(str, layer.kernel))
            rows.append(f"{layer.name:40s} {layer.kind:9s} {kernel:8s} {str(layer.refocus_shape):22s} "
                        f"{layer.refocus_params:>11,}")
        rows += [f"{name:40s} skipped: {why}" for name, why in self.skipped]
        rows.append(self.summary())
        return "\n".join(rows)


def refocus_model(
    model: nn.Module,
    map_k: int = 3,
    init: str = "xavier",
    exclude: Iterable[str] = (),
    base: str = "frozen",
    base_init: str = "pretrained",
) -> RefocusReport:
    """Inject RefConv in place into every ``nn.Conv2d`` (subclasses included) whose kernel is at least ``map_k``.

    ``exclude``: regular expressions searched in module names; matching convs are left alone. ``base``: ``frozen``
    (paper) or ``trainable``; ``base_init``: ``pretrained`` (paper) or ``random`` (the paper's Fig. 5 ablations).
    Returns a :class:`RefocusReport`; raises :class:`RefconvError` on bad arguments or when nothing is eligible.
    """
    _check_args(map_k, init, base, base_init)
    patterns = _compile_patterns(exclude)
    used_patterns: set[str] = set()
    report = RefocusReport(map_k=map_k)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or parametrize.is_parametrized(module, "weight"):
            continue
        kh, kw = module.kernel_size
        hits = [p.pattern for p in patterns if p.search(name)]
        if hits:
            used_patterns.update(hits)
            report.skipped.append((name, f"excluded by {hits[0]!r}"))
        elif kh == 1 and kw == 1:
            report.skipped.append((name, "1x1"))
        elif kh < map_k or kw < map_k:
            report.skipped.append((name, f"kernel {kh}x{kw} smaller than map_k={map_k}"))
        else:
            report.layers.append(_refocus_conv(name, module, map_k, init, base, base_init))
    for pattern in patterns:
        if pattern.pattern not in used_patterns:
            warnings.warn(f"refocus exclude pattern {pattern.pattern!r} matches no convolution", stacklevel=2)
    if not report.layers:
        too_small = [n for n, why in report.skipped if why.startswith("kernel")]
        hint = f" (map_k={map_k} is larger than all {len(too_small)} spatial kernels)" if too_small else ""
        raise RefconvError(f"refocus found no convolution to refocus{hint}: use a smaller odd map_k or fewer excludes")
    return report


def _refocus_conv(name: str, conv: nn.Conv2d, map_k: int, init: str, base: str, base_init: str) -> RefocusedLayer:
    if base_init == "random":
        with torch.no_grad():
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    shape = tuple(conv.weight.shape)
    p = Refocus(conv.weight.shape, conv.groups, map_k, init).to(conv.weight.device, conv.weight.dtype)
    parametrize.register_parametrization(conv, "weight", p)
    conv.parametrizations.weight.original.requires_grad_(base == "trainable")
    return RefocusedLayer(name, conv_kind(conv), tuple(conv.kernel_size), shape, tuple(p.refocus_weight.shape))


def _check_args(map_k: int, init: str, base: str, base_init: str) -> None:
    if not isinstance(map_k, int) or map_k < 1 or map_k % 2 == 0:
        raise RefconvError(f"refocus map_k={map_k!r} must be an odd positive integer (the paper uses 3)")
    if init not in INITS:
        raise RefconvError(f"refocus init {init!r} is unknown: use one of {', '.join(INITS)}")
    if base not in BASES:
        raise RefconvError(f"refocus base {base!r} is unknown: use one of {', '.join(BASES)}")
    if base_init not in BASE_INITS:
        raise RefconvError(f"refocus base_init {base_init!r} is unknown: use one of {', '.join(BASE_INITS)}")


def _compile_patterns(exclude: Iterable[str]) -> list[re.Pattern]:
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = []
    for text in exclude:
        try:
            patterns.append(re.compile(text))
        except re.error as e:
            raise RefconvError(f"refocus exclude pattern {text!r} is not a valid regular expression ({e})") from None
    return patterns


def refocused_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Name -> conv for every conv that currently carries a :class:`Refocus` parametrization."""
    return {
        name: m for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, Refocus) for p in m.parametrizations.weight)
    }


def refocus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All ``W_r`` tensors of a refocused model."""
    return [p for conv in refocused_convs(model).values() for p in conv.parametrizations.weight[0].parameters()]


def fuse_model(model: nn.Module) -> list[str]:
    """Replace every RefConv by the plain conv with weight ``W_t``, in place; returns the fused module names.

    Afterwards the model has the original module classes, parameter names and shapes (idempotent).
    """
    names = []
    for name, conv in refocused_convs(model).items():
        requires_grad = any(p.requires_grad for p in conv.parametrizations.weight.parameters())
        # Deep copies (EMA, verification) share parametrize's generated class with the original, and removal
        # deletes the `weight` property from that class: give this module a private copy of it first.
        cls = type(conv)
        conv.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        with torch.no_grad():
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        conv.weight.requires_grad_(requires_grad)
        names.append(name)
    return names


def is_refocus_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(REFOCUS_KEY) for k in state_dict)


def fuse_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fuse a refocused model's state dict into the original architecture's, without building the model.

    ``W_r``'s shape carries everything the transform needs (``n``, ``g``, ``m``), so this is exact and model-free.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(REFOCUS_KEY):
            continue
        if key.endswith(BASE_KEY):
            prefix = key[: -len(BASE_KEY)]
            w_r = state_dict.get(prefix + REFOCUS_KEY)
            if w_r is None:
                raise RefconvError(f"state dict has {key} but no {prefix + REFOCUS_KEY}: incomplete RefConv checkpoint")
            with torch.no_grad():
                w_t = Refocus.from_weight(w_r.float())(value.float())  # the module's own arithmetic, bit for bit
            out[prefix + ".weight"] = w_t.to(value.dtype)
        else:
            out[key] = value
    return out
