"""Where a conv's branch sum joins the network, and how the fuse folds it back: after the conv's own BatchNorm.

The authors' ACBlock, RepVGGBlock and DiverseBranchBlock compute ``BN(conv x) + sum_b BN_b(branch_b x)``: the branches
are summed AFTER the conv's BN. Summed before it, a train-mode BN would normalize them away (each channel's batch
variance back to 1 whatever the branches add). Here the conv and its BN stay the model's own modules, so two forward
hooks, module-level functions (deep copies and pickles keep them), do the sum: the conv's (:func:`run_branches`)
computes the branch sum and hangs it on the conv's output tensor; the BN's (:func:`add_after_bn`) takes it off its
input (the very tensor: ``bn_pairs`` paired them because the BN reads the conv's output and nothing else does) and adds
it to its output. timm's BatchNorm + activation modules (``BatchNormAct2d``, ``SyncBatchNormAct``: batch norm, then
``self.drop``, then ``self.act``) take it before their activation, as the authors' blocks do: a pre-hook on the BN
hands it to a pre-hook on ``drop``. BN subclasses with another forward are not summed after (apply skips the conv,
:func:`cannot_sum_after`). A conv that feeds no BatchNorm takes the sum on its own output (its bias absorbs the
branch bias).

The pair is found once, at apply, and kept on ``conv.rep_branches.site`` as ``(parent module, child name, BN name)``:
a plain attribute, no state-dict key, shared by deep copies (EMA) and pickles as one object graph. The fuse needs no
forward. The conv hook looks the BN up there on every call and re-installs the BN hook on whatever module holds that
place, because ``SyncBatchNorm.convert_sync_batchnorm`` replaces BNs without their hooks.

Fuse (eval mode, exact): ``BN(conv x) + k x + b`` is ``BN'(conv' x)`` with the BN's scale ``s = gamma / sigma``
folded into the conv, ``conv' = conv * s + k``, and the BN left an affine shift (mean 0, var ``1 - eps``, gamma 1,
``beta' = beta - mu s + b``; ``kernel_algebra.fold_sum_after_bn``). Nothing divides by gamma, so a small or zero gamma
costs no precision, as the authors' deploy conv (kernel and bias, its BN folded in) does not either.
"""

from __future__ import annotations

import torch
from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import RefconvError
from . import kernel_algebra as T
from .branches import RepBranches

_SUM = "_rep_branch_sum"  # the attribute on a conv's output tensor that carries its branch sum to the BN
_PLAIN = (_BatchNorm.forward, nn.SyncBatchNorm.forward)  # output = the normalized input
_NORM_ACT = (BatchNormAct2d.forward, SyncBatchNormAct.forward)  # normalized, then self.drop, then self.act


def cannot_sum_after(bn: nn.Module) -> str | None:
    """Why the branches cannot be summed after this BatchNorm (None: they can)."""
    if type(bn).forward in _PLAIN or (type(bn).forward in _NORM_ACT and isinstance(getattr(bn, "drop", None),
                                                                                  nn.Module)):
        return None
    return f"its BatchNorm ({type(bn).__name__}) has its own forward: where to sum the branches after it is unknown"


