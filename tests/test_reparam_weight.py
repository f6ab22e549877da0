"""WN, CWN and OWN: the math against explicit references, exact fusing on a matrix of convs and on the paper's
architectures, exact start for WN, a measured start for CWN/OWN, skips, errors, deep copies, training steps."""

import copy

import pytest
import torch
from timm.layers import create_conv2d
from torch import nn
from torch.nn.utils import parametrize

from refconv_train import RefconvError, build_model, randomize_bn_stats
from refconv_train.methods.reparam.weight import (
    CWN_EPS,
    OWN_EPS,
    apply_weight_reparam,
    fuse_weight,
    weight_reparam_convs,
)
from refconv_train.methods.reparam.weight_math import (
    centred_weight_norm,
    inv_sqrt_psd,
    orthogonal_weight_norm,
    own_group_sizes,
)

METHODS = ("wn", "cwn", "own")


# Small ops on tiny inputs: one thread is several times faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread_module")


# ------------------------------------------------------------------------------------------------------ the math
def test_cwn_filters_have_zero_mean_and_norm_g():
    torch.manual_seed(0)
    v = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    g = torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.5
    w = centred_weight_norm(g, v, eps=0.0).reshape(6, -1)
    for o in range(6):  # explicit reference, filter by filter
        c = v[o].flatten() - v[o].flatten().mean()
        torch.testing.assert_close(w[o], g[o].flatten() * c / c.norm())
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w.norm(dim=1), g.flatten())


def test_own_group_sizes_are_balanced_and_at_most_fan_in_minus_one():
    assert own_group_sizes(8, 9) == [8]  # depthwise 3x3: zero-mean 3x3 kernels span 8 dimensions
    assert own_group_sizes(32, 9) == [8, 8, 8, 8]
    assert own_group_sizes(10, 9) == [5, 5]  # no lone remainder row
    assert own_group_sizes(96, 27) == [24, 24, 24, 24]
    assert own_group_sizes(512, 4608) == [512]
    assert own_group_sizes(100, 4608, group=64) == [50, 50]
    assert own_group_sizes(32, 9, group=64) == [8, 8, 8, 8]  # capped at fan_in - 1
    assert own_group_sizes(7, 2) == [1] * 7


def own_reference(v: torch.Tensor, group: int, eps: float) -> torch.Tensor:
    """OWN written out group by group with the eigen-decomposition, in float64."""
    rows = v.reshape(v.shape[0], -1).double()
    out, start = [], 0
    for size in own_group_sizes(rows.shape[0], rows.shape[1], group):
        z = rows[start:start + size]
        start += size
        zc = z - z.mean(dim=1, keepdim=True)
        cov = zc @ zc.T
        lam, u = torch.linalg.eigh(cov + (eps * cov.trace() / size) * torch.eye(size, dtype=torch.float64))
        out.append(u @ torch.diag(lam.rsqrt()) @ u.T @ zc)
    return torch.cat(out).reshape(v.shape)


@pytest.mark.parametrize("shape,group", [((10, 4, 3, 3), 0), ((16, 1, 3, 3), 0), ((12, 2, 1, 3), 4)])
def test_own_matches_the_explicit_eigen_decomposition(shape, group):
    torch.manual_seed(0)
    v = torch.randn(shape)
    torch.testing.assert_close(orthogonal_weight_norm(v, group, OWN_EPS).double(), own_reference(v, group, OWN_EPS),
                               atol=2e-4, rtol=0)


