"""The refocus transform against an independent reference: explicit loops over 2-D kernels (docs/design.md sec. 1)."""

import pytest
import torch
from torch import nn

from refconv_train import Refocus, refocus_model, refocus_transform
from refconv_train.methods.refconv import kernel_patches, refocus_delta_gemm, refocus_shape


def reference_refocus(base: torch.Tensor, w_r: torch.Tensor, conv_groups: int) -> torch.Tensor:
    """W_t by definition: 2-D kernel j = o*(C_in/g) + i mixes the g consecutive kernels of its group, each through an
    m x m zero-padded cross-correlation, and the base is added back (identity mapping)."""
    c_out, cin_g, kh, kw = base.shape
    n, g, m = c_out * cin_g, conv_groups, w_r.shape[-1]
    p = m // 2
    kernels = base.reshape(n, kh, kw)
    padded = torch.zeros(n, kh + 2 * p, kw + 2 * p, dtype=base.dtype)
    padded[:, p:p + kh, p:p + kw] = kernels
    out = kernels.clone()
    for j in range(n):
        first = (j // g) * g  # input kernels of j's group
        for c in range(g):
            for y in range(kh):
                for x in range(kw):
                    out[j, y, x] += (w_r[j, c] * padded[first + c, y:y + m, x:x + m]).sum()
    return out.reshape(base.shape)


CASES = [  # (C_in, C_out, groups, kernel) covering dense, depthwise, group-wise, multiplier, non-square, 5x5, 7x7
    (3, 4, 1, (3, 3)),
    (4, 6, 1, (5, 3)),
    (6, 6, 6, (3, 3)),
    (5, 5, 5, (7, 7)),
    (6, 6, 6, (5, 5)),
    (4, 8, 2, (3, 5)),
    (6, 9, 3, (5, 5)),
    (4, 8, 4, (3, 3)),  # depthwise with channel multiplier 2
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in,c_out,groups,kernel,map_k", [c + (m,) for c in CASES for m in (3, 5) if min(c[3]) >= m])
def test_transform_matches_explicit_loops(c_in, c_out, groups, kernel, map_k, dtype):
    g = torch.Generator().manual_seed(c_in * 100 + c_out * 10 + groups + map_k)
    base = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=dtype)
    w_r = torch.randn(refocus_shape(base.shape, groups, map_k), generator=g, dtype=dtype)
    expected = reference_refocus(base, w_r, groups)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(refocus_transform(base, w_r), expected, **tol)
    gemm = base + refocus_delta_gemm(base, w_r, kernel_patches(base, map_k, groups))
    torch.testing.assert_close(gemm, expected, **tol)
    module = Refocus(base.shape, groups, map_k).to(dtype)
    with torch.no_grad():
        module.refocus_weight.copy_(w_r)
    torch.testing.assert_close(module(base), expected, **tol)  # grad on: training path
    with torch.no_grad():
        torch.testing.assert_close(module(base), expected, **tol)  # eval cache path


def test_refocus_weight_shape_and_groups_follow_design():
    # depthwise C=16: W_r (C, C, m, m), every kernel channel sees every other one
    assert refocus_shape((16, 1, 3, 3), 16, 3) == (16, 16, 3, 3)
    # dense 8->4: n = 32 private m x m filters
    assert refocus_shape((4, 8, 3, 3), 1, 3) == (32, 1, 3, 3)
    # group-wise: C_in=8, C_out=8, g=2 -> n=32, W_r (32, 2, m, m), G = 16 groups
    assert refocus_shape((8, 4, 5, 5), 2, 5) == (32, 2, 5, 5)


def test_depthwise_output_kernel_mixes_all_input_kernels_and_dense_mixes_none():
    base = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    w_r = torch.zeros(refocus_shape(base.shape, 4, 3), dtype=torch.float64)
    w_r[0, 3, 1, 1] = 1.0  # output kernel 0 takes input kernel 3 (centre tap)
    out = refocus_transform(base, w_r)
    torch.testing.assert_close(out[0], base[0] + base[3])
    torch.testing.assert_close(out[1:], base[1:])
    dense = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    w_d = torch.zeros(refocus_shape(dense.shape, 1, 3), dtype=torch.float64)
    w_d[:, 0, 1, 1] = 1.0  # identity filter on every kernel doubles every kernel, no cross-talk
    torch.testing.assert_close(refocus_transform(dense, w_d), 2 * dense)


def test_eval_cache_follows_in_place_updates():
    conv = nn.Conv2d(8, 8, 3, groups=8, padding=1)
    refocus_model(conv, init="xavier")
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        y1 = conv(x)
        assert conv(x) is not y1 and torch.equal(conv(x), y1)
        conv.parametrizations.weight[0].refocus_weight.add_(0.5)  # like an optimizer step
        y2 = conv(x)
    assert not torch.allclose(y1, y2)
    with torch.no_grad():
        expected = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1, groups=8)
    torch.testing.assert_close(y2, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c_in,c_out,groups", [(130, 130, 130), (96, 192, 96), (12, 24, 4), (7, 7, 7)])
def test_gemm_path_gradients_match_reference_under_row_blocking(c_in, c_out, groups, threads):
    """The patch GEMM splits W_r's rows into blocks chosen from the thread count (CPU): every split gives the
    reference's W_t and W_r gradient. 130 rows: blocks of 65 (2 threads), 2 (3 threads: nearest divisor)."""
    g = torch.Generator().manual_seed(c_in + c_out + groups + threads)
    base = torch.randn(c_out, c_in // groups, 3, 3, generator=g, dtype=torch.float64)
    w_r = torch.randn(refocus_shape(base.shape, groups, 3), generator=g, dtype=torch.float64)
    upstream = torch.randn(base.shape, generator=g, dtype=torch.float64)
    ref_w = w_r.clone().requires_grad_()
    (refocus_transform(base, ref_w) * upstream).sum().backward()
    module = Refocus(base.shape, groups, 3).to(torch.float64)
    with torch.no_grad():
        module.refocus_weight.copy_(w_r)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = module(base)  # frozen base: cached transposed patches + _PatchGemm
        (out * upstream).sum().backward()
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, refocus_transform(base, w_r), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(module.refocus_weight.grad, ref_w.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dense_gemm", [False, True])
def test_dense_convs_take_the_chosen_path_with_identical_results(dense_gemm, monkeypatch):
    """Dense convs: grouped conv (CPU default) or GEMM on cached patches (CUDA default); both give the reference."""
    monkeypatch.setattr(Refocus, "dense_gemm", dense_gemm)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    upstream = torch.randn(base.shape, generator=g, dtype=torch.float64)
    module = Refocus(base.shape, 1, 3).to(torch.float64)
    ref_w = module.refocus_weight.detach().clone().requires_grad_()
    (refocus_transform(base, ref_w) * upstream).sum().backward()
    out = module(base)
    (out * upstream).sum().backward()
    assert (module._patches is not None) == dense_gemm
    torch.testing.assert_close(out, refocus_transform(base, ref_w.detach()), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(module.refocus_weight.grad, ref_w.grad, atol=1e-12, rtol=1e-12)
