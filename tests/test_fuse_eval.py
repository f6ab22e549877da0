"""refconv-fuse and refconv-eval end to end (docs/design.md sections 4, 5), on one tiny CPU run per session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from cli_helpers import assert_one_line_error, call
from conftest import TINY_MODEL, TINY_SIZE, TinyRuns, one_thread, tiny_train_args

from refconv_train import data as data_lib
from refconv_train.cli import eval as eval_cli
from refconv_train.cli import fuse as fuse_cli
from refconv_train.cli import train as train_cli
from refconv_train.demo_data import make_demo_data
from refconv_train.run import fusing
from refconv_train.run.restore import restore_any

LINE = re.compile(r"top1=(\d+\.\d+) top5=(\d+\.\d+) loss=(\d+\.\d+) images=(\d+) img_per_s=(\d+\.\d+)")
NOT_REFCONV = re.compile(r"error: '.+' is not a re-parameterized training checkpoint \(it holds .+\)")


def eval_args(runs: TinyRuns, ckpt: Path, *extra) -> list:
    return ["--data", runs.data, "--checkpoint", ckpt, "--workers", 0, "--batch-size", 4, "--device", "cpu", *extra]


def contract_line(out: str) -> re.Match:
    match = LINE.fullmatch(out.strip().splitlines()[-1])
    assert match, f"last line is not the contract line: {out!r}"
    return match


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def val_images(tiny_runs: TinyRuns) -> torch.Tensor:
    """Every demo val image, transformed as refconv-eval does."""
    dataset = data_lib.build_dataset(tiny_runs.data, "val", data_lib.build_transform(TINY_SIZE, False))
    return data_lib.normalize_images(torch.stack([dataset[i][0] for i in range(len(dataset))]))


@pytest.fixture(scope="module")
def refconv_logits(tiny_runs: TinyRuns, val_images: torch.Tensor) -> torch.Tensor:
    restored = restore_any(tiny_runs.refocus / "best.pth")
    assert restored.kind == "refocus"
    with torch.no_grad():
        return restored.model.eval()(val_images)


@pytest.fixture(scope="module")
def fused_best(tiny_runs: TinyRuns, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """refconv-fuse of the refocus run's best.pth into .pth, .safetensors and .onnx; (pth path, stdout)."""
    out = tmp_path_factory.mktemp("fused") / "best_fused.pth"
    rc, stdout, err = call(fuse_cli.main, [tiny_runs.refocus / "best.pth", "-o", out,
                                           "--format", "pth", "safetensors", "onnx"])
    assert rc == 0, err
    return out, stdout


# ----------------------------------------------------------------------------------------------- refconv-fuse
def test_fuse_writes_a_checkpoint_timm_loads_unchanged_with_identical_predictions(
        tiny_runs, fused_best, val_images, refconv_logits):
    out, stdout = fused_best
    diff = float(re.search(r"max_abs_diff=(\S+)", stdout).group(1))
    assert 0 <= diff <= 1e-4
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"] == TINY_MODEL and ckpt["num_classes"] == tiny_runs.classes
    assert ckpt["max_abs_diff"] <= 1e-4
    assert not any("parametrizations" in k for k in ckpt["state_dict"])

    model = timm.create_model(TINY_MODEL, num_classes=tiny_runs.classes, checkpoint_path=str(out)).eval()
    with torch.no_grad():
        logits = model(val_images)
    assert torch.equal(logits.argmax(1), refconv_logits.argmax(1))
    torch.testing.assert_close(logits, refconv_logits, atol=1e-4, rtol=0)


def test_fused_safetensors_and_onnx_agree_with_pytorch(tiny_runs, fused_best, val_images, refconv_logits):
    import onnxruntime
    from safetensors.torch import load_file

    out, _ = fused_best
    model = timm.create_model(TINY_MODEL, num_classes=tiny_runs.classes).eval()
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))), strict=True)
    with torch.no_grad():
        logits = model(val_images)
    torch.testing.assert_close(logits, refconv_logits, atol=1e-4, rtol=0)

    session = onnxruntime.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": val_images.numpy()})  # the whole split: the batch axis is dynamic
    # ONNX Runtime folds the norms into the kernels and sums in another order: fp32 rounding, relative to the logits'
    # scale (a barely trained net has large logits; PyTorch fp32 itself is off from fp64 by a similar amount).
    diff = (torch.from_numpy(onnx_logits) - logits).abs().max().item()
    assert diff <= 1e-4 * max(1.0, logits.abs().max().item()), diff