def test_own_rows_are_orthonormal_and_zero_mean():
    torch.manual_seed(0)
    v = torch.randn(40, 8, 3, 3) * 0.05  # fan-in 72: one group of 40 rows, well conditioned
    w = orthogonal_weight_norm(v).reshape(40, -1)
    torch.testing.assert_close(w @ w.T, torch.eye(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(40), atol=1e-6, rtol=0)
    torch.testing.assert_close(orthogonal_weight_norm(v * 30.0), orthogonal_weight_norm(v), atol=1e-5, rtol=0)


def test_inverse_square_root_gradient_matches_eigh_autograd_and_is_finite_at_degenerate_eigenvalues():
    torch.manual_seed(0)
    a = torch.randn(3, 5, 8, dtype=torch.float64)
    spd = (a @ a.transpose(1, 2) + 0.1 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    grad_out = torch.randn(3, 5, 5, dtype=torch.float64)
    ours, = torch.autograd.grad((inv_sqrt_psd(spd, 1e-12) * grad_out).sum(), spd)
    lam, u = torch.linalg.eigh(spd)
    ref, = torch.autograd.grad((u @ torch.diag_embed(lam.rsqrt()) @ u.transpose(1, 2) * grad_out).sum(), spd)
    torch.testing.assert_close(ours, ref)
    eye = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1).requires_grad_()  # all eigenvalues equal
    grad, = torch.autograd.grad((inv_sqrt_psd(eye, 1e-12) * grad_out[:2, :4, :4]).sum(), eye)
    sym = 0.5 * (grad_out[:2, :4, :4] + grad_out[:2, :4, :4].transpose(1, 2))
    torch.testing.assert_close(grad, -0.5 * sym)  # d(A^-1/2) at A = I is -dA / 2


# ------------------------------------------------------------------------------------------------ conv matrix
CONVS = {
    "dense": lambda: nn.Conv2d(4, 8, 3, padding=1, bias=False),
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
    "group": lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False),
    "stride2": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
    "dilation": lambda: nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False),
    "timm_same": lambda: create_conv2d(8, 8, 3, stride=2, padding="same"),  # Conv2dSame: dynamic padding
    "bias_5x5": lambda: nn.Conv2d(8, 16, 5, padding=2, bias=True),
    "kernel_1x3": lambda: nn.Conv2d(8, 8, (1, 3), padding=(0, 1), bias=False),
}


def conv_net(case: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = CONVS[case]()
    return nn.Sequential(nn.Conv2d(3, conv.in_channels, 1), conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every parametrization parameter off its start (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in weight_reparam_convs(model).values():
            for p in conv.parametrizations.weight.parameters():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))


def assert_fuses_exactly(model: nn.Module, fresh: nn.Module, x: torch.Tensor, tol: float = 1e-5,
                         deep_copy: bool = True) -> None:
    """Fuse (a deep copy of) ``model``; original classes and keys; strict load into ``fresh``; same eval outputs."""
    model.eval()
    with torch.no_grad():
        expected = model(x)
    names = list(weight_reparam_convs(model))
    twin = copy.deepcopy(model) if deep_copy else model
    assert fuse_weight(twin) == names
    assert {n: type(m) for n, m in twin.named_modules()} == {n: type(m) for n, m in fresh.named_modules()}
    fresh.load_state_dict(twin.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        diff = (fresh(x) - expected).abs().max().item()
    assert diff <= tol * max(1.0, expected.abs().max().item()), diff
    assert fuse_weight(twin) == []  # idempotent
    assert not any(parametrize.is_parametrized(m) for m in twin.modules())


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_conv_loads_strictly_into_the_original_and_matches(method, case):
    model = conv_net(case)
    randomize_bn_stats(model, seed=2)
    x = torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(3))  # odd size: "same" pads unevenly
    report = apply_weight_reparam(model, method, example=x)
    assert [layer.name for layer in report.layers] == ["1"]
    assert report.skipped == [("0", "1x1")]
    if method == "wn":
        assert report.start_max_abs_diff == 0.0
    else:
        assert report.start_max_abs_diff > 0.0
    perturb(model)
    assert_fuses_exactly(model, conv_net(case, seed=5), x)


# ------------------------------------------------------------------------------------------- start, skips, errors
def test_wn_starts_exactly_at_the_given_weights():
    model = build_model("mobilenetv2_050", num_classes=10, pretrained=False)
    randomize_bn_stats(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    report = apply_weight_reparam(model, "wn")
    assert report.start_max_abs_diff == 0.0
    assert report.added_params == sum(layer_conv.out_channels for layer_conv in weight_reparam_convs(model).values())
    for name, conv in weight_reparam_convs(model).items():
        assert torch.equal(conv.weight, before[name]), name


def test_cwn_starts_at_the_centred_kernel_with_the_same_centred_norm():
    model = conv_net("dense")
    w = model[1].weight.detach().clone()
    report = apply_weight_reparam(model, "cwn")
    rows = w.reshape(8, -1)
    assert torch.equal(model[1].weight, (rows - rows.mean(dim=1, keepdim=True)).reshape(w.shape))
    assert report.layers[0].added_params == 8 and report.start_max_abs_diff > 0
    g = model[1].parametrizations.weight.original0.flatten()
    torch.testing.assert_close(g, ((rows - rows.mean(dim=1, keepdim=True)).square().sum(1) + CWN_EPS).sqrt())


def test_skips_excluded_1x1_and_foreign_parametrized_convs_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    parametrize.register_parametrization(model[2], "weight", nn.Identity())  # someone else's (spectral norm, ...)
    report = apply_weight_reparam(model, "own", exclude=[r"^3$"], own_group=4)
    assert [layer.name for layer in report.layers] == ["0"]
    assert "2 groups of 4" in report.layers[0].detail  # fan-in 27, 8 rows, own_group=4
    assert dict(report.skipped) == {"1": "1x1", "2": "weight already parametrized", "3": "excluded by '^3$'"}
    assert list(weight_reparam_convs(model)) == ["0"]
    assert fuse_weight(model) == ["0"]  # the foreign parametrization is left alone
    assert parametrize.is_parametrized(model[2], "weight")
    assert "skipped: 1x1" in report.table()


def test_wn_skips_a_conv_with_an_all_zero_filter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with torch.no_grad():
        model[1].weight[2].zero_()
    report = apply_weight_reparam(model, "wn")
    assert [layer.name for layer in report.layers] == ["0"]
    assert report.skipped[0][0] == "1" and "all zero" in report.skipped[0][1]


def test_nothing_to_change_and_bad_arguments_are_one_line_errors():
    with pytest.raises(RefconvError, match="found no convolution"):
        apply_weight_reparam(nn.Sequential(nn.Conv2d(3, 4, 1)), "cwn")
    with pytest.raises(RefconvError, match="found no convolution"):
        apply_weight_reparam(nn.Sequential(nn.Conv2d(3, 4, 3)), "wn", exclude=["0"])
    with pytest.raises(RefconvError, match="unknown"):
        apply_weight_reparam(conv_net("dense"), "bn")
    with pytest.raises(RefconvError, match="non-negative"):
        apply_weight_reparam(conv_net("dense"), "own", own_group=-1)
    with pytest.raises(RefconvError, match="only applies"):
        apply_weight_reparam(conv_net("dense"), "wn", own_group=8)
    model = conv_net("dense")
    apply_weight_reparam(model, "cwn")
    with pytest.raises(RefconvError, match="already re-parameterized with cwn"):  # one method per model
        apply_weight_reparam(model, "own")


# --------------------------------------------------------------------------------------- copies, training, AMP
@pytest.mark.parametrize("method", METHODS)
def test_fusing_a_deep_copy_leaves_the_original_working(method):
    model = conv_net("group")
    apply_weight_reparam(model, method)
    perturb(model)
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    fuse_weight(twin)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), atol=1e-6, rtol=0)
    model.train()
    model(x).sum().backward()  # the original's parametrization still works, with autograd
    assert fuse_weight(model) == ["1"]


