"""ACB, RepVGG and DBB train like their authors' blocks: the training-time forward, gradients and BatchNorm statistics
of a conv -> BN with our branches equal a reference written here from the papers' definitions (DingXiaoH's ACBlock,
RepVGGBlock, DiverseBranchBlock): ``BN(conv x) + sum_b BN_b(branch_b x)``, every BN in train mode, DBB's two-stage
branches padded after their inner BN with that BN's eval value (``BNAndPadLayer``). And the consequence that matters:
at branch scale 1 each channel's batch variance is about 1 + the number of branches, not 1."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from refconv_train import randomize_bn_stats
from refconv_train.methods.reparam.structural import apply_structural

pytestmark = pytest.mark.usefixtures("one_thread_module")

# (C_in, C_out, kernel, stride, groups): plain, RepVGG identity, strided, grouped, depthwise (DBB's depthwise layout)
CASES = {"dense": (6, 8, 3, 1, 1), "square": (6, 6, 3, 1, 1), "stride2": (6, 8, 3, 2, 1), "group": (6, 8, 3, 1, 2),
         "depthwise_5x5": (6, 6, 5, 1, 6), "depthwise_s2": (6, 6, 3, 2, 6)}


def bn(x, module, stats):
    """A train-mode BN on this module's parameters and on ``stats`` (copies of its running buffers, updated)."""
    return F.batch_norm(x, stats[module][0], stats[module][1], module.weight, module.bias, True, module.momentum,
                        module.eps)


def bn_and_pad(x, module, stats, pad):
    """DBB's BNAndPadLayer: BN, zero-pad, then the border rows and columns set to the BN's (updated, detached) eval
    value for a zero pixel."""
    out = F.pad(bn(x, module, stats), [pad] * 4)
    mean, var = stats[module]
    value = (module.bias.detach() - mean * module.weight.detach() / torch.sqrt(var + module.eps)).view(1, -1, 1, 1)
    if pad > 0:
        out[:, :, :pad, :], out[:, :, -pad:, :], out[:, :, :, :pad], out[:, :, :, -pad:] = value, value, value, value
    return out


def identity_1x1(channels: int, groups: int, dtype) -> torch.Tensor:
    per_group = channels // groups
    eye = torch.zeros(channels, per_group, 1, 1, dtype=dtype)
    for i in range(channels):
        eye[i, i % per_group] = 1.0
    return eye


