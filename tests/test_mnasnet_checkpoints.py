"""torchvision's MNASNet refuses a state dict without its module versions (``_metadata``): every file we write must
carry them, through refconv-train -> refconv-fuse -> refconv-eval -> a plain torchvision load, and resume."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torchvision
from cli_helpers import call, train_args
from conftest import one_thread
from safetensors.torch import load_file

from refconv_train import build_model, read_state_dict
from refconv_train.checkpoint import atomic_save_safetensors
from refconv_train.cli import eval as eval_cli
from refconv_train.cli import fuse as fuse_cli
from refconv_train.cli import train as train_cli
from refconv_train.demo_data import make_demo_data

CLASSES = 10


def mnasnet() -> torch.nn.Module:
    return torchvision.models.mnasnet0_5(num_classes=CLASSES)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("mnasnet") / "data", num_classes=CLASSES, train_per_class=2,
                          val_per_class=1, size=32)


def run(data: Path, out: Path, *extra: str) -> None:
    args = train_args(data, out, CLASSES, "model.name=torchvision:mnasnet0_5", "method=none",
                      "optim.epochs=2", "optim.warmup_epochs=0", "optim.lr=0.01", "train.max_steps_per_epoch=2",
                      *extra)
    with one_thread():
        rc, _, err = call(train_cli.main, args)
    assert rc == 0, err[-2000:]


def evaluate(data: Path, ckpt: Path, *extra) -> str:
    with one_thread():
        rc, out, err = call(eval_cli.main, ["--data", data, "--checkpoint", ckpt, "--workers", 0, "--batch-size", 5,
                                            "--device", "cpu", *extra])
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err
    return out.strip().splitlines()[-1]


def plain_load(state: dict) -> torch.nn.Module:
    model = mnasnet()
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("method", ["none", "dbb"])
def test_mnasnet_trains_fuses_evaluates_and_loads_into_plain_torchvision(data, tmp_path, method):
    out = tmp_path / method
    run(data, out, f"method={method}")
    last = torch.load(out / "last.pth", weights_only=True)
    assert evaluate(data, out / "last.pth").startswith("top1=")
    if method == "none":  # a baseline's own weights are the original architecture's
        plain_load(last["model"])
        return
    with one_thread():
        rc, _, err = call(fuse_cli.main, [out / "last.pth", "-o", out / "deploy.pth"])
    assert rc == 0, err[-2000:]
    fused = torch.load(out / "deploy.pth", weights_only=True)
    model = plain_load(fused["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        # the safetensors twin: our reader restores the versions from its header; the plain recipe of docs/usage.md
        torch.testing.assert_close(plain_load(read_state_dict(out / "deploy.safetensors"))(x), expected)
        state = mnasnet().state_dict()
        state.update(load_file(out / "deploy.safetensors"))
        torch.testing.assert_close(plain_load(state)(x), expected)
    assert evaluate(data, out / "deploy.pth").startswith("top1=")
    # as model.pretrained of a run with another class count: the new head keeps the file's versions
    build_model("torchvision:mnasnet0_5", num_classes=CLASSES - 3, pretrained=str(out / "deploy.pth"))
    # a last.pth written before the versions were kept: our readers take the rebuilt model's own
    torch.save({**last, "model": dict(last["model"])}, out / "old.pth")
    with one_thread():
        rc, _, err = call(fuse_cli.main, [out / "old.pth", "--format", "pth"])
    assert rc == 0, err[-2000:]
    # no --num-classes: the classifier is found on the architecture (safetensors sorts the keys: its last weight
    # is not the classifier's)
    assert evaluate(data, out / "deploy.safetensors", "--model", "torchvision:mnasnet0_5").startswith("top1=")


def test_mnasnet_run_resumes_from_its_last_checkpoint(data, tmp_path):
    run(data, tmp_path, "method=dbb", "train.stop_after_epoch=1")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1
    run(data, tmp_path, "method=dbb", "train.resume=auto")
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 2
    assert (tmp_path / "fused.pth").is_file()  # the end of a re-parameterized run fuses (needs the versions too)
    plain_load(torch.load(tmp_path / "fused.pth", weights_only=True)["state_dict"])


def test_state_dict_versions_survive_our_readers_and_writers(tmp_path):
    state = mnasnet().state_dict()
    wrapped = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())  # as DDP saves it
    wrapped._metadata = collections.OrderedDict(
        [("", {"version": 1})] + [(f"module.{k}" if k else "module", v) for k, v in state._metadata.items()])
    torch.save(wrapped, tmp_path / "ddp.pth")
    assert read_state_dict(tmp_path / "ddp.pth")._metadata == state._metadata
    atomic_save_safetensors(state, tmp_path / "sd.safetensors")
    assert read_state_dict(tmp_path / "sd.safetensors")._metadata == state._metadata
    plain_load(read_state_dict(tmp_path / "sd.safetensors"))
