"""OREPA on any model: its one online kernel against the paper's branches run as separate convs (forward and
gradients, float64), exact start, exact fuse into the original architecture (randomized BN statistics, perturbed
branches, strict load into a fresh model), skip reasons, and living beside the other methods."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d, create_conv2d
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from refconv_train import RefconvError, build_model, randomize_bn_stats, refocus_model
from refconv_train.methods.refconv import fuse_refocus as fuse_model
from refconv_train.methods.reparam.orepa import apply_orepa, fuse_orepa, orepa_convs
from refconv_train.methods.reparam.orepa_kernel import OrepaKernel
from refconv_train.methods.reparam.structural import apply_structural, fuse_structural
from refconv_train.methods.reparam.weight import apply_weight_reparam, fuse_weight

pytestmark = pytest.mark.usefixtures("one_thread_module")

CONVS = {  # name -> a conv (input: 6 channels), plain integer padding so the reference can pad by hand
    "dense": lambda: nn.Conv2d(6, 8, 3, padding=1, bias=False),
    "dense_bias": lambda: nn.Conv2d(6, 8, 3, padding=1, bias=True),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False),  # groups > 4: inner 2 C_in
    "group2": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=False),  # groups <= 4: inner C_in
    "dw_multiplier": lambda: nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False),
    "stride2": lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False),
    "dw_5x5_stride2": lambda: nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6, bias=False),
    "dilation2_group3": lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False),
    "non_square_3x5": lambda: nn.Conv2d(6, 7, (3, 5), padding=(1, 2), bias=False),  # odd C_out: the prior's half
    "valid_2x2_stride2": lambda: nn.Conv2d(6, 8, 2, stride=2, bias=False),
    "no_padding": lambda: nn.Conv2d(6, 6, 3, bias=False),
}
X = torch.randn(2, 6, 11, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Every OREPA parameter moved (scales off their 0 / 1 start, the identity-based 1x1's delta off 0), then random
    BatchNorm statistics: no branch can hide behind a zero scale or an identity BN."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kernel in (m for m in model.modules() if isinstance(m, OrepaKernel)):
            for p in kernel.parameters():
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
    randomize_bn_stats(model, seed=seed + 1)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def prior_by_loops(channels: int, kh: int, kw: int) -> torch.Tensor:
    """The authors' ``fre_init`` (written for 3x3), with 3 replaced by the kernel's height / width."""
    prior = torch.zeros(channels, 1, kh, kw, dtype=torch.float64)
    half = channels / 2
    for i in range(channels):
        for h in range(kh):
            for w in range(kw):
                prior[i, 0, h, w] = (math.cos(math.pi * (h + 0.5) * (i + 1) / kh) if i < half
                                     else math.cos(math.pi * (w + 0.5) * (i + 1 - half) / kw))
    return prior


def branches_as_convs(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's block run branch by branch on the zero-padded input, each output scaled per channel, summed."""
    p, w = conv.parametrizations.weight[0], conv.parametrizations.weight.original
    s, d, g = conv.stride, conv.dilation, conv.groups
    (ph, pw), (kh, kw) = conv.padding, conv.kernel_size
    cout, cin = conv.out_channels, conv.in_channels

    def pad(t):
        return F.pad(t, (pw, pw, ph, ph))

    origin = F.conv2d(pad(x), w, None, s, 0, d, g)
    size = origin.shape[-2:]
    z = pad(F.conv2d(x, p.avg_1x1, groups=g))
    avg = F.avg_pool2d(z, (kh, kw), s) if d == (1, 1) else \
        F.conv2d(z, torch.ones(cout, 1, kh, kw, dtype=x.dtype) / (kh * kw), None, s, 0, d, cout)
    prior = F.conv2d(pad(F.conv2d(x, p.prior_1x1, groups=g)), prior_by_loops(cout, kh, kw), None, s, 0, d, cout)
    inner = p.delta_1x1.shape[0]
    assert inner == (cin if g <= 4 else 2 * cin)  # the authors' internal width of the 1x1 -> kxk branch
    eye = torch.zeros(inner, cin // g, 1, 1, dtype=x.dtype)
    for t in range(inner):  # the authors' id_tensor: internal channel t copies input t mod (C_in / g) of its group
        eye[t, t % (cin // g)] = 1.0
    one_kxk = F.conv2d(pad(F.conv2d(x, eye + p.delta_1x1, groups=g)), p.conv_kxk, None, s, 0, d, g)
    cy, cx = (kh - 1) // 2, (kw - 1) // 2  # the 1x1 reads the centre tap (top/left of centre for an even kernel)
    one = F.conv2d(pad(x)[:, :, cy * d[0]:, cx * d[1]:], p.conv_1x1, None, s, 0, 1, g)[..., : size[0], : size[1]]
    separable = F.conv2d(F.conv2d(pad(x), p.dw, None, s, 0, d, cin), p.pw, None, 1, 0, 1, g)
    out = sum(y * p.scale[b].reshape(1, -1, 1, 1) for b, y in enumerate((origin, avg, prior, one_kxk, one, separable)))
    return out if conv.bias is None else out + conv.bias.reshape(1, -1, 1, 1)


def test_prior_is_the_authors_cosine_basis():
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    apply_orepa(conv)
    prior = conv[0].parametrizations.weight[0].prior
    torch.testing.assert_close(prior.double(), prior_by_loops(5, 3, 3), rtol=0, atol=1e-7)
    assert prior[0, 0, :, 0].tolist() == pytest.approx([math.cos(math.pi * (h + 0.5) / 3) for h in range(3)])


@pytest.mark.parametrize("case", list(CONVS))
def test_online_kernel_equals_the_branches_run_as_separate_convs_forward_and_gradients(case):
    torch.manual_seed(0)
    model = nn.Sequential(CONVS[case]()).double()
    apply_orepa(model, example=X)
    perturb(model)
    conv = model[0]
    model.train()
    x = X.clone().requires_grad_(True)
    online, reference = conv(x), branches_as_convs(conv, x)
    torch.testing.assert_close(online, reference, rtol=1e-10, atol=1e-10)
    r = torch.randn(online.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    wrt = [x, *conv.parameters()]  # the input, W, the bias, every branch parameter
    assert len(wrt) >= 10
    for a, b in zip(torch.autograd.grad((online * r).sum(), wrt), torch.autograd.grad((reference * r).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_new_branches_start_at_zero_scale_and_only_the_scales_get_a_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8))
    weight = model[0].weight.detach().clone()
    apply_orepa(model)
    assert torch.equal(model[0].weight, weight)  # the pretrained kernel bit for bit
    kernel = model[0].parametrizations.weight[0]
    assert kernel.scale[:, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    model(torch.randn(2, 6, 9, 9)).square().sum().backward()
    assert kernel.scale.grad[1:].abs().sum() > 0  # the new branches' scales move first ...
    for name in ("avg_1x1", "prior_1x1", "delta_1x1", "conv_kxk", "conv_1x1", "dw", "pw"):
        assert getattr(kernel, name).grad.abs().max() == 0, name  # ... their weights once their scale is off 0


def test_branch_scale_one_is_the_authors_init_with_the_pretrained_kernel_kept_at_scale_one():
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1))
    apply_orepa(model, branch_scale=1.0)
    assert model[0].parametrizations.weight[0].scale[:, 3].tolist() == [1.0, 0.25, 0.0, 0.5, 1.0, 0.5]


def small_net() -> nn.Module:
    """Dense, depthwise, grouped (groups <= 4 and > 4), strided, dilated and timm "same" convs, BN after each."""
    def block(conv):
        return [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU()]
    return nn.Sequential(
        *block(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)),
        *block(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)),
        *block(nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)),
        *block(nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=8, bias=False)),
        *block(create_conv2d(16, 16, 5, stride=2, padding="same", depthwise=True)),  # timm's Conv2dSame
        *block(nn.Conv2d(16, 8, 1, bias=False)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def check_exact_start_and_fuse(make, x: torch.Tensor, **apply) -> tuple:
    """apply (exact start) -> perturb -> fuse -> strict load into a fresh model -> the same outputs (float64)."""
    torch.manual_seed(0)
    model = make().double()
    classes = {n: type(m) for n, m in model.named_modules()}
    report = apply_orepa(model, example=x, **apply)
    assert report.start_max_abs_diff == 0.0 and report.layers
    perturb(model)
    before = eval_out(model, x)
    assert fuse_orepa(model) == [layer.name for layer in report.layers]
    assert fuse_orepa(model) == [] and not orepa_convs(model)  # idempotent
    assert {n: type(m) for n, m in model.named_modules()} == classes
    fresh = make().double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    diff = (eval_out(fresh, x) - before).abs().max().item()
    assert diff <= 1e-10 * max(1.0, before.abs().max().item()), f"max abs diff {diff}"
    return report, diff


def test_small_net_of_every_conv_kind_fuses_exactly_and_loads_strictly():
    x = torch.randn(2, 3, 21, 23, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # uneven "same"
    report, _ = check_exact_start_and_fuse(small_net, x)
    assert [layer.kind for layer in report.layers] == ["dense", "depthwise", "group", "group", "depthwise"]
    assert report.skipped == [("15", "1x1")]


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_050", "tf_mobilenetv3_small_minimal_100",
                                  "torchvision:mnasnet0_5"])
