"""Step normalisation: lambda against an explicit Jacobian, the lr each group really gets, the size of one step,
and the same step under DDP as in one process."""

from __future__ import annotations

import copy

import nets
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian
from torch.nn.parallel import DistributedDataParallel

from refconv_train import RefconvError, refocus_model
from refconv_train.config import OptimConfig
from refconv_train.methods.refconv import refocus_delta, refocus_param_groups, refocus_shape, refocused_convs, step_gain
from refconv_train.methods.refconv.per_step import PerStepTransform
from refconv_train.run.factories import build_scheduler, build_sgd


@pytest.mark.parametrize("shape,groups", [((6, 1, 3, 3), 6), ((6, 2, 5, 5), 3), ((4, 3, 3, 3), 1),
                                          ((4, 3, 3, 5), 1)], ids=["depthwise", "group", "dense", "dense-3x5"])
def test_step_gain_is_the_mean_eigenvalue_of_the_explicit_jacobian(shape, groups):
    base = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w_r = torch.zeros(refocus_shape(shape, groups, 3), dtype=torch.float64)
    a = jacobian(lambda r: refocus_delta(base, r), w_r).reshape(base.numel(), w_r.numel())  # A: W_r -> W_t - W_b
    expected = torch.linalg.eigvalsh(a @ a.T).mean()  # = ||A||_F^2 / numel(W_t)
    assert step_gain(base, 3, groups) == pytest.approx(float(expected), rel=1e-10)


def small_net() -> nn.Module:
    """A wider depthwise conv (larger lambda) than the shared one, a dense stem (small lambda), a grouped conv."""
    return nets.small_net(channels=32, groups=4)


def optimizer_for(model: nn.Module, step_norm: str, lr: float = 0.1, warmup: int = 0, **optim):
    """The optimizer and scheduler refconv-train builds (fused SGD, timm's cosine with lr_scale), at step 0."""
    o = OptimConfig(lr=lr, epochs=10, warmup_epochs=warmup, **optim)
    opt = build_sgd(refocus_param_groups(model, step_norm), lr, o)
    scheduler = build_scheduler(opt, o, steps_per_epoch=1)
    scheduler.step_update(num_updates=0)
    return opt, scheduler


@pytest.mark.parametrize("warmup", [0, 2])
def test_each_refocus_weight_gets_lr_over_its_layers_step_gain(warmup):
    torch.manual_seed(0)
    model = small_net()
    report = refocus_model(model, init="zeros")
    opt, scheduler = optimizer_for(model, "layer", warmup=warmup, momentum=0.0, weight_decay=0.0)
    convs = refocused_convs(model)
    plain_lr = opt.param_groups[0]["lr"]
    assert len(opt.param_groups) == 1 + len(convs)
    for layer, group in zip(report.layers, opt.param_groups[1:]):
        w_r = convs[layer.name].parametrizations.weight[0].refocus_weight
        assert group["params"] == [w_r] and group["lr"] == pytest.approx(plain_lr / layer.step_gain, rel=1e-12)
    # The lr really applied: one step moves W_r by exactly lr / lambda times its gradient.
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    before = {n: c.parametrizations.weight[0].refocus_weight.detach().clone() for n, c in convs.items()}
    opt.step()
    for layer in report.layers:
        w_r = convs[layer.name].parametrizations.weight[0].refocus_weight
        torch.testing.assert_close(w_r.detach() - before[layer.name], -plain_lr / layer.step_gain * w_r.grad)
    scheduler.step_update(num_updates=1)  # later steps keep the ratio
    assert opt.param_groups[1]["lr"] == pytest.approx(opt.param_groups[0]["lr"] / report.layers[0].step_gain)


def test_groups_hold_every_trainable_parameter_once_and_none_is_one_group():
    model = small_net()
    refocus_model(model, base="trainable")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step_norm in ("none", "layer"):
        groups = refocus_param_groups(model, step_norm)
        held = [p for g in groups for p in g["params"]]
        assert len(held) == len(trainable) and {id(p) for p in held} == {id(p) for p in trainable}
    assert len(refocus_param_groups(model, "none")) == 1  # the layout of plain training (old checkpoints resume)
    decayed = refocus_param_groups(model, "none", refocus_weight_decay=0.01)
    assert len(decayed) == 2 and decayed[1]["weight_decay"] == 0.01 and "weight_decay" not in decayed[0]
    with pytest.raises(RefconvError, match="step_norm 'lambda' is unknown"):
        refocus_param_groups(model, "lambda")


def kernel_steps(step_norm: str, lr: float = 1e-3) -> dict[str, float]:
    """Per refocused layer: ||W_t change|| after one SGD step of a RefConv model (init zeros, so the same function
    and the same dL/dW_t), divided by the kernel change plain training of that kernel makes at the same lr."""
    torch.manual_seed(0)
    plain = timm.create_model("mobilenetv2_050", num_classes=5).eval()  # eval: BN statistics stay put
    refocused = copy.deepcopy(plain)
    refocus_model(refocused, init="zeros")
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3])
    changes = []
    for model, norm in ((plain, "none"), (refocused, step_norm)):
        opt, _ = optimizer_for(model, norm, lr=lr, momentum=0.0, weight_decay=0.0)
        before = {n: c.weight.detach().clone() for n, c in refocused_convs(refocused).items()}
        F.cross_entropy(model(x), y).backward()
        opt.step()
        changes.append({n: float((model.get_submodule(n).weight.detach() - w).norm()) for n, w in before.items()})
    return {n: changes[1][n] / changes[0][n] for n in changes[0]}


def test_one_normalised_step_moves_every_kernel_about_as_far_as_plain_training():
    ratios = kernel_steps("layer")
    assert len(ratios) == 18
    assert all(0.2 < r < 5 for r in ratios.values()), ratios
    # Without it the steps are off by orders of magnitude, both ways (what this test exists to catch).
    raw = kernel_steps("none")
    assert max(raw.values()) > 20 and min(raw.values()) < 0.1, raw


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)


def stepped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ddp: bool = False) -> None:
    """Two SGD steps with step normalisation (momentum, weight decay), the per-step transform, eval-mode BN."""
    opt, scheduler = optimizer_for(model, "layer")
    transform = PerStepTransform(model, distributed=ddp)
    net = model
    if ddp:
        PerStepTransform.exclude_from_ddp(model)
        transform.broadcast()
        net = DistributedDataParallel(model)
    for step in range(2):
        with transform.step():
            F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler.step_update(num_updates=step + 1)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    nets.init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = small_net().double().eval()
        refocus_model(model)
        x, y = batch()
        half = len(y) // world
        stepped(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], ddp=True)
        torch.save(model.state_dict(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_with_step_norm_matches_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "weights")
    mp.spawn(_ddp_worker, args=(2, nets.free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = small_net().double().eval()
    refocus_model(model)
    stepped(model, *batch())
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for name, expected in model.state_dict().items():
            torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=1e-12, msg=name)
