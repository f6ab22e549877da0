"""Training checkpoints written before the top-level ``method`` key (tests/fixtures/README.md: main at eef87da, their
stored configs say ``refocus.enabled`` / ``reparam.method``) still fuse, evaluate and resume; a user's config with
the old keys is a one-line error naming the new key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import assert_one_line_error, call
from conftest import one_thread

from refconv_train import read_state_dict
from refconv_train.checkpoint import checkpoint_method
from refconv_train.cli import eval as eval_cli
from refconv_train.cli import fuse as fuse_cli
from refconv_train.cli import train as train_cli
from refconv_train.config import config_from_dict
from refconv_train.methods.legacy import translate_legacy

FIXTURES = Path(__file__).parent / "fixtures"
OLD = {"refconv": FIXTURES / "main_refconv_last.pth", "none": FIXTURES / "main_plain_last.pth"}
MODEL = ["model.name=test_efficientnet", "model.kwargs.channel_multiplier=0.25", "model.num_classes=3"]


def fresh_model() -> torch.nn.Module:
    return timm.create_model("test_efficientnet", num_classes=3, channel_multiplier=0.25)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from refconv_train.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("legacy") / "demo", num_classes=3, train_per_class=8,
                          val_per_class=4, size=32)


@pytest.mark.parametrize("method", ["refconv", "none"])
def test_an_old_checkpoint_s_method_is_read_from_its_stored_config(method):
    ckpt = torch.load(OLD[method], weights_only=True)
    assert "method" not in ckpt and "refocus" in ckpt["config"]  # really the old layout
    assert checkpoint_method(ckpt) == method and config_from_dict(ckpt["config"]).method == method
    fresh_model().load_state_dict(read_state_dict(OLD[method]), strict=True)  # fused (RefConv) on the fly


def test_translation_maps_each_old_method_to_its_section():
    old = {"refocus": {"enabled": False}, "reparam": {"method": "own", "own_group": 4, "branch_scale": 0.0,
                                                      "exclude": ["stem"]}}
    assert translate_legacy(old) == {"method": "own", "own": {"group": 4, "exclude": ["stem"]}}
    assert translate_legacy({"refocus": {"enabled": True, "init": "zeros"}, "reparam": {"method": "none"}}) == \
        {"method": "refconv", "refconv": {"init": "zeros"}}
    assert translate_legacy({"method": "dbb"}) == {"method": "dbb"}


def test_an_old_refconv_checkpoint_fuses_verified_and_evaluates(data, tmp_path):
    with one_thread():
        rc, out, err = call(fuse_cli.main, [OLD["refconv"], "-o", tmp_path / "fused.pth"])
    assert rc == 0, err[-3000:]
    fused = torch.load(tmp_path / "fused.pth", weights_only=True)
    assert fused["max_abs_diff"] <= 1e-4 * fused["output_scale"] and fused["config"]["method"] == "refconv"
    fresh_model().load_state_dict(fused["state_dict"], strict=True)
    for ckpt in (OLD["refconv"], OLD["none"], tmp_path / "fused.pth"):
        with one_thread():
            rc, out, err = call(eval_cli.main, ["--data", data, "--checkpoint", ckpt, "--device", "cpu",
                                                "--workers", 0])
        assert rc == 0 and out.strip().splitlines()[-1].startswith("top1="), err[-3000:]


def test_an_old_plain_checkpoint_is_not_fused(tmp_path):
    assert_one_line_error(*call(fuse_cli.main, [OLD["none"], "-o", tmp_path / "f.pth"])[::2],
                          r"not a re-parameterized training checkpoint \(it holds a baseline training checkpoint")


@pytest.mark.parametrize("method, keys", [
    ("refconv", ["refconv.base_init=random", r"refconv.exclude=[blocks\.4]"]),
    ("none", ["method=none"]),
])
def test_an_old_checkpoint_resumes_under_the_new_key(data, tmp_path, method, keys):
    shutil.copy(OLD[method], tmp_path / "last.pth")
    args = [*MODEL, f"data.root={data}", "data.img_size=32", "data.batch_size=8", "data.workers=0", "optim.epochs=2",
            "optim.warmup_epochs=0", "train.max_steps_per_epoch=2", "train.device=cpu", f"train.output={tmp_path}",
            "model.pretrained=false", *keys]
    with one_thread():
        rc, _, err = call(train_cli.main, ["--config", "configs/demo.yaml", *args])
    assert rc == 0, err[-3000:]
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("2,")  # header + epoch 2 only: it went on from the old epoch 1
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["method"] == method and len(ckpt["history"]) == 2
    assert (tmp_path / "fused.pth").is_file() == (method == "refconv")


def test_old_keys_in_a_user_config_are_one_line_errors_naming_the_new_key(tmp_path):
    (tmp_path / "old.yaml").write_text("refocus:\n  enabled: false\nreparam:\n  method: dbb\n")
    assert_one_line_error(*call(train_cli.main, ["--config", tmp_path / "old.yaml"])[::2],
                          r"config key 'refocus' is gone: .*top-level key 'method'")
    assert_one_line_error(*call(train_cli.main, ["reparam.branch_scale=1"])[::2],
                          r"'reparam.branch_scale' is gone: .*method=dbb dbb.branch_scale=1")


def test_a_structural_checkpoint_of_the_old_layout_is_refused_everywhere_and_the_new_one_resumes(data, tmp_path):
    """ACB/RepVGG/DBB training checkpoints written before their branches were summed after the conv's BN (layout 1,
    no ``method_layout`` key) load strictly into today's blocks and would compute another function: fuse, eval and
    resume refuse them with one line; today's (layout 2) resume."""
    out = tmp_path / "run"
    args = [*MODEL, f"data.root={data}", "data.img_size=32", "data.batch_size=8", "data.workers=0", "optim.epochs=1",
            "optim.warmup_epochs=0", "train.max_steps_per_epoch=2", "train.device=cpu", "model.pretrained=false",
            "method=dbb"]
    with one_thread():
        rc, _, err = call(train_cli.main, ["--config", "configs/demo.yaml", *args, f"train.output={out}"])
    assert rc == 0, err[-3000:]
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["method"] == "dbb" and ckpt["method_layout"] == 2
    old = tmp_path / "old"
    old.mkdir()
    del ckpt["method_layout"]
    torch.save(ckpt, old / "last.pth")
    pattern = r"DBB training checkpoint of layout 1; .* layout 2, .* deploy the fused.pth"
    assert_one_line_error(*call(fuse_cli.main, [old / "last.pth", "-o", tmp_path / "f.pth"])[::2], pattern)
    assert_one_line_error(*call(eval_cli.main, ["--data", data, "--checkpoint", old / "last.pth",
                                                "--workers", "0"])[::2], pattern)
    with one_thread():
        assert_one_line_error(*call(train_cli.main, ["--config", "configs/demo.yaml", *args, "optim.epochs=2",
                                                     f"train.output={old}"])[::2], pattern)
        rc, _, err = call(train_cli.main, ["--config", "configs/demo.yaml", *args, "optim.epochs=2",
                                           f"train.output={out}"])
    assert rc == 0, err[-3000:]
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 2
