"""What training a refocused model does: only W_r (and the non-refocused parameters) learn, W_b stays put."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import refconv_train.methods.refconv.parametrization as refocus_lib
from refconv_train import RefconvError, build_model, refocus_model, refocus_parameters, refocused_convs


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mobilenetv2_050", num_classes=5)


def sgd_steps(model: nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=4e-5)
    model.train()
    for i in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_base_kernels_stay_frozen_while_refocus_weights_learn():
    model = small_model()
    refocus_model(model)
    convs = refocused_convs(model)
    bases = {n: c.parametrizations.weight.original.clone() for n, c in convs.items()}
    w_rs = {n: c.parametrizations.weight[0].refocus_weight.clone() for n, c in convs.items()}
    bn = model.bn1.weight.clone()
    sgd_steps(model)
    for n, c in convs.items():
        assert torch.equal(c.parametrizations.weight.original, bases[n]), n
        assert not torch.equal(c.parametrizations.weight[0].refocus_weight, w_rs[n]), n
    assert not torch.equal(model.bn1.weight, bn)  # the rest trains as usual


def test_gradients_reach_refocus_weights_and_not_base_kernels():
    model = small_model()
    refocus_model(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for conv in refocused_convs(model).values():
        assert conv.parametrizations.weight.original.grad is None
        g = conv.parametrizations.weight[0].refocus_weight.grad
        assert g is not None and g.abs().sum() > 0
    assert model.classifier.weight.grad is not None
    assert model.conv_head.weight.grad is not None  # 1x1 convs are not refocused but train


def test_trainable_parameter_count_matches_design_formula():
    model = small_model()
    plain = copy.deepcopy(model)
    report = refocus_model(model, map_k=3)
    targets = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) >= 3]
    refocus_count = sum(m.out_channels * m.in_channels // m.groups * m.groups * 9 for m in targets)  # n * g * m * m
    frozen = sum(m.weight.numel() for m in targets)
    total_plain = sum(p.numel() for p in plain.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.refocus_params == refocus_count
    assert trainable == total_plain - frozen + refocus_count
    assert sum(p.numel() for p in refocus_parameters(model)) == refocus_count


def test_zeros_init_reproduces_the_pretrained_model_exactly():
    model = small_model().eval()
    reference = copy.deepcopy(model)
    refocus_model(model, init="zeros")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_random_inits_follow_torch_init_bounds(init):
    conv = nn.Conv2d(16, 16, 3, groups=16)
    refocus_model(conv, init=init)
    w = conv.parametrizations.weight[0].refocus_weight  # (16, 16, 3, 3)
    fan = 16 * 9
    bound = math.sqrt(6 / (2 * fan)) if init == "xavier" else 1 / math.sqrt(fan)
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_ablation_trainable_base_learns_and_random_base_discards_pretrained():
    model = small_model()
    pretrained = model.conv_stem.weight.clone()
    refocus_model(model, base="trainable")
    sgd_steps(model)
    assert not torch.equal(model.conv_stem.parametrizations.weight.original, pretrained)
    model = small_model()
    refocus_model(model, base_init="random")
    base = model.conv_stem.parametrizations.weight.original
    assert not torch.equal(base, pretrained) and not base.requires_grad


def test_eval_does_not_recompute_refocused_kernels_per_batch(monkeypatch):
    model = small_model()
    refocus_model(model)
    calls = []
    real = refocus_lib.refocus_delta_gemm
    monkeypatch.setattr(refocus_lib, "refocus_delta_gemm", lambda *a: calls.append(1) or real(*a))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        first = len(calls)
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32))
    assert first > 0 and len(calls) == first
    sgd_steps(model, 1)  # weights changed: the next eval recomputes
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) > first


def test_exclude_skips_matching_convs_and_warns_on_unused_patterns():
    model = small_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = refocus_model(model, exclude=[r"^conv_stem$", r"no_such_layer"])
    assert "conv_stem" not in refocused_convs(model)
    assert ("conv_stem", "excluded by '^conv_stem$'") in report.skipped
    assert any("no_such_layer" in str(w.message) for w in caught)
    assert "depthwise" in report.table() and "1x1" in report.table()


@pytest.mark.parametrize("kwargs,message", [
    (dict(map_k=2), "odd"),
    (dict(map_k=0), "odd"),
    (dict(map_k=9), "larger than all"),
    (dict(init="normal"), "xavier"),
    (dict(base="free"), "frozen"),
    (dict(exclude=["("]), "regular expression"),
])
def test_bad_refocus_arguments_raise_one_line_errors(kwargs, message):
    with pytest.raises(RefconvError, match=message) as e:
        refocus_model(small_model(), **kwargs)
    assert "\n" not in str(e.value)


def test_refocused_kernel_is_computed_in_fp32_under_autocast():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    refocus_model(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.weight.dtype == torch.float32
        assert conv(torch.randn(1, 4, 5, 5)).dtype == torch.bfloat16  # the conv itself still runs in bf16
