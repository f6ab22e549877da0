"""CWN and OWN cache W while autograd is off; an edit that bypasses the version counter (``p.data``, old-style
optimizers, manual surgery) must still reach the eval output and the fused kernel."""

import pytest
import torch
from torch import nn

from refconv_train.methods.reparam.weight import (
    CentredWeightNorm,
    OrthogonalWeightNorm,
    apply_weight_reparam,
    fuse_weight,
)
from refconv_train.methods.reparam.weight_math import centred_weight_norm, orthogonal_weight_norm

pytestmark = pytest.mark.usefixtures("one_thread_module")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).double()


def reference_weights(model: nn.Sequential, method: str) -> list[torch.Tensor]:
    """W of each conv computed from its current parameters, from the pure functions, without the module."""
    out = []
    for conv in (model[0], model[2]):
        p = conv.parametrizations.weight
        if method == "cwn":
            out.append(centred_weight_norm(p.original0, p.original1, p[0].eps))
        else:
            out.append(orthogonal_weight_norm(p.original, p[0].group, p[0].eps))
    return out


def reference_output(model: nn.Sequential, method: str, x: torch.Tensor) -> torch.Tensor:
    w0, w2 = reference_weights(model, method)
    y = torch.relu(nn.functional.conv2d(x, w0, model[0].bias, padding=1))
    return nn.functional.conv2d(y, w2, model[2].bias, padding=1)


def cached_then_edited(method: str, x: torch.Tensor) -> nn.Sequential:
    """A model whose W cache was filled by a no-grad eval forward, then whose parameters were edited via ``.data``."""
    model = net()
    apply_weight_reparam(model, method, example=torch.randn(1, 3, 8, 8, dtype=torch.float64))
    model.eval()
    with torch.no_grad():
        model(x)
        for conv in (model[0], model[2]):
            for p in conv.parametrizations.weight.parameters():  # V (scaled and shifted: a new matrix), CWN's g
                p.data.mul_(1.5).add_(0.1 * torch.rand_like(p))
    return model


@pytest.mark.parametrize("method", ["cwn", "own"])
def test_an_edit_through_data_reaches_the_eval_output(method):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = cached_then_edited(method, x)
    expected = reference_output(model, method, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["cwn", "own"])
def test_an_edit_through_data_reaches_the_fused_kernel(method):
    model = cached_then_edited(method, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    kernels = reference_weights(model, method)
    assert fuse_weight(model) == ["0", "2"]
    torch.testing.assert_close(model[0].weight.detach(), kernels[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[2].weight.detach(), kernels[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [CentredWeightNorm, OrthogonalWeightNorm])
def test_the_cache_serves_unchanged_parameters_without_recomputing(make):
    p = make().double()
    args = (torch.rand(4, 1, 1, 1, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64))
    args = args if isinstance(p, CentredWeightNorm) else args[1:]
    calls = []
    compute = p._compute
    p._compute = lambda *t: calls.append(1) or compute(*t)
    with torch.no_grad():
        first, second = p(*args), p(*args)
        assert second is first and len(calls) == 1
        args[-1].data.add_(1.0)  # no version bump: found by the content check
        assert not torch.equal(p(*args), first) and len(calls) == 2
    p(*args)  # autograd on: always computed
    assert len(calls) == 3