def train_net(seed: int = 0) -> nn.Module:
    """Dense and depthwise 3x3 convs with no BN after them (a train-mode BN would cancel the filters' scale g)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), CONVS["depthwise"](), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("method", METHODS)
def test_sgd_steps_change_the_parametrization_and_still_fuse_exactly(method):
    model = train_net()
    apply_weight_reparam(model, method)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if ".parametrizations." in n}
    assert len(params) == (2 if method == "own" else 4)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.eval()
    with torch.no_grad():
        before_step = model(x)  # fills the eval cache: the steps must invalidate it
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad.isfinite().all() for p in model.parameters())
        opt.step()
    for name, p in model.named_parameters():
        if name in params:
            assert not torch.equal(p, params[name]), name
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x), before_step)
    assert_fuses_exactly(model, train_net(seed=9), x)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_resumes_strictly_into_a_freshly_applied_model(method):
    model = conv_net("depthwise")
    apply_weight_reparam(model, method)
    perturb(model)
    resumed = conv_net("depthwise", seed=4)
    apply_weight_reparam(resumed, method)
    x = torch.randn(2, 3, 8, 8)
    resumed.eval()
    with torch.no_grad():
        resumed(x)  # fills the eval cache: loading must invalidate it
    resumed.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(resumed(x), model(x))


@pytest.mark.parametrize("method", ("cwn", "own"))
def test_weight_is_computed_in_fp32_under_autocast(method):
    model = conv_net("dense")
    apply_weight_reparam(model, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[1].weight.dtype == torch.float32
        out = model(torch.randn(2, 3, 8, 8))
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model[1].parametrizations.weight.parameters())


# --------------------------------------------------------------------------------------- the paper's architectures
ARCHS = ["mobilenetv2_100", "resnet18", "mobilenetv3_small_050", "efficientnet_b0",
         "torchvision:shufflenet_v2_x1_0", "convnext_atto"]


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_paper_architecture_fuses_into_the_plain_model(name, method):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, pretrained=False)
    randomize_bn_stats(model, seed=1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    report = apply_weight_reparam(model, method, example=x)
    assert report.layers and report.start_max_abs_diff is not None
    assert (report.start_max_abs_diff == 0.0) == (method == "wn")
    perturb(model)
    assert_fuses_exactly(model, build_model(name, num_classes=10, pretrained=False), x, deep_copy=False)
