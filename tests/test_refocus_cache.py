"""RefConv caches ``W_t`` while autograd is off and the patches of a frozen ``W_b``; an edit that bypasses the version
counter (``p.data``: old-style optimizers, manual surgery) must still reach the eval output and the fused kernel."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from refconv_train import fuse_model, refocus_model
from refconv_train.methods.refconv.kernel_math import refocus_delta

pytestmark = pytest.mark.usefixtures("one_thread_module")


def net() -> nn.Sequential:
    torch.manual_seed(0)  # a dense conv and a depthwise one (the depthwise transform runs on cached patches)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)).double()


def reference_output(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The model's function computed from its current W_b and W_r by the pure transform, without the module."""
    weights = []
    for conv in (model[0], model[2]):
        p = conv.parametrizations.weight
        weights.append(p.original + refocus_delta(p.original, p[0].refocus_weight))
    y = torch.relu(nn.functional.conv2d(x, weights[0], model[0].bias, padding=1))
    return nn.functional.conv2d(y, weights[1], model[2].bias, padding=1, groups=8)


@pytest.mark.parametrize("edited", ["refocus_weight", "base"])
def test_an_edit_through_data_reaches_eval_and_fuse(edited):
    model = net()
    refocus_model(model, init="kaiming", check_base=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        model(x)  # fills both caches
        for conv in (model[0], model[2]):
            p = conv.parametrizations.weight
            tensor = p[0].refocus_weight if edited == "refocus_weight" else p.original
            tensor.data.mul_(1.5)  # bypasses the version counter
        expected = reference_output(model, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        fuse_model(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_unchanged_inputs_are_served_from_the_cache():
    model = net()
    refocus_model(model, init="kaiming", check_base=False)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        cached = [conv.parametrizations.weight[0]._eval_weight[2] for conv in (model[0], model[2])]
        model(x)
        again = [conv.parametrizations.weight[0]._eval_weight[2] for conv in (model[0], model[2])]
    assert all(a is b for a, b in zip(cached, again))