def test_architecture_starts_exactly_and_fuses_into_a_fresh_model(name):
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report, _ = check_exact_start_and_fuse(lambda: build_model(name, num_classes=10), x)
    same = [n for n, m in build_model(name, num_classes=10).named_modules() if isinstance(m, Conv2dSame)]
    assert set(same) <= {layer.name for layer in report.layers}  # timm's dynamic "same" convs are taken
    assert bool(same) == name.startswith("tf_")


def test_skip_reasons_and_other_methods_refuse_a_model_orepa_holds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),  # 0: OREPA
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),  # 2: excluded
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),  # 4: 1x1
        StdConv2d(8, 8, 3, padding=1),  # 6: custom forward
    )
    report = apply_orepa(model, exclude=[r"^2$"])
    assert [layer.name for layer in report.layers] == ["0"]
    assert dict(report.skipped) == {"2": "excluded by '^2$'", "4": "1x1",
                                    "6": "custom forward (StdConv2d): its weight use is unknown"}
    # One method per model: every other method refuses it, naming OREPA's conv, and changes nothing.
    for apply in (lambda: apply_weight_reparam(model, "wn", exclude=[r"^6$"]),
                  lambda: apply_structural(model, "dbb", exclude=[r"^6$"]), lambda: refocus_model(model)):
        with pytest.raises(RefconvError, match=r"already re-parameterized with orepa \(conv '0'\)"):
            apply()
    x = torch.randn(2, 3, 8, 8)
    before = eval_out(model, x)
    assert fuse_weight(model) == [] and fuse_model(model) == [] and fuse_structural(model) == []  # not theirs
    assert list(orepa_convs(model)) == ["0"] and fuse_orepa(model) == ["0"]
    torch.testing.assert_close(eval_out(model, x), before, rtol=0, atol=1e-5)