def test_fuse_torchvision_model_loads_into_plain_torchvision(tiny_runs, tmp_path, val_images):
    run = tmp_path / "tv"
    assert train_cli.main(tiny_train_args(tiny_runs.data, run, "model.name=torchvision:shufflenet_v2_x0_5",
                                          "train.max_steps_per_epoch=1")) == 0
    out = tmp_path / "tv_fused.pth"
    rc, stdout, err = call(fuse_cli.main, [run / "last.pth", "-o", out])
    assert rc == 0, err

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=tiny_runs.classes).eval()
    model.load_state_dict(torch.load(out, weights_only=True)["state_dict"])
    refconv = restore_any(run / "last.pth").model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(val_images), refconv(val_images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("what, holds", [("fused", "a fused checkpoint"),
                                         ("baseline", "a baseline training checkpoint"),
                                         ("plain state dict", "a plain state dict")])
def test_fuse_refuses_a_checkpoint_that_is_not_a_refconv_training_checkpoint(tiny_runs, tmp_path, what, holds):
    if what == "fused":
        ckpt = tiny_runs.refocus / "fused.pth"
    elif what == "baseline":
        ckpt = tiny_runs.baseline / "best.pth"
    else:
        ckpt = tmp_path / "weights.pth"
        torch.save(timm.create_model(TINY_MODEL, num_classes=tiny_runs.classes).state_dict(), ckpt)
    out = tmp_path / "out.pth"
    rc, _, err = call(fuse_cli.main, [ckpt, "-o", out])
    line = assert_one_line_error(rc, err)
    assert f"(it holds {holds}" in line
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    assert NOT_REFCONV.match(line)


def test_fuse_never_overwrites_an_existing_output_without_force(tiny_runs, tmp_path):
    out = tmp_path / "taken.pth"
    out.write_bytes(b"someone else's file")
    rc, _, err = call(fuse_cli.main, [tiny_runs.refocus / "best.pth", "-o", out])
    assert "--force" in assert_one_line_error(rc, err)
    assert out.read_bytes() == b"someone else's file"
    assert not out.with_suffix(".safetensors").exists()

    rc, _, err = call(fuse_cli.main, [tiny_runs.refocus / "best.pth", "-o", out, "--force"])
    assert rc == 0, err
    assert torch.load(out, weights_only=True)["arch"] == TINY_MODEL


def test_fuse_refuses_to_write_when_the_fused_model_differs(tiny_runs, tmp_path, monkeypatch):
    real_fuse = fusing.fuse_model

    def broken_fuse(model):  # a fusing bug: one fused kernel comes out slightly wrong
        names = real_fuse(model)
        with torch.no_grad():
            model.get_submodule(names[0]).weight.add_(0.01)
        return names

    monkeypatch.setattr(fusing, "fuse_model", broken_fuse)
    out = tmp_path / "bad.pth"
    rc, _, err = call(fuse_cli.main, [tiny_runs.refocus / "best.pth", "-o", out])
    assert re.search(r"max_abs_diff=\S+ > atol=0.0001 x output scale", assert_one_line_error(rc, err))
    assert list(tmp_path.iterdir()) == []


def test_fuse_refuses_a_model_whose_outputs_are_not_finite():
    """A diverged run: max() kept 0.0 against the NaN difference, and its fused file was written as verified."""
    from refconv_train import build_model, refocus_model
    from refconv_train.errors import RefconvError
    from refconv_train.methods.refconv import refocus_parameters

    model = build_model(TINY_MODEL, num_classes=10, pretrained=False)
    refocus_model(model, init="zeros", check_base=False)
    with torch.no_grad():
        next(iter(refocus_parameters(model))).fill_(float("nan"))
    with pytest.raises(RefconvError, match="outputs are not finite"):
        fusing.fuse_and_verify(model, TINY_MODEL, 10, TINY_SIZE)


def test_full_fp32_turns_tf32_off_and_restores_the_flags():
    from refconv_train.verify import full_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with full_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


# ----------------------------------------------------------------------------------------------- refconv-eval
def test_eval_prints_the_contract_line_last_counting_every_val_image(tiny_runs):
    rc, out, err = call(eval_cli.main, eval_args(tiny_runs, tiny_runs.refocus / "best.pth"))
    assert rc == 0, err
    assert int(contract_line(out).group(4)) == tiny_runs.val_images


def test_eval_of_refconv_checkpoint_and_its_fused_twin_agree_to_the_printed_digit(tiny_runs, fused_best):
    rc, refconv_out, err = call(eval_cli.main, eval_args(tiny_runs, tiny_runs.refocus / "best.pth"))
    assert rc == 0, err
    rc, fused_out, err = call(eval_cli.main, eval_args(tiny_runs, fused_best[0]))
    assert rc == 0, err
    refconv, fused = contract_line(refconv_out), contract_line(fused_out)
    assert fused.group(1, 2) == refconv.group(1, 2)
    assert abs(float(fused.group(3)) - float(refconv.group(3))) <= 2e-4
    assert "kind=refocus" in refconv_out and "kind=fused" in fused_out


def test_eval_of_a_baseline_checkpoint(tiny_runs):
    rc, out, err = call(eval_cli.main, eval_args(tiny_runs, tiny_runs.baseline / "best.pth"))
    assert rc == 0, err
    assert "kind=baseline" in out
    assert int(contract_line(out).group(4)) == tiny_runs.val_images


def test_eval_of_a_plain_state_dict_needs_and_uses_model(tiny_runs, fused_best, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(fused_best[0], weights_only=True)["state_dict"], plain)
    rc, _, err = call(eval_cli.main, eval_args(tiny_runs, plain))
    assert "--model" in assert_one_line_error(rc, err)

    rc, out, err = call(eval_cli.main, eval_args(tiny_runs, plain, "--model", TINY_MODEL, "--img-size", TINY_SIZE))
    assert rc == 0, err
    rc, fused_out, err = call(eval_cli.main, eval_args(tiny_runs, fused_best[0]))
    assert contract_line(out).group(1, 2, 4) == contract_line(fused_out).group(1, 2, 4)


def test_eval_json_holds_the_result(tiny_runs, tmp_path):
    path = tmp_path / "result.json"
    rc, out, err = call(eval_cli.main, eval_args(tiny_runs, tiny_runs.refocus / "best.pth", "--json", path))
    assert rc == 0, err
    result = json.loads(path.read_text())
    line = contract_line(out)
    assert result["images"] == tiny_runs.val_images
    assert f"{result['top1']:.3f}" == line.group(1) and f"{result['top5']:.3f}" == line.group(2)
    assert result["loss"] >= 0 and result["img_per_s"] > 0
    assert result["model"] == TINY_MODEL and result["kind"] == "refocus" and result["split"] == "val"
    assert result["checkpoint"] == str(tiny_runs.refocus / "best.pth")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("case", ["missing checkpoint", "missing split", "class count mismatch", "pickled code"])
def test_eval_bad_input_is_one_error_line(tiny_runs, tmp_path, case):
    ckpt, extra = tiny_runs.refocus / "best.pth", []
    marker = tmp_path / "pwned"
    if case == "missing checkpoint":
        ckpt = tmp_path / "nope.pth"
    elif case == "missing split":
        extra = ["--split", "test"]
    elif case == "class count mismatch":
        other = make_demo_data(tmp_path / "four", num_classes=4, train_per_class=1, val_per_class=1, size=16)
        extra = ["--data", other]
    else:
        ckpt = tmp_path / "evil.pth"
        torch.save({"format": "refconv-train/1", "model": _RunsCode(marker)}, ckpt)
    rc, out, err = call(eval_cli.main, [*eval_args(tiny_runs, ckpt), *extra])
    line = assert_one_line_error(rc, err)
    expected = {"missing checkpoint": "not found", "missing split": "no 'test' folder",
                "class count mismatch": "has 4 class folders", "pickled code": "pickled objects or code"}[case]
    assert expected in line
    assert not marker.exists()


def test_eval_under_torchrun_counts_every_val_image_once(tiny_runs, fused_best, tmp_path):
    assert tiny_runs.val_images % (2 * 4) != 0  # shards and last batches are uneven
    path = tmp_path / "dist.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "refconv_train.cli.eval", *map(str, eval_args(tiny_runs, fused_best[0], "--json", path))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_line = contract_line(proc.stdout)
    assert int(dist_line.group(4)) == tiny_runs.val_images
    assert json.loads(path.read_text())["images"] == tiny_runs.val_images
    rc, out, err = call(eval_cli.main, eval_args(tiny_runs, fused_best[0]))
    assert dist_line.group(1, 2) == contract_line(out).group(1, 2)


def test_fuse_output_named_with_another_format_suffix_still_writes_each_format(tiny_runs, tmp_path):
    out = tmp_path / "deploy.safetensors"
    rc, _, err = call(fuse_cli.main, [tiny_runs.refocus / "best.pth", "-o", out])
    assert rc == 0, err
    assert torch.load(tmp_path / "deploy.pth", weights_only=True)["format"] == "refconv-train/fused/1"
    assert out.is_file()
