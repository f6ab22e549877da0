"""Inject -> randomize -> fuse -> strict reload into a fresh original model -> identical outputs, on real models."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from refconv_train import build_model, fuse_model, max_output_diff, randomize_bn_stats, refocus_model
from refconv_train.methods.refconv import refocus_parameters

MODELS = [
    "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "tf_efficientnet_lite0", "resnet18",
    "resnext26ts", "densenet121", "convnext_atto", "fasternet_t0", "mobilenetv1_100",
    "torchvision:shufflenet_v2_x0_5", "torchvision:mobilenet_v2",
]
INPUT = (3, 64, 64)


@pytest.mark.parametrize("name", MODELS)
def test_fused_model_loads_strictly_into_original_and_matches_refconv_outputs(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    original_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    original_classes = {n: type(m) for n, m in model.named_modules()}
    report = refocus_model(model, init="kaiming")  # large random W_r: W_t far from W_b
    assert report.layers
    randomize_bn_stats(model, seed=1)
    with torch.no_grad():
        for p in refocus_parameters(model):
            p.normal_(0, 0.05)
    model.eval()
    x = torch.randn(2, *INPUT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        refconv_out = model(x)

    fused_names = fuse_model(model)
    assert len(fused_names) == len(report.layers)
    assert {n: type(m) for n, m in model.named_modules()} == original_classes
    fused_state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in fused_state.items()} == original_keys

    fresh = build_model(name, num_classes=10)
    fresh.load_state_dict(fused_state, strict=True)
    fresh.eval()
    with torch.no_grad():
        diff = (fresh(x) - refconv_out).abs().max().item()
    assert diff <= 1e-5, f"{name}: max abs diff {diff}"
    assert max_output_diff(model, fresh, INPUT) == 0.0
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert fuse_model(model) == []  # idempotent


def test_dynamic_same_padding_is_kept():
    model = build_model("tf_efficientnet_lite0", num_classes=10)
    same = [m for m in model.modules() if type(m).__name__ == "Conv2dSame"]
    assert same, "tf_ models use timm's Conv2dSame (dynamic 'same' padding)"
    refocus_model(model)
    assert all(isinstance(m, nn.Conv2d) and "Conv2dSame" in type(m).__mro__[1].__name__ for m in same
               if parametrize.is_parametrized(m))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 10)  # odd size needs the dynamic padding


def test_fusing_a_deep_copy_leaves_the_original_refocused_model_working():
    import copy

    model = build_model("mobilenetv2_050", num_classes=10)
    refocus_model(model)
    twin = copy.deepcopy(model)  # e.g. an EMA copy
    fuse_model(twin)
    model.eval()
    twin.eval()
    x = torch.randn(1, *INPUT)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), atol=1e-5, rtol=0)
    assert len(fuse_model(model)) > 0