def test_orepa_refuses_a_model_another_method_holds_and_applies_after_its_fuse():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    refocus_model(model, exclude=[r"^[24]$"], check_base=False)
    with pytest.raises(RefconvError, match=r"orepa: the model is already re-parameterized with RefConv \(conv '0'\)"):
        apply_orepa(model)
    assert orepa_convs(model) == {}
    fuse_model(model)
    assert [layer.name for layer in apply_orepa(model).layers] == ["0", "2", "4"]


def test_nothing_to_change_and_bad_branch_scale_are_one_line_errors():
    with pytest.raises(RefconvError, match=r"orepa found no convolution to change \(1 1x1\)"):
        apply_orepa(nn.Sequential(nn.Conv2d(3, 8, 1)))
    for bad in (float("nan"), float("inf"), "0", True, None):
        with pytest.raises(RefconvError, match="branch_scale") as err:
            apply_orepa(nn.Sequential(nn.Conv2d(3, 8, 3)), branch_scale=bad)
        assert "\n" not in str(err.value)


def test_sgd_steps_train_every_branch_and_the_model_still_fuses_exactly():
    torch.manual_seed(0)
    model = small_net().double()
    apply_orepa(model)
    kernels = [c.parametrizations.weight[0] for c in orepa_convs(model).values()]
    start = [copy.deepcopy(k.state_dict()) for k in kernels]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    for kernel, before in zip(kernels, start):
        for key, value in kernel.state_dict().items():
            assert not torch.equal(value, before[key]), key  # scales moved at step 1, the branch weights after
    randomize_bn_stats(model, seed=2)
    before = eval_out(model, x)
    fuse_orepa(model)
    fresh = small_net().double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert (eval_out(fresh, x) - before).abs().max().item() < 1e-12


def test_applied_model_deep_copies_and_resumes_from_its_state_dict():
    torch.manual_seed(0)
    model = small_net()
    apply_orepa(model)
    perturb(model)
    x = torch.randn(2, 3, 15, 15)
    expected = eval_out(model, x)  # fills the eval cache: copies must not carry it over stale
    twin = copy.deepcopy(model)  # e.g. an EMA copy (torch refuses to pickle parametrized modules: state dicts)
    resumed = small_net()
    apply_orepa(resumed)
    resumed.load_state_dict(model.state_dict(), strict=True)  # branches and scales are ordinary parameters
    for other in (twin, resumed):
        assert torch.equal(eval_out(other, x), expected)
    fuse_orepa(twin)
    assert orepa_convs(model) and (eval_out(twin, x) - expected).abs().max().item() < 1e-5
    with torch.no_grad():  # the cached eval kernel follows an in-place parameter change
        next(iter(orepa_convs(model).values())).parametrizations.weight[0].scale.add_(0.5)
    assert not torch.equal(eval_out(model, x), expected)


def test_bf16_autocast_computes_the_kernel_in_fp32_and_keeps_the_conv_output_dtype():
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1))
    apply_orepa(model, branch_scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model[0].weight.dtype == torch.float32
        assert model(X.float()).dtype == torch.bfloat16


# The project's by-hand matrix (docs/usage.md): every conv kind, timm's "same" convs, attention hybrids at 224 px.
MATRIX = {"efficientnet_b0": 64, "mixnet_s": 64, "hrnet_w18_small": 64, "dla34": 64, "repghostnet_050": 64,
          "mobileone_s0": 64, "resnext26ts": 64, "tf_mobilenetv3_small_minimal_100": 64, "levit_conv_128s": 224,
          "coatnet_nano_rw_224": 224, "torchvision:mnasnet0_5": 64, "torchvision:googlenet": 64,
          "torchvision:regnet_y_400mf": 64, "torchvision:squeezenet1_1": 64}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_matrix_architecture_starts_exactly_and_fuses_into_a_fresh_model(name):
    size = MATRIX[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report, diff = check_exact_start_and_fuse(lambda: build_model(name, num_classes=10), x)
    print(f"\n{name}: changed {len(report.layers)}, skipped {len(report.skipped)} "
          f"({', '.join(sorted({why for _, why in report.skipped}))}), fused max abs diff {diff:.3g}")