def authors_block(x, conv, main_bn, rep, method, stats):
    """The authors' block, by their definitions, on our modules' parameters."""
    k, s, p, g = conv.kernel_size[0], conv.stride, conv.padding[0], conv.groups
    out = bn(F.conv2d(x, conv.weight, None, s, p, 1, g), main_bn, stats)
    if method == "acb":  # ACBlock: ver_conv (k x 1) padding (p, p - k//2), hor_conv (1 x k) padding (p - k//2, p)
        out = out + bn(F.conv2d(x, rep.ver.conv.weight, None, s, (p, p - k // 2), 1, g), rep.ver.bn, stats)
        out = out + bn(F.conv2d(x, rep.hor.conv.weight, None, s, (p - k // 2, p), 1, g), rep.hor.bn, stats)
    elif method == "repvgg":  # RepVGGBlock: rbr_1x1 with padding p - k//2, rbr_identity = BN(x) where it exists
        out = out + bn(F.conv2d(x, rep.conv1x1.conv.weight, None, s, p - k // 2, 1, g), rep.conv1x1.bn, stats)
        if hasattr(rep, "identity"):
            out = out + bn(x, rep.identity.bn, stats)
    else:  # DiverseBranchBlock
        avg, kxk = rep.avg, rep.conv1x1_kxk
        c = conv.out_channels
        pool = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=x.dtype)
        if hasattr(rep, "conv1x1"):  # groups < out_channels: dbb_1x1, and dbb_avg = 1x1 conv -> BNAndPad -> avg pool
            out = out + bn(F.conv2d(x, rep.conv1x1.conv.weight, None, s, 0, 1, g), rep.conv1x1.bn, stats)
            y = bn_and_pad(F.conv2d(x, avg.conv.weight, None, 1, 0, 1, g), avg.bn, stats, p)
            out = out + bn(F.conv2d(y, pool, None, s, 0, 1, c), avg.avgbn, stats)
            first = kxk.idconv1.weight + identity_1x1(conv.in_channels, g, x.dtype)  # IdentityBasedConv1x1
        else:  # AvgPool2d(k, s, padding=p) counts the zero padding
            out = out + bn(F.avg_pool2d(x, k, s, p), avg.avgbn, stats)
            first = kxk.conv1.weight
        y = bn_and_pad(F.conv2d(x, first, None, 1, 0, 1, g), kxk.bn1, stats, p)
        out = out + bn(F.conv2d(y, kxk.conv2.weight, None, s, 0, 1, g), kxk.bn2, stats)
    return out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["acb", "repvgg", "dbb"])
def test_training_forward_gradients_and_statistics_equal_the_authors_block(method, case):
    cin, cout, k, s, g = CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)).double()
    x = torch.randn(4, cin, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    apply_structural(model, method, branch_scale=1.0, example=x)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial gammas, betas and DBB's identity delta
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    randomize_bn_stats(model, seed=3)  # DBB's pad value reads the running statistics
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = {m: (m.running_mean.clone(), m.running_var.clone()) for m in bns}
    params = list(model.parameters())
    model.train()
    reference = authors_block(x, model[0], model[1], model[0].rep_branches, method, stats)
    ours = model(x)
    assert (ours - reference).abs().max().item() < 1e-12
    weights = torch.randn(ours.shape, generator=gen, dtype=ours.dtype)
    grads = torch.autograd.grad((ours * weights).sum(), params)
    expected = torch.autograd.grad((reference * weights).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), grads, expected):
        assert (a - b).abs().max().item() < 1e-10, name
    for m in bns:
        assert torch.allclose(m.running_mean, stats[m][0], atol=1e-14) and torch.allclose(m.running_var, stats[m][1])


@pytest.mark.parametrize("method, branches", [("acb", 2), ("repvgg", 2), ("dbb", 3)])
def test_branches_at_scale_1_add_their_variance_after_the_bn_instead_of_being_normalized_away(method, branches):
    """Summed before the conv's train-mode BN (the old layout), every channel's batch variance came out exactly 1; the
    authors' layout adds each branch's unit-variance BN output: about 1 + branches (random filters on noise are
    nearly uncorrelated)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
    x = torch.randn(16, 32, 16, 16, generator=torch.Generator().manual_seed(1))
    apply_structural(model, method, branch_scale=1.0, example=x)
    assert len(list(model[0].rep_branches.children())) == branches
    model.train()
    with torch.no_grad():
        var = model(x).var(dim=(0, 2, 3), unbiased=False)
    assert abs(var.mean().item() - (1 + branches)) < 0.2 * (1 + branches), var
    assert var.min().item() > 1.5


@pytest.mark.parametrize("method", ["acb", "repvgg", "dbb"])
def test_timm_batchnorm_with_activation_sums_the_branches_before_its_activation(method):
    """timm's BatchNormAct2d (MobileNet, EfficientNet) is BN, drop, act in one module: the authors' blocks sum before
    the nonlinearity, so the branches join between its BN and its activation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), BatchNormAct2d(6, act_layer=nn.ReLU)).double()
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = apply_structural(model, method, branch_scale=1.0, example=x)
    assert "summed after 1" in report.layers[0].detail
    randomize_bn_stats(model, seed=3)
    stats = {m: (m.running_mean.clone(), m.running_var.clone()) for m in model.modules()
             if isinstance(m, nn.BatchNorm2d)}
    model.train()
    reference = F.relu(authors_block(x, model[0], model[1], model[0].rep_branches, method, stats))
    assert (model(x) - reference).abs().max().item() < 1e-12
