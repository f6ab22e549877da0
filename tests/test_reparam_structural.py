"""ACB, RepVGG and DBB on any model: exact start, exact fuse into the original architecture, skip reasons, and the
conv -> BatchNorm pairs that take a branch bias. Every fuse check randomizes ALL BatchNorm statistics first (branch
BNs included, with non-zero gammas) and perturbs the branch convs, so no branch can hide behind an identity BN."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d, create_conv2d
from torch import nn

from refconv_train import RefconvError, build_model, randomize_bn_stats
from refconv_train.methods.reparam.bn_pairs import find_bn_pairs
from refconv_train.methods.reparam.structural import (
    NO_BIAS_SINK,
    RepBranches,
    apply_structural,
    fuse_structural,
    structural_convs,
)
from refconv_train.run.fusing import fuse_and_verify

METHODS = ("acb", "repvgg", "dbb")


# Small ops on tiny inputs: one thread is several times faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread_module")


def bn_after(conv: nn.Conv2d) -> nn.Module:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())


CONVS = {  # name -> a small net holding the conv of interest (input: 6 channels)
    "dense": lambda: bn_after(nn.Conv2d(6, 8, 3, padding=1, bias=False)),
    "depthwise": lambda: bn_after(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)),
    "group": lambda: bn_after(nn.Conv2d(6, 8, 3, padding=1, groups=2, bias=False)),
    "group_square": lambda: bn_after(nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)),  # RepVGG identity
    "dw_multiplier": lambda: bn_after(nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False)),
    "stride2": lambda: bn_after(nn.Conv2d(6, 6, 3, stride=2, padding=1, bias=False)),
    "dw_5x5_stride2": lambda: bn_after(nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6, bias=False)),
    "dilation2": lambda: bn_after(nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)),
    "timm_same_stride2": lambda: bn_after(create_conv2d(6, 6, 3, stride=2, padding="same")),
    "timm_same_dw_5x5_s2": lambda: bn_after(create_conv2d(6, 6, 5, stride=2, padding="same", depthwise=True)),
    "torch_same_4x4": lambda: bn_after(nn.Conv2d(6, 6, 4, padding="same", bias=False)),
    "valid_2x2_stride2": lambda: bn_after(nn.Conv2d(6, 8, 2, stride=2, padding="valid", bias=False)),
    "no_padding": lambda: bn_after(nn.Conv2d(6, 6, 3, bias=False)),
    "non_square_3x5": lambda: bn_after(nn.Conv2d(6, 6, (3, 5), padding=(1, 2), bias=False)),
    "own_bias_no_bn": lambda: nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=True), nn.ReLU()),
    "own_bias_then_bn": lambda: bn_after(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)),
}
X = torch.randn(2, 6, 11, 13, generator=torch.Generator().manual_seed(0))  # odd sizes: dynamic padding is uneven


def perturb_branches(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial branch weights (DBB's identity-based 1x1 starts at a zero delta), then random BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rep in (m for m in model.modules() if isinstance(m, RepBranches)):
            for p in rep.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    randomize_bn_stats(model, seed=seed + 1)


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("method", METHODS)
def test_fused_conv_matches_conv_with_branches_and_loads_strictly_into_the_original(method, case):
    torch.manual_seed(0)
    model = CONVS[case]()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    report = apply_structural(model, method, example=X)
    assert [layer.name for layer in report.layers] == ["0"] and report.start_max_abs_diff == 0.0
    perturb_branches(model)
    with_branches = eval_out(model, X)
    assert structural_convs(model)["0"] is model[0]
    assert fuse_structural(copy.deepcopy(model), example=X) == ["0"]  # a deep copy fuses alone
    assert fuse_structural(model, example=X) == ["0"]
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    fresh = CONVS[case]()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert type(fresh[0]) is type(model[0]) and not model[0]._forward_hooks
    diff = (eval_out(fresh, X) - with_branches).abs().max().item()
    assert diff < 1e-4, f"{method} {case}: {diff}"
    assert fuse_structural(model) == [] and structural_convs(model) == {}  # idempotent


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method", METHODS)
def test_branches_are_exact_in_float64(method):
    """The algebra is exact, not just close: in fp64 the fused model matches to rounding."""
    cases = ("group_square", "dw_5x5_stride2", "timm_same_dw_5x5_s2", "torch_same_4x4", "dilation2", "no_padding")
    model = nn.Sequential(*(nn.Sequential(*CONVS[c]()[:2]) for c in cases)).double()
    x = X.double()
    apply_structural(model, method, example=x)
    perturb_branches(model)
    before = eval_out(model, x)
    fuse_structural(model, example=x)
    assert (eval_out(model, x) - before).abs().max().item() < 1e-10


def two_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("method", METHODS)
def test_model_starts_exactly_at_the_original_in_train_and_eval_mode(method):
    torch.manual_seed(0)
    model = two_convs()
    randomize_bn_stats(model)
    original = copy.deepcopy(model)
    report = apply_structural(model, method)
    assert report.start_max_abs_diff == 0.0 and len(report.layers) == 2
    assert torch.equal(eval_out(model, X), eval_out(original, X))
    model.train()
    original.train()
    assert torch.equal(model(X), original(X))
    moved = apply_structural(two_convs(), method, branch_scale=1.0)  # the papers' from-scratch init moves it
    assert moved.start_max_abs_diff > 0


@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_changes_the_branches_and_the_model_still_fuses_exactly(method):
    torch.manual_seed(0)
    model = two_convs()
    apply_structural(model, method)
    branch_params = {n: p.detach().clone() for n, p in model.named_parameters() if "rep_branches" in n}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model.train()
    for _ in range(2):  # step 1 moves the zero gammas, step 2 everything behind them
        opt.zero_grad()
        F.cross_entropy(model(X), torch.tensor([0, 2])).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if n in branch_params and not torch.equal(p, branch_params[n])}
    # every branch kernel and every last-BN gamma; (DBB: a BN right before the average pool's BN is scale-invariant
    # in train mode, its gamma may not move)
    last = {f"{conv}.rep_branches.{b}.{next(n for n, m in branch.named_children() if m is branch.last_bn())}.weight"
            for conv, c in structural_convs(model).items() for b, branch in c.rep_branches.named_children()}
    must = {n for n, p in branch_params.items() if p.dim() == 4} | last
    assert must <= changed, must - changed
    randomize_bn_stats(model, seed=5)
    before = eval_out(model, X)
    fuse_structural(model)
    assert (eval_out(model, X) - before).abs().max().item() < 1e-4


def test_fuse_folds_the_bn_scale_into_the_kernel_and_leaves_the_bn_an_affine_shift():
    """The branches are summed after the conv's BN: the fuse folds the BN's scale s = gamma / sigma into the conv and
    adds the branch kernel (W' = W s + k), and the BN keeps only its shift (mean 0, var 1 - eps, gamma 1,
    beta' = beta - mu s + b; a BN without affine parameters: mu' = mu / sigma - b); a conv with a bias and no BN
    takes both."""
    model = bn_after(nn.Conv2d(6, 8, 3, padding=1, bias=False))
    report = apply_structural(model, "repvgg", example=X)
    assert report.layers[0].detail.endswith("summed after 1, bias -> 1.bias")
    perturb_branches(model)
    bn = model[1]
    weight, beta, mean, gamma = model[0].weight.clone(), bn.bias.clone(), bn.running_mean.clone(), bn.weight.clone()
    kernel, bias = model[0].rep_branches.kernel_bias()
    scale = gamma / (bn.running_var + bn.eps).sqrt()
    before = eval_out(model, X)
    fuse_structural(model)
    assert model[0].bias is None
    torch.testing.assert_close(model[0].weight, weight * scale.view(-1, 1, 1, 1) + kernel)
    torch.testing.assert_close(bn.bias.detach(), beta - mean * scale + bias)
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.weight.detach(), torch.ones(8))
    torch.testing.assert_close(bn.running_var, torch.full((8,), 1 - bn.eps))
    assert (eval_out(model, X) - before).abs().max().item() < 1e-4

    plain = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False)).double()
    apply_structural(plain, "acb", example=X.double())
    perturb_branches(plain)
    mean, sigma = plain[1].running_mean.clone(), (plain[1].running_var + plain[1].eps).sqrt()
    _, bias = plain[0].rep_branches.kernel_bias()
    before = eval_out(plain, X.double())
    fuse_structural(plain)
    torch.testing.assert_close(plain[1].running_mean, mean / sigma - bias)
    assert (eval_out(plain, X.double()) - before).abs().max().item() < 1e-12

    biased = apply_structural(bn_after(nn.Conv2d(6, 8, 3, padding=1, bias=True)), "repvgg", example=X)
    assert biased.layers[0].detail.endswith("summed after 1, bias -> 1.bias")
    alone = apply_structural(nn.Sequential(nn.Conv2d(6, 8, 3, padding=1)), "repvgg", example=X)
    assert alone.layers[0].detail.endswith("summed on the conv output, bias -> conv.bias")


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_or_tiny_gamma_fuses_exactly(method):
    """timm's zero_init_last starts a from-scratch ResNet block's last BN at gamma 0, and a trained gamma can stay
    tiny: the branches summed after that BN still fold exactly (the old fold divided by gamma and refused 0, or lost
    fp32 precision near it: a from-scratch ACB mobilenetv2_050 failed its fuse check by 1.6e-4)."""
    model = two_convs().double()
    apply_structural(model, method, example=X.double())
    perturb_branches(model)
    with torch.no_grad():
        model[1].weight[3] = 0.0
        model[1].weight[5] = 1e-7
    before = eval_out(model, X.double())
    fuse_structural(model)
    assert not structural_convs(model)
    assert (eval_out(model, X.double()) - before).abs().max().item() < 1e-10 * max(1.0, before.abs().max().item())


class Residual(nn.Module):
    def __init__(self, inplace_act: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.inplace_act = inplace_act

    def forward(self, x):
        y = self.conv(x)
        if self.inplace_act:
            return self.bn(F.relu_(y))  # the BN gets the same tensor object, but not unchanged
        return self.bn(y) + y  # the conv output is also read by the add


def test_bn_pairs_come_from_the_forward_not_from_names():
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6),  # ReLU between: no pair
                          nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6),  # a direct pair
                          Residual(), Residual(inplace_act=True))
    assert find_bn_pairs(model, example=X) == {"3": "4"}
    tv = build_model("torchvision:shufflenet_v2_x0_5", num_classes=10)
    pairs = find_bn_pairs(tv, ["conv1.0", "stage2.0.branch1.0"])
    assert pairs == {"conv1.0": "conv1.1", "stage2.0.branch1.0": "stage2.0.branch1.1"}
    was_training = tv.training
    find_bn_pairs(tv)
    assert tv.training == was_training


def test_skip_reasons_are_reported():
    model = nn.Sequential(
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(),  # no bias, no BN after it
        nn.Conv2d(6, 6, (1, 5), padding=(0, 2), bias=False), nn.BatchNorm2d(6),  # ACB needs kh, kw > 1
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(6),
        StdConv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6),  # its forward standardizes the weight
        nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=1),
    )
    report = apply_structural(model, "acb", exclude=["^9$"], example=X)
    skipped = dict(report.skipped)
    assert skipped == {"0": NO_BIAS_SINK, "2": "ACB needs a kernel larger than 1 in both dimensions",
                       "4": "padding_mode 'reflect': branches assume zero padding",
                       "6": "custom forward (StdConv2d): its padding or weight use is unknown",
                       "8": "1x1", "9": "excluded by '^9$'"}
    assert [layer.name for layer in report.layers] == ["10"]
    assert "10" in report.table() and NO_BIAS_SINK in report.table()
    with pytest.raises(RefconvError, match="already re-parameterized with acb"):  # one method per model
        apply_structural(model, "dbb", example=X)
    repvgg = apply_structural(nn.Sequential(nn.Conv2d(6, 6, 3, stride=2, padding=1)), "repvgg", example=X)
    assert "no identity branch: stride 2" in repvgg.layers[0].detail


def test_nothing_to_change_raises_a_one_line_error():
    with pytest.raises(RefconvError, match="acb found no convolution to change"):
        apply_structural(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU()), "acb", example=X)
    with pytest.raises(RefconvError, match="unknown"):
        apply_structural(two_convs(), "acnet")


def test_branches_convert_to_syncbn_and_still_fuse():
    model = two_convs()
    apply_structural(model, "dbb")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    branch_bns = [m for n, m in synced.named_modules() if "rep_branches" in n and "bn" in n.rsplit(".", 1)[-1]]
    assert branch_bns and all(type(m) is nn.SyncBatchNorm for m in branch_bns)
    perturb_branches(synced)
    before = eval_out(synced, X)
    assert len(fuse_structural(synced, example=X)) == 2
    assert (eval_out(synced, X) - before).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_applied_model_deep_copies_pickles_and_resumes_from_its_state_dict(method):
    torch.manual_seed(0)
    model = two_convs()
    apply_structural(model, method)
    perturb_branches(model)
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    resumed = two_convs()
    apply_structural(resumed, method)
    resumed.load_state_dict(model.state_dict(), strict=True)  # branches are ordinary state
    expected = eval_out(model, X)
    for other in (twin, loaded, resumed, pickle.loads(pickle.dumps(model))):
        assert torch.equal(eval_out(other, X), expected)
    fuse_structural(twin)
    assert structural_convs(model) and (eval_out(twin, X) - expected).abs().max().item() < 1e-4


def test_bf16_autocast_keeps_the_conv_output_dtype():
    model = two_convs()
    apply_structural(model, "dbb", branch_scale=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        out = model[0](X)
    assert out.dtype == torch.bfloat16


# The paper's architectures by name (tests/test_paper_archs.py), small inputs.
ARCHS = ["mobilenetv1_100", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "resnet18",
         "torchvision:shufflenet_v2_x1_0"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ARCHS)
def test_paper_architecture_fuses_and_loads_strictly_into_a_fresh_model(name, method):
    torch.manual_seed(0)
    """In fp64, so that the check is of the algebra: a fused fp32 conv sums in another order, and random BN
    statistics amplify that rounding up to ~3e-5 of the output scale on these nets (measured)."""
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = build_model(name, num_classes=10).double()
    report = apply_structural(model, method, example=x)
    assert report.start_max_abs_diff == 0.0 and report.layers
    perturb_branches(model)
    before = eval_out(model, x)
    assert len(fuse_structural(model, example=x)) == len(report.layers)
    fresh = build_model(name, num_classes=10).double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    diff = (eval_out(fresh, x) - before).abs().max().item()
    assert diff <= 1e-10 * max(1.0, before.abs().max().item()), f"{name} {method}: {diff}"


def test_convnext_depthwise_convs_take_their_bias_and_layernorm_needs_none():
    """ConvNeXt's 7x7 depthwise convs feed a LayerNorm, not a BN: they are eligible only because they have a bias."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = build_model("convnext_atto", num_classes=10)
    report = apply_structural(model, "dbb", example=x)
    details = {layer.name: layer.detail for layer in report.layers}
    assert details["stages.0.blocks.0.conv_dw"].endswith("bias -> conv.bias")
    assert all(d.endswith("bias -> conv.bias") for d in details.values())
    perturb_branches(model)
    before = eval_out(model, x)
    fuse_structural(model, example=x)
    assert (eval_out(model, x) - before).abs().max().item() <= 1e-5 * max(1.0, before.abs().max().item())
    model = build_model("convnext_atto", num_classes=10)
    for block in model.modules():
        if hasattr(block, "conv_dw"):
            block.conv_dw.bias = None  # the "no bias, LayerNorm after it" case
    skipped = dict(apply_structural(model, "acb", example=x).skipped)
    assert skipped["stages.0.blocks.0.conv_dw"] == NO_BIAS_SINK


