"""The comparison methods through refconv-train, refconv-fuse, refconv-eval and timm: one key picks the method, the
run ends with a verified fused checkpoint of the original architecture, resume is exact, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cli_helpers import assert_one_line_error, call
from conftest import TINY_MODEL, one_thread, tiny_train_args

from refconv_train.cli import eval as eval_cli
from refconv_train.cli import fuse as fuse_cli
from refconv_train.cli import train as train_cli
from refconv_train.config import load_config
from refconv_train.models import build_model
from refconv_train.run.restore import restore_any


def method_args(tiny_runs, out: Path, method: str, *extra: str) -> list[str]:
    """One epoch of ``method`` from the session's trained baseline (a pretrained start, as the paper's stage 2)."""
    return tiny_train_args(tiny_runs.data, out, f"model.pretrained={tiny_runs.baseline / 'best.pth'}",
                           f"method={method}", "optim.epochs=1", *extra)


@pytest.fixture(scope="module")
def dbb_run(tiny_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dbb")
    with one_thread():
        rc, _, err = call(train_cli.main, method_args(tiny_runs, out, "dbb"))
    assert rc == 0, err[-3000:]
    return out


def test_dbb_run_writes_reports_and_a_fused_model_that_timm_loads(tiny_runs, dbb_run):
    report = json.loads((dbb_run / "reparam_report.json").read_text())
    assert report["method"] == "dbb" and report["changed"] > 0 and report["start_max_abs_diff"] == 0.0
    baseline_params = sum(p.numel() for p in timm.create_model(TINY_MODEL, num_classes=tiny_runs.classes).parameters())
    assert report["train_params"] == baseline_params + report["added_params"] > baseline_params
    assert "dbb: changed" in (dbb_run / "reparam_report.txt").read_text()

    fused = torch.load(dbb_run / "fused.pth", weights_only=True)
    assert fused["max_abs_diff"] <= 1e-4 * fused["output_scale"]
    model = timm.create_model(TINY_MODEL, num_classes=tiny_runs.classes, checkpoint_path=str(dbb_run / "fused.pth"))
    trained = restore_any(dbb_run / "last.pth")
    assert trained.kind == "dbb"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained.model.eval()(x), atol=1e-4, rtol=0)


def test_fuse_cli_and_eval_agree_with_the_training_run(tiny_runs, dbb_run, tmp_path):
    out = tmp_path / "dbb_fused.pth"
    rc, stdout, err = call(fuse_cli.main, [dbb_run / "last.pth", "-o", out])
    assert rc == 0, err
    assert "max_abs_diff=" in stdout
    results = {}
    for ckpt in (dbb_run / "last.pth", out):
        rc, stdout, err = call(eval_cli.main, ["--data", tiny_runs.data, "--checkpoint", ckpt, "--workers", "0"])
        assert rc == 0, err
        results[ckpt.name] = stdout.strip().splitlines()[-1].split()[:3]  # top1, top5, loss
    assert results["last.pth"] == results["dbb_fused.pth"]


def test_a_method_checkpoint_is_a_pretrained_start_fused_on_the_fly(tiny_runs, dbb_run):
    """model.pretrained may name an ACB/DBB/... training checkpoint: its weights arrive fused, strictly loaded."""
    model = build_model(TINY_MODEL, num_classes=tiny_runs.classes, pretrained=str(dbb_run / "last.pth"))
    fused = torch.load(dbb_run / "fused.pth", weights_only=True)["state_dict"]
    start = model.state_dict()
    assert start.keys() == fused.keys()
    for key in fused:
        torch.testing.assert_close(start[key], fused[key], atol=1e-5, rtol=0)


def test_cwn_run_reports_how_far_its_projected_start_moved(tiny_runs, tmp_path, caplog):
    with one_thread():
        rc, _, err = call(train_cli.main, method_args(tiny_runs, tmp_path, "cwn", "train.amp=bf16"))
    assert rc == 0, err[-3000:]
    report = json.loads((tmp_path / "reparam_report.json").read_text())
    assert report["start_max_abs_diff"] > 0
    assert 0 <= report["start_top1"] <= 100 and report["start_loss"] > 0  # the evaluation before the first step
    fused = torch.load(tmp_path / "fused.pth", weights_only=True)
    assert fused["max_abs_diff"] <= 1e-4 * fused["output_scale"]


@pytest.mark.parametrize("overrides, pattern", [
    (["reparam.method=acb"], r"'reparam.method' is gone: use the top-level key 'method' \(e.g. method: dbb"),
    (["refocus.enabled=false"], r"'refocus.enabled' is gone: choose the method with the top-level key 'method'"),
    (["method=wn", "wn.branch_scale=1"], r"unknown config key 'wn.branch_scale' \(method wn's options: exclude\)"),
    (["method=bn"], r"unknown method 'bn': use one of none, refconv, acb, repvgg"),
    (["method=acb", "acb.branch_scale=-1"], r"'acb.branch_scale' must be"),
])
def test_bad_method_settings_are_one_line_errors(tiny_runs, tmp_path, overrides, pattern):
    args = tiny_train_args(tiny_runs.data, tmp_path / "out", *overrides)
    assert_one_line_error(*call(train_cli.main, args)[::2], pattern)
    assert not (tmp_path / "out").exists()


def test_a_method_that_finds_nothing_to_change_is_a_one_line_error(tiny_runs, tmp_path):
    args = method_args(tiny_runs, tmp_path, "repvgg", "repvgg.exclude=['.*']")
    assert_one_line_error(*call(train_cli.main, args)[::2], r"repvgg found no convolution to change")
    assert not (tmp_path / "last.pth").exists()


def test_configs_of_the_paper_s_two_models_load_for_every_method():
    for arch in ("resnet18", "mobilenetv2"):
        for method in ("acb", "repvgg", "dbb", "wn", "cwn", "own"):
            cfg = load_config(f"configs/{arch}_{method}.yaml")
            assert cfg.method == method and not (cfg.method == "refconv")


# ----------------------------------------------------------------------------------------------- long runs
def _run(argv: list[str], fault: str = "", nproc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", REFCONV_FAULT=fault)
    cmd = [sys.executable, "-m", "refconv_train.cli.train", *argv]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *cmd[1:]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def test_acb_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run_bit_for_bit(tiny_runs, tmp_path):
    def args(out: Path) -> list[str]:
        return method_args(tiny_runs, out, "acb", "train.resume=auto", "data.workers=2", "train.deterministic=true",
                           "train.checkpoint_every_steps=2", "optim.epochs=2")

    straight = _run(args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(args(tmp_path / "killed"), fault="kill@7")
    assert killed.returncode == -9
    resumed = _run(args(tmp_path / "killed"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and any("rep_branches" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_repvgg_under_torchrun_with_two_processes_trains_and_fuses(tiny_runs, tmp_path):
    proc = _run(method_args(tiny_runs, tmp_path, "repvgg", "data.batch_size=8"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fused = torch.load(tmp_path / "fused.pth", weights_only=True)
    assert fused["max_abs_diff"] <= 1e-4 * fused["output_scale"]
