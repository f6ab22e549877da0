"""PerStepTransform: W_t once per optimizer step gives plain autograd's gradients, alone and under DDP (gloo)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from nets import free_port, init_gloo, small_net
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from refconv_train import refocus_model
from refconv_train.methods.refconv import refocused_convs
from refconv_train.methods.refconv.per_step import PerStepTransform


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def micro_batches(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("base", ["frozen", "trainable"])
def test_gradients_equal_plain_autograd_under_accumulation(base: str) -> None:
    torch.manual_seed(0)
    plain = small_net().double()
    refocus_model(plain, base=base)
    per_step = copy.deepcopy(plain)
    batches = micro_batches(1)
    for x, y in batches:
        (F.cross_entropy(plain(x), y) / len(batches)).backward()
    transform = PerStepTransform(per_step)
    with transform.step():
        for x, y in batches:
            (F.cross_entropy(per_step(x), y) / len(batches)).backward()
        assert all(p.grad is None for n, p in per_step.named_parameters() if "parametrizations" in n)  # not yet
    expected, got = grads(plain), grads(per_step)
    assert set(got) == set(expected) and sum("refocus_weight" in n for n in got) == 3
    assert any(n.endswith(".original") for n in got) == (base == "trainable")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_an_abandoned_step_leaves_the_plain_parametrization() -> None:
    torch.manual_seed(0)
    model = small_net()
    refocus_model(model)
    x = torch.randn(2, 3, 8, 8)
    transform = PerStepTransform(model)
    with pytest.raises(RuntimeError, match="a failing micro-batch"), transform.step():
        pinned = [conv.parametrizations.weight[0].step_weight for conv in refocused_convs(model).values()]
        assert all(w is not None and w.requires_grad and w.is_leaf for w in pinned)
        raise RuntimeError("a failing micro-batch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # a W_t pinned from before this update would now be stale
    conv = refocused_convs(model)["0"]
    assert conv.parametrizations.weight[0].step_weight is None
    assert not torch.equal(conv.weight, pinned[0])
    model(x).sum().backward()  # plain autograd again
    assert conv.parametrizations.weight[0].refocus_weight.grad is not None


def _accumulate(ddp: DistributedDataParallel, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One step's micro-batches as a DDP trainer runs them: gradients synchronised on the last one only."""
    for i, (x, y) in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else ddp.no_sync()
        with sync:
            (F.cross_entropy(ddp(x), y) / len(batches)).backward()


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    init_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        reference = small_net().double()
        refocus_model(reference)
        candidate = copy.deepcopy(reference)
        if rank == 1:  # a rank that starts from other W_r: broadcast() must fix it
            with torch.no_grad():
                for conv in refocused_convs(candidate).values():
                    conv.parametrizations.weight[0].refocus_weight.add_(1.0)
        batches = micro_batches(10 + rank)  # every rank its own data
        ddp = DistributedDataParallel(reference)
        _accumulate(ddp, batches)
        transform = PerStepTransform(candidate, distributed=True)
        PerStepTransform.exclude_from_ddp(candidate)
        transform.broadcast()
        ddp2 = DistributedDataParallel(candidate)
        reduced = {n for n, p in candidate.named_parameters() if p.requires_grad} - set(ddp2.parameters_to_ignore)
        assert reduced and not any("parametrizations" in n for n in reduced)  # W_r is not in DDP's reducer
        with transform.step():
            _accumulate(ddp2, batches)
        torch.save({"expected": grads(reference), "got": grads(candidate)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_kernel_gradients_and_matches_plain_ddp(tmp_path) -> None:
    out = str(tmp_path / "grads")
    mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for r in results:
        assert set(r["got"]) == set(r["expected"])
        for name, expected in r["expected"].items():
            torch.testing.assert_close(r["got"][name], expected, rtol=1e-10, atol=1e-12, msg=name)
    for name, g in results[0]["got"].items():  # every rank steps with the same averaged gradient
        torch.testing.assert_close(results[1]["got"][name], g, rtol=0, atol=0, msg=name)


def test_compiled_model_with_per_step_transform_gives_eager_plain_gradients() -> None:
    """torch.compile (inductor, CPU): the W_t pinned per step is a graph input, gradients as eager plain autograd."""
    torch.manual_seed(0)
    plain = small_net()
    refocus_model(plain)
    compiled_model = copy.deepcopy(plain)
    x, y = micro_batches(3, 1)[0]
    x = x.float()
    F.cross_entropy(plain(x), y).backward()
    transform = PerStepTransform(compiled_model)
    with transform.step():
        F.cross_entropy(torch.compile(compiled_model)(x), y).backward()
    expected, got = grads(plain), grads(compiled_model)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_only_refconv_tensors_leave_ddps_reducer() -> None:
    """Other parametrizations (weight norm here) must still be all-reduced by DDP."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    refocus_model(model, base="trainable")
    torch.nn.utils.parametrizations.weight_norm(model[2])
    PerStepTransform.exclude_from_ddp(model)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored == {"0.parametrizations.weight.original", "0.parametrizations.weight.0.refocus_weight"}
    assert {n for n, _ in model.named_parameters() if "2.parametrizations" in n} == {
        "2.parametrizations.weight.original0", "2.parametrizations.weight.original1"}