def run_branches(conv: nn.Conv2d, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """The conv's forward hook: its branch sum, added to its output, or handed to its BN on the output tensor."""
    rep: RepBranches = conv.rep_branches
    branch_sum = rep(conv, args[0]).to(output.dtype)
    bn = site_bn(rep)
    if bn is None:
        return output + branch_sum
    _install(bn)
    setattr(output, _SUM, branch_sum)
    return None


def _pop_sum(x) -> torch.Tensor | None:
    return x.__dict__.pop(_SUM, None) if isinstance(x, torch.Tensor) else None


def add_after_bn(bn: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """A plain BN's forward hook: its output plus the branch sum its input carries (popped: held no longer than
    needed)."""
    branch_sum = _pop_sum(args[0] if args else None)
    return None if branch_sum is None else output + branch_sum.to(output.dtype)


def hand_to_drop(bn: nn.Module, args: tuple) -> None:
    """A timm BN + activation's forward pre-hook: the branch sum its input carries goes to its ``drop`` module."""
    branch_sum = _pop_sum(args[0] if args else None)
    if branch_sum is not None:
        bn.drop.__dict__[_SUM] = branch_sum


def add_before_act(drop: nn.Module, args: tuple) -> tuple | None:
    """The forward pre-hook of a timm BN + activation's ``drop``: the normalized input plus the branch sum."""
    branch_sum = drop.__dict__.pop(_SUM, None)
    return None if branch_sum is None else (args[0] + branch_sum.to(args[0].dtype), *args[1:])


def _hooks(bn: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """(module, kind, function) of every hook that sums after ``bn``."""
    if type(bn).forward in _NORM_ACT:
        return [(bn, "pre", hand_to_drop), (bn.drop, "pre", add_before_act)]
    return [(bn, "post", add_after_bn)]


def _install(bn: nn.Module) -> None:
    """Install the hooks that are missing (all of them on a BN that SyncBN conversion put in the old one's place)."""
    for module, kind, fn in _hooks(bn):
        hooks = module._forward_pre_hooks if kind == "pre" else module._forward_hooks
        if not any(h is fn for h in hooks.values()):
            (module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook)(fn)


def site_bn(rep: RepBranches) -> _BatchNorm | None:
    """The BatchNorm the branches are summed after (None: on the conv's output)."""
    if rep.site is None:
        return None
    parent, key, name = rep.site
    bn = parent._modules.get(key)
    if not isinstance(bn, _BatchNorm):
        raise RefconvError(f"the BatchNorm {name} that the {rep.method} branches are summed after is gone "
                           f"({type(bn).__name__} in its place): re-apply the method after changing the model")
    return bn


def attach(conv: nn.Conv2d, rep: RepBranches, site: tuple[nn.Module, str, str] | None) -> None:
    """Give ``conv`` its branches, summed after the BN at ``site`` (``(parent, child name, BN name)``) or on its
    output."""
    rep.site = site
    conv.rep_branches = rep
    conv.register_forward_hook(run_branches)
    bn = site_bn(rep)
    if bn is not None:
        _install(bn)


def _remove_hook(module: nn.Module, hook) -> None:
    for key in [k for k, fn in module._forward_hooks.items() if fn is hook]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
    for key in [k for k, fn in module._forward_pre_hooks.items() if fn is hook]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def folding(conv: nn.Conv2d, name: str):
    """Check that ``conv``'s branches fold into its weight and bias sink (conv bias, or its BN's beta / running mean)
    and return the function that does it in place and removes them and both hooks (the original modules, parameter
    names and shapes). Nothing changes before every conv is checked: a failed fuse leaves the model as it was."""
    rep: RepBranches = conv.rep_branches
    with torch.no_grad():
        kernel, bias = rep.kernel_bias()
        bn = site_bn(rep)
        if bn is not None:
            if not 0 <= bn.eps < 1:  # the folded BN keeps var + eps = 1 with var = 1 - eps
                raise RefconvError(f"cannot fuse {name}: its BatchNorm {rep.site[2]} has eps {bn.eps:g}, outside "
                                   f"[0, 1); exclude {name}")

            def as_kernel_dtype(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.detach().to(kernel.dtype)

            folded = T.fold_sum_after_bn(*map(as_kernel_dtype, (conv.weight, conv.bias)), kernel, bias,
                                         *map(as_kernel_dtype, (bn.running_mean, bn.running_var, bn.weight, bn.bias)),
                                         bn.eps)
            bad = next((k for k, v in folded.items() if v is not None and not torch.isfinite(v).all()), None)
            if bad is not None:
                raise RefconvError(f"cannot fuse {name}: folding its BatchNorm {rep.site[2]} and the {rep.method} "
                                   f"branches gives a non-finite {bad} (did the run diverge?)")

    @torch.no_grad()
    def fold() -> None:
        if bn is None:
            conv.weight.add_(kernel.to(conv.weight.dtype))
            conv.bias.add_(bias.to(conv.bias.dtype))
        else:
            targets = {"weight": conv.weight, "conv_bias": conv.bias, "mean": bn.running_mean,
                       "var": bn.running_var, "gamma": bn.weight, "beta": bn.bias}
            for key, target in targets.items():
                if target is not None:
                    target.copy_(folded[key].to(target.dtype))
            for module, _, fn in _hooks(bn):
                _remove_hook(module, fn)
        _remove_hook(conv, run_branches)
        del conv.rep_branches

    return fold
