"""build_model: names, library hub loaders (through local files), local weights in every format, strictness."""

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from refconv_train import RefconvError, build_model, fuse_model, refocus_model
from refconv_train.checkpoint import CHECKPOINT_FORMAT


def weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(3)
    return build_model("mobilenetv2_050", num_classes=7)


@pytest.mark.parametrize("wrap", ["plain", "timm", "ours", "ddp", "torchvision_refs", "safetensors"])
def test_local_weights_load_in_every_format(tmp_path, source, wrap):
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pth")
    if wrap == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        obj = {
            "plain": state,
            "timm": {"state_dict": state, "epoch": 3, "arch": "mobilenetv2_050"},
            "ours": {"format": CHECKPOINT_FORMAT, "model": state, "epoch": 1},
            "ddp": {f"module.{k}": v for k, v in state.items()},
            "torchvision_refs": {"model": state, "optimizer": {}, "epoch": 2},
        }[wrap]
        torch.save(obj, path)
    model = build_model("mobilenetv2_050", num_classes=7, pretrained=str(path))
    assert weights_equal(model, source)


def test_refocus_checkpoint_as_pretrained_loads_its_fused_weights(tmp_path, source):
    model = build_model("mobilenetv2_050", num_classes=7, pretrained=False)
    model.load_state_dict(source.state_dict())
    refocus_model(model, init="kaiming")
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict()}, tmp_path / "last.pth")
    fuse_model(model)
    loaded = build_model("mobilenetv2_050", num_classes=7, pretrained=tmp_path / "last.pth")
    assert weights_equal(loaded, model)


def test_weights_for_another_architecture_name_the_mismatching_keys(tmp_path, source):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(RefconvError, match=r"do not fit the model: missing .*unexpected") as e:
        build_model("resnet18", num_classes=7, pretrained=tmp_path / "w.pth")
    assert "\n" not in str(e.value)
    state = dict(source.state_dict())
    state["conv_stem.weight"] = torch.zeros(16, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RefconvError, match=r"conv_stem.weight has shape \(16, 3, 5, 5\)"):
        build_model("mobilenetv2_050", num_classes=7, pretrained=tmp_path / "bad.pth")


def test_other_class_count_reinitialises_only_the_classifier(tmp_path, source, caplog):
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_model("mobilenetv2_050", num_classes=3, pretrained=tmp_path / "w.pth")
    assert model.classifier.out_features == 3
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert "classifier" in caplog.text


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(RefconvError, match="not found"):
        build_model("mobilenetv2_050", pretrained=tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RefconvError, match="not a readable PyTorch file"):
        build_model("mobilenetv2_050", pretrained=tmp_path / "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "nomodel.pth")
    with pytest.raises(RefconvError, match="holds no model state dict"):
        build_model("mobilenetv2_050", pretrained=tmp_path / "nomodel.pth")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    Exploit.marker = marker
    torch.save({"state_dict": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(RefconvError, match="pickled objects or code"):
        build_model("mobilenetv2_050", pretrained=tmp_path / "evil.pth")
    assert not marker.exists()


def test_unknown_names_suggest_close_ones():
    with pytest.raises(RefconvError, match=r"did you mean .*mobilenetv2_100"):
        build_model("mobilenetv2_10")
    with pytest.raises(RefconvError, match=r"did you mean .*shufflenet_v2_x1_0"):
        build_model("torchvision:shufflenet_v2_x1_O")


def test_timm_hub_loader_is_used_for_library_weights(tmp_path, source):
    """pretrained=True goes through timm's own pretrained loader; a local file stands in for the hub."""
    torch.save(source.state_dict(), tmp_path / "hub.pth")
    model = build_model("mobilenetv2_050", num_classes=7, pretrained=True,
                        pretrained_cfg_overlay=dict(file=str(tmp_path / "hub.pth"), num_classes=7))
    assert weights_equal(model, source)


def test_torchvision_weights_enum_is_used_for_library_weights(tmp_path, monkeypatch):
    weights = torchvision.models.get_model_weights("shufflenet_v2_x0_5").DEFAULT
    torch.manual_seed(4)
    reference = torchvision.models.shufflenet_v2_x0_5()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / os.path.basename(weights.url))  # torch.hub's download cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model("torchvision:shufflenet_v2_x0_5", pretrained=True)
    assert weights_equal(model, reference)
    small = build_model("torchvision:shufflenet_v2_x0_5", num_classes=4, pretrained=True)
    assert small.fc.out_features == 4 and torch.equal(small.conv1[0].weight, reference.conv1[0].weight)


def test_offline_hub_is_a_clear_error():
    code = ("from refconv_train import build_model, RefconvError\n"
            "try:\n build_model('mobilenetv2_050', pretrained=True)\n"
            "except RefconvError as e:\n print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR could not load timm's pretrained weights" in out.stdout
    assert "model.pretrained" in out.stdout
