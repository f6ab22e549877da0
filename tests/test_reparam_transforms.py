"""Each structural re-parameterization transform against the layers it replaces, computed explicitly (F.conv2d,
F.batch_norm, F.avg_pool2d) on random inputs with random BatchNorm statistics."""

import pytest
import torch
import torch.nn.functional as F

from refconv_train.methods.reparam import kernel_algebra as T


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_bn(channels: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return dict(mean=torch.randn(channels, generator=g), var=torch.rand(channels, generator=g) + 0.5,
                gamma=torch.randn(channels, generator=g), beta=torch.randn(channels, generator=g))


def batch_norm(y: torch.Tensor, bn: dict, eps: float = 1e-5) -> torch.Tensor:
    return F.batch_norm(y, bn["mean"], bn["var"], bn["gamma"], bn["beta"], training=False, eps=eps)


def fold(kernel: torch.Tensor, bn: dict, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    return T.fold_bn(kernel, bn["mean"], bn["var"], bn["gamma"], bn["beta"], eps)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_fold_bn_equals_conv_then_eval_batchnorm(groups):
    x = torch.randn(2, 6, 9, 9, generator=gen())
    k = torch.randn(6, 6 // groups, 3, 3, generator=gen(2))
    bn = random_bn(6)
    kernel, bias = fold(k, bn, eps=1e-3)
    expected = batch_norm(F.conv2d(x, k, padding=1, groups=groups), bn, eps=1e-3)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1, groups=groups), expected, atol=1e-5, rtol=1e-5)
    k2, b2 = T.fold_bn(k, bn["mean"], bn["var"], None, None, 1e-5)  # a BN without affine parameters
    torch.testing.assert_close(F.conv2d(x, k2, b2, groups=groups),
                               F.batch_norm(F.conv2d(x, k, groups=groups), bn["mean"], bn["var"]), atol=1e-5, rtol=0)


PLACEMENTS = [  # frame, branch size, offset, stride, dilation, main padding (left, right, top, bottom)
    ((3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1, 1, 1)),
    ((3, 3), (3, 1), (0, 1), (2, 2), (1, 1), (1, 1, 1, 1)),
    ((3, 3), (1, 3), (1, 0), (1, 1), (2, 2), (2, 2, 2, 2)),
    ((5, 5), (1, 1), (2, 2), (2, 1), (1, 1), (0, 0, 0, 0)),  # no padding: the branch crops
    ((4, 4), (1, 1), (1, 1), (2, 2), (1, 1), (1, 2, 1, 2)),  # even kernel, asymmetric "same"-like padding
    ((3, 5), (3, 1), (0, 2), (1, 2), (1, 3), (6, 6, 1, 1)),
    ((5, 3), (2, 2), (3, 0), (3, 1), (1, 1), (0, 1, 2, 0)),  # an off-centre kernel: any offset is exact
]


@pytest.mark.parametrize("frame,size,offset,stride,dilation,pad", PLACEMENTS)
def test_small_kernel_in_frame_equals_branch_on_shifted_input(frame, size, offset, stride, dilation, pad):
    x = torch.randn(2, 4, 11, 13, generator=gen())
    small = torch.randn(5, 4, *size, generator=gen(3))
    main = F.conv2d(F.pad(x, pad), T.pad_to_frame(small, frame, offset), stride=stride, dilation=dilation)
    shifted = F.pad(x, T.branch_padding(pad, frame, size, offset, dilation))
    branch = F.conv2d(shifted, small, stride=stride, dilation=dilation)
    assert branch.shape == main.shape
    torch.testing.assert_close(branch, main, atol=1e-5, rtol=1e-5)


def test_pad_to_frame_rejects_a_kernel_outside_the_frame():
    with pytest.raises(ValueError, match="does not fit"):
        T.pad_to_frame(torch.ones(1, 1, 1, 3), (3, 3), (1, 1))


def test_center_offset_centres_odd_and_leans_top_left_for_even_frames():
    assert T.center_offset((3, 3), (1, 1)) == (1, 1)
    assert T.center_offset((4, 5), (1, 1)) == (1, 2)
    assert T.center_offset((7, 7), (7, 1)) == (0, 3)


@pytest.mark.parametrize("channels,groups", [(6, 1), (6, 2), (6, 6)])
def test_identity_kernel_returns_the_input_exactly(channels, groups):
    x = torch.randn(2, channels, 5, 7, generator=gen())
    assert torch.equal(F.conv2d(x, T.identity_kernel(channels, groups), groups=groups), x)


@pytest.mark.parametrize("channels,groups,size,stride", [(6, 1, (3, 3), 1), (6, 3, (3, 3), 2), (4, 4, (5, 5), 1),
                                                         (6, 2, (3, 5), 2), (4, 4, (2, 2), 2)])
def test_avg_pool_kernel_equals_avg_pool2d(channels, groups, size, stride):
    x = torch.randn(2, channels, 11, 12, generator=gen())
    kernel = T.avg_pool_kernel(channels, size, groups)
    assert kernel.shape == (channels, channels // groups, *size)
    torch.testing.assert_close(F.conv2d(x, kernel, stride=stride, groups=groups), F.avg_pool2d(x, size, stride),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cin,mid,cout,groups", [(4, 6, 5, 1), (6, 6, 8, 2), (6, 12, 6, 6), (6, 6, 6, 3)])
def test_merge_1x1_then_kxk_equals_the_two_stage_branch_with_bn_valued_padding(cin, mid, cout, groups):
    """The two-stage branch as DBB runs it: pad, 1x1 conv, BN, kxk conv (no padding), BN. The padded pixels reach the
    kxk conv as the first BN's value for a zero input, which the merged bias accounts for."""
    x = torch.randn(2, cin, 9, 10, generator=gen())
    k1 = torch.randn(mid, cin // groups, 1, 1, generator=gen(2))
    k2 = torch.randn(cout, mid // groups, 3, 3, generator=gen(3))
    bn1, bn2 = random_bn(mid, 4), random_bn(cout, 5)
    padded = F.pad(x, (1, 1, 1, 1))
    explicit = batch_norm(F.conv2d(batch_norm(F.conv2d(padded, k1, groups=groups), bn1), k2, stride=2, groups=groups),
                          bn2)
    kernel, bias = T.merge_1x1_kxk(*fold(k1, bn1), *fold(k2, bn2), groups)
    assert kernel.shape == (cout, cin // groups, 3, 3)
    torch.testing.assert_close(F.conv2d(padded, kernel, bias, stride=2, groups=groups), explicit, atol=1e-4, rtol=1e-5)


def test_merge_1x1_then_avg_pool_equals_conv_bn_pool_bn():
    """DBB's average branch of a group conv: 1x1 conv + BN -> per-channel average pool -> BN."""
    x = torch.randn(2, 6, 9, 9, generator=gen())
    k1 = torch.randn(8, 3, 1, 1, generator=gen(2))
    bn1, bn2 = random_bn(8, 3), random_bn(8, 4)
    padded = F.pad(x, (1, 1, 1, 1))
    explicit = batch_norm(F.avg_pool2d(batch_norm(F.conv2d(padded, k1, groups=2), bn1), 3, 1), bn2)
    kernel, bias = T.merge_1x1_kxk(*fold(k1, bn1), *fold(T.avg_pool_kernel(8, (3, 3), 2), bn2), 2)
    torch.testing.assert_close(F.conv2d(padded, kernel, bias, groups=2), explicit, atol=1e-5, rtol=1e-5)


def test_add_branches_equals_the_sum_of_parallel_convs():
    x = torch.randn(2, 4, 8, 8, generator=gen())
    ks = [torch.randn(6, 2, 3, 3, generator=gen(i)) for i in range(3)]
    bs = [torch.randn(6, generator=gen(10 + i)) for i in range(3)]
    kernel, bias = T.add_branches(ks, bs)
    expected = sum(F.conv2d(x, k, b, padding=1, groups=2) for k, b in zip(ks, bs))
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=1, groups=2), expected, atol=1e-5, rtol=1e-5)


def test_bias_absorbed_into_following_bn_running_mean_equals_conv_with_bias_then_bn():
    x = torch.randn(4, 3, 8, 8, generator=gen())
    k, b = torch.randn(5, 3, 3, 3, generator=gen(2)), torch.randn(5, generator=gen(3))
    bn = random_bn(5)
    explicit = batch_norm(F.conv2d(x, k, b, padding=1), bn)
    absorbed = dict(bn, mean=T.absorb_bias_into_bn(bn["mean"], b))
    torch.testing.assert_close(batch_norm(F.conv2d(x, k, padding=1), absorbed), explicit, atol=1e-5, rtol=1e-5)
    # train mode: the batch mean takes the bias out either way
    train = [F.batch_norm(y, None, None, bn["gamma"], bn["beta"], training=True)
             for y in (F.conv2d(x, k, b, padding=1), F.conv2d(x, k, padding=1))]
    torch.testing.assert_close(train[0], train[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_merge_1x1_then_per_channel_kxk_equals_the_grouped_merge_and_the_explicit_branch(groups):
    x = torch.randn(2, 6, 9, 9, generator=gen())
    k1 = torch.randn(8, 6 // groups, 1, 1, generator=gen(2))
    k2 = torch.randn(8, 1, 3, 3, generator=gen(3))
    bn1, bn2 = random_bn(8, 4), random_bn(8, 5)
    padded = F.pad(x, (1, 1, 1, 1))
    explicit = batch_norm(F.conv2d(batch_norm(F.conv2d(padded, k1, groups=groups), bn1), k2, stride=2, groups=8), bn2)
    kernel, bias = T.merge_1x1_depthwise(*fold(k1, bn1), *fold(k2, bn2))
    torch.testing.assert_close(F.conv2d(padded, kernel, bias, stride=2, groups=groups), explicit, atol=1e-4, rtol=1e-5)
    pool = T.avg_pool_kernel(8, (3, 3), 8)
    grouped = T.merge_1x1_kxk(*fold(k1, bn1), *fold(T.avg_pool_kernel(8, (3, 3), groups), bn2), groups)
    for a, b in zip(T.merge_1x1_depthwise(*fold(k1, bn1), *fold(pool, bn2)), grouped):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bn_zero_value_is_what_an_eval_batchnorm_outputs_for_a_zero_pixel():
    bn = random_bn(5)
    zero = batch_norm(torch.zeros(1, 5, 2, 2), bn)
    value = T.bn_zero_value(bn["mean"], bn["var"], bn["gamma"], bn["beta"], 1e-5)
    torch.testing.assert_close(value.view(1, 5, 1, 1).expand(1, 5, 2, 2), zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(T.bn_zero_value(bn["mean"], bn["var"], None, None, 1e-5),
                               -bn["mean"] / (bn["var"] + 1e-5).sqrt())


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (0, 1, 2, 0), (-1, 1, 0, -1), (-1, -1, 0, 0), (0, 0, 0, 0)])
def test_pad_with_fills_the_border_with_the_value_and_keeps_the_inside_bit_for_bit(pad):
    """Against DBB's BNAndPadLayer: pad with zeros, then write the value into the border rows and columns."""
    x = torch.randn(2, 3, 5, 6, generator=gen())
    value = torch.randn(3, generator=gen(2))
    left, right, top, bottom = (max(p, 0) for p in pad)
    expected = F.pad(x, pad)
    h, w = expected.shape[-2:]
    v = value.view(1, 3, 1, 1)
    expected[:, :, :top, :], expected[:, :, h - bottom:, :] = v, v
    expected[:, :, :, :left], expected[:, :, :, w - right:] = v, v
    assert torch.equal(T.pad_with(x, pad, value), expected)


@pytest.mark.parametrize("affine", [True, False])
def test_fold_sum_after_bn_is_the_same_conv_then_batchnorm_with_no_division_by_gamma(affine):
    """BN(conv(x, W) + c) + conv(x, k) + b equals BN'(conv(x, W') + c') with the folded values, also where gamma is
    0 or tiny (the old form moved k before the BN as k * std / gamma and lost it there)."""
    x = torch.randn(2, 4, 7, 7, generator=gen(), dtype=torch.float64)
    w, k = (torch.randn(4, 4, 3, 3, generator=gen(s), dtype=torch.float64) for s in (2, 3))
    c, b = (torch.randn(4, generator=gen(s), dtype=torch.float64) for s in (4, 5))
    bn = {key: v.double() for key, v in random_bn(4).items()}
    if affine:
        bn["gamma"][1], bn["gamma"][2] = 0.0, 1e-9
    else:
        bn["gamma"] = bn["beta"] = None
    after = batch_norm(F.conv2d(x, w, c, padding=1), bn) + F.conv2d(x, k, b, padding=1)
    f = T.fold_sum_after_bn(w, c, k, b, bn["mean"], bn["var"], bn["gamma"], bn["beta"], 1e-5)
    folded = {"mean": f["mean"], "var": f["var"], "gamma": f["gamma"], "beta": f["beta"]}
    torch.testing.assert_close(batch_norm(F.conv2d(x, f["weight"], f["conv_bias"], padding=1), folded), after,
                               atol=1e-12, rtol=0)
    assert torch.equal(f["var"] + 1e-5, torch.ones(4, dtype=torch.float64))
    if affine:
        assert torch.equal(f["mean"], torch.zeros(4, dtype=torch.float64)) and torch.equal(f["gamma"], torch.ones(4,
                                                                                              dtype=torch.float64))
