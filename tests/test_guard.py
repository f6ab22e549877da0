"""RefConv refocuses trained kernels: a zero kernel is an error, a fresh init a warning, a random base an opt-in."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from cli_helpers import assert_one_line_error, call
from conftest import one_thread
from torch import nn
from torch.nn.utils import parametrize

from refconv_train import RefconvError, refocus_model
from refconv_train.cli.train import main as train_main
from refconv_train.config import config_from_dict, load_config
from refconv_train.methods.refconv.base_check import MIN_VALUES, looks_like_init
from refconv_train.models import build_training_model

LITE0 = Path(os.environ.get("REFCONV_LITE0", "data/tf_efficientnet_lite0_imagenet.pth"))  # scripts/convert_...


def refocus_warnings(model: nn.Module, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refocus_model(model, **kwargs)
    return [str(w.message) for w in caught if "look untrained" in str(w.message)]


def spatial_kernels(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and min(m.kernel_size) >= 3]


# ----------------------------------------------------------------------------------------------- dead layers
def test_all_zero_kernel_is_a_one_line_error_naming_the_layer_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
    nn.init.zeros_(model[2].weight)  # the authors' module keeps W_b as a zero buffer to be filled
    with pytest.raises(RefconvError, match=r"conv '2' has an all-zero kernel, a dead layer.*base_init='random'") as e:
        refocus_model(model)
    assert "\n" not in str(e.value)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # nothing refocused half way


def test_zero_kernel_is_accepted_for_the_random_base_ablation_and_when_excluded():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    nn.init.zeros_(model[1].weight)
    assert len(refocus_model(model, base_init="random").layers) == 2
    assert model[1].parametrizations.weight.original.abs().sum() > 0  # re-drawn
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    nn.init.zeros_(model[1].weight)
    assert [layer.name for layer in refocus_model(model, exclude=["^1$"]).layers] == ["0"]


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_refuses_refocus_without_pretrained_weights_in_one_line(tmp_path):
    argv = ["model.name=mobilenetv2_050", "model.pretrained=false", f"data.root={tmp_path}", "train.device=cpu",
            f"train.output={tmp_path / 'out'}"]
    rc, _, err = call(train_main, argv)
    line = assert_one_line_error(rc, err, r"model\.pretrained=false")
    assert "model.pretrained=<checkpoint or true>" in line and "refconv.base_init=random" in line
    assert not (tmp_path / "out").exists()


def test_config_accepts_the_explicit_ablation_baselines_and_stored_configs():
    with pytest.raises(RefconvError, match="refconv.base_init=random"):
        load_config(None, ["model.pretrained=false"])
    ablation = load_config(None, ["model.pretrained=false", "refconv.base_init=random"])
    assert ablation.options["refconv"].base_init == "random"
    assert load_config(None, ["model.pretrained=false", "method=none"]).method == "none"
    assert load_config(None, ["model.pretrained=runs/base/best.pth"]).method == "refconv"
    # A checkpoint's stored config is not a run to start: its weights are in the file.
    assert config_from_dict({"model": {"pretrained": False}}).model.pretrained is False


def test_shipped_configs_that_refocus_a_random_base_say_so():
    for path in Path("configs").rglob("*.yaml"):
        if path.name == "demo.yaml":  # its refocus stage always sets model.pretrained (scripts/demo.sh)
            continue
        try:
            cfg = load_config(path)
        except RefconvError as e:  # a config of another kind (the study's plan files) fails otherwise
            assert "refconv.base_init=random" not in str(e), path  # one that refocuses an untrained model
            continue
        if (cfg.method == "refconv") and cfg.model.pretrained is False:
            assert cfg.options["refconv"].base_init == "random", path


# ----------------------------------------------------------------------------------------------- untrained kernels
TIMM_INITS = ["mobilenetv2_050", "resnet18", "tf_efficientnet_lite0", "convnext_atto", "regnetx_002", "ghostnet_050",
              "repvgg_a0", "densenet121"]
TORCHVISION_INITS = ["mobilenet_v3_large", "resnet18", "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_y_400mf",
                     "mnasnet0_5", "squeezenet1_0"]


@pytest.mark.parametrize("name", [f"timm:{n}" for n in TIMM_INITS] + [f"torchvision:{n}" for n in TORCHVISION_INITS])
def test_fresh_inits_of_timm_and_torchvision_models_look_untrained_in_every_layer(name):
    torch.manual_seed(0)
    lib, arch = name.split(":")
    model = timm.create_model(arch) if lib == "timm" else torchvision.models.get_model(arch)
    convs = [c for c in spatial_kernels(model) if c.weight.numel() >= MIN_VALUES]  # smaller: too few to tell
    assert convs and all(looks_like_init(c.weight, c.groups) for c in convs)


def test_fresh_detector_and_segmenter_backbones_warn_once():
    det = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights_backbone=None, num_classes=3)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=3)
    for backbone in (det.backbone, seg.backbone):
        messages = refocus_warnings(backbone)
        assert len(messages) == 1 and "load the model's trained weights first" in messages[0]


def test_constant_kernels_warn_and_the_random_base_ablation_does_not():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    nn.init.constant_(model[0].weight, 0.1)
    nn.init.constant_(model[1].weight, -0.2)
    assert refocus_warnings(model)
    assert not refocus_warnings(timm.create_model("mobilenetv2_050"), base_init="random")


def test_restoring_a_checkpoints_architecture_does_not_warn():
    cfg = load_config(None, ["model.name=mobilenetv2_050", "model.num_classes=3", "model.pretrained=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_training_model(cfg, pretrained=False)  # the bare architecture: the checkpoint's weights follow
    assert not [w for w in caught if "look untrained" in str(w.message)]


def smooth(weight: torch.Tensor) -> torch.Tensor:
    """Neighbouring taps averaged: the spatial structure trained kernels have and inits lack."""
    w = weight.detach()
    return (w + w.roll(1, -1) + w.roll(1, -2)) / 3


def test_smooth_kernels_with_an_inits_exact_scale_do_not_look_untrained():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3)
    assert looks_like_init(conv.weight)
    w = smooth(conv.weight)
    w *= conv.weight.std() / w.std()  # same mean and scale as the init: only the structure differs
    assert not looks_like_init(w)


def test_a_trained_model_does_not_warn():
    """A small ConvNet trained (2 s) to tell oriented gradients apart: its kernels learn structure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4))
    assert refocus_warnings(copy.deepcopy(model))  # before training
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ramp = torch.linspace(-1, 1, 12)
    patterns = torch.stack([ramp.view(1, -1).expand(12, 12), ramp.view(-1, 1).expand(12, 12),
                            (ramp.view(1, -1) + ramp.view(-1, 1)) / 2, (ramp.view(1, -1) - ramp.view(-1, 1)) / 2])
    with one_thread():
        for _ in range(150):
            y = torch.randint(4, (32,))
            x = patterns[y].unsqueeze(1) * torch.rand(32, 1, 1, 1) + 0.3 * torch.randn(32, 1, 12, 12)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert loss.item() < 0.7
    assert not refocus_warnings(model)


@pytest.mark.skipif(not LITE0.is_file(), reason=f"no {LITE0} (scripts/convert_efficientnet_lite0.py writes it)")
def test_imagenet_efficientnet_lite0_does_not_warn():
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(torch.load(LITE0, weights_only=True))
    assert not refocus_warnings(model)
    assert sum(looks_like_init(c.weight, c.groups) for c in spatial_kernels(model)) <= 1  # of 17