STRIDED_STEM = """
import sys, torch
from torch import nn
from refconv_train.methods.reparam import apply_reparam
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
apply_reparam(net, sys.argv[1], branch_scale=1.0)
x = torch.randn(16, 3, 50, 50)
grads = []
for cl in (False, True):
    net.zero_grad()
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    net.to(memory_format=torch.channels_last if cl else torch.contiguous_format)(xx).square().sum().backward()
    grads.append(net[0].rep_branches.conv1x1.conv.weight.grad.clone())
print(((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item())
"""


@pytest.mark.parametrize("method", ["repvgg", "dbb"])
def test_strided_1x1_branch_on_a_3_channel_stem_trains_channels_last(method):
    """oneDNN's strided 1x1 weight gradient (channels_last, 3 input channels, 50 px) crashes the process; the branch
    subsamples first. In a child process, so that a regression is a failed test, not a dead test session."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", STRIDED_STEM, method], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-500:]}"
    assert float(proc.stdout) < 1e-4  # the same weight gradient as in NCHW (fp32 sums in another order)


def test_fixed_resolution_model_applies_at_its_input_size_and_fuses_without_a_forward():
    """levit_conv_128s only runs at 224 px: the fuse used to run its own 64 px pairing forward and crash. The pairs
    are now stored at apply; apply without example= takes timm's fixed input size, and a wrong size is one line."""
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = build_model("levit_conv_128s", num_classes=10, pretrained=False).double()
    report = apply_structural(model, "acb", example=x)
    assert len(report.layers) == 4 and report.start_max_abs_diff == 0.0
    perturb_branches(model)
    before = eval_out(model, x)

    def no_forward(*_):
        raise AssertionError("the fuse ran a forward")

    handle = model.register_forward_pre_hook(no_forward)
    assert len(fuse_structural(model, example=torch.randn(1, 3, 64, 64))) == 4  # example: accepted, ignored
    handle.remove()
    fresh = build_model("levit_conv_128s", num_classes=10, pretrained=False).double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert (eval_out(fresh, x) - before).abs().max().item() <= 1e-10 * max(1.0, before.abs().max().item())

    fp32 = build_model("levit_conv_128s", num_classes=10, pretrained=False)
    names = [layer.name for layer in apply_structural(fp32, "acb").layers]  # pretrained_cfg: fixed 224 px
    assert names == [layer.name for layer in report.layers]
    result = fuse_and_verify(fp32, "levit_conv_128s", 10, img_size=224, batch=1)  # refconv-fuse --img-size 224
    assert result.max_abs_diff <= 1e-4 * result.output_scale and structural_convs(fp32)  # the trained model kept

    small = torch.randn(2, 3, 64, 64)
    with pytest.raises(RefconvError, match=r"^acb: the model's forward on a 2x3x64x64 example failed \(The size of "
                                           r"tensor .*\); pass example= with the model's input size \(refconv-train: "
                                           r"set data.img_size to it\)$"):
        apply_structural(build_model("levit_conv_128s", num_classes=10, pretrained=False), "acb", example=small)


class ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)  # where "after the BN" is, is not knowable from outside


def test_a_bn_subclass_with_its_own_forward_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), ScaledBN(6),
                          nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
    report = apply_structural(model, "acb", example=X)
    assert [layer.name for layer in report.layers] == ["2"]
    assert dict(report.skipped)["0"] == ("its BatchNorm (ScaledBN) has its own forward: where to sum the branches "
                                         "after it is unknown")


@pytest.mark.parametrize("method", METHODS)
def test_branches_at_scale_on_a_zero_started_block_warn_with_the_fix(method, recwarn):
    """timm's resnet starts each block's last BN at gamma 0 (zero_init_last); branches at scale 1 on that conv break
    the zero start. The warning names the fix; the authors' setting (no zero start) and the exact start stay quiet."""
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"host BatchNorms start at gamma 0 \(e\.g\. layer1\.0\.bn2: timm's "
                                         r"zero_init_last\).*model\.kwargs\.zero_init_last=false"):
        apply_structural(build_model("resnet18", num_classes=4, pretrained=False), method, branch_scale=1.0,
                         example=x)
    recwarn.clear()
    apply_structural(build_model("resnet18", num_classes=4, pretrained=False, zero_init_last=False), method,
                     branch_scale=1.0, example=x)
    apply_structural(build_model("resnet18", num_classes=4, pretrained=False), method, branch_scale=0.0, example=x)
    assert not [w for w in recwarn if "gamma 0" in str(w.message)]
