"""refconv-train end to end on generated data: baseline -> refocus -> fused, schedule, resume, DDP, bad input."""

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, train_args
from conftest import one_thread

from refconv_train import build_model, max_output_diff
from refconv_train.cli.train import main as train_main
from refconv_train.config import OptimConfig
from refconv_train.demo_data import make_demo_data
from refconv_train.methods.refconv import BASE_KEY, REFOCUS_KEY
from refconv_train.run.factories import build_scheduler

MODEL = "mobilenetv2_050"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", num_classes=4, train_per_class=8,
                          val_per_class=3, size=32)


def args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return train_args(data_root, out, 4, "optim.epochs=1", "optim.warmup_epochs=1", "optim.lr=0.4", *extra)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_baseline_then_refocus_run_writes_verified_fused_model(data_root, tmp_path, capsys):
    base_out, ref_out = tmp_path / "baseline", tmp_path / "refocus"
    assert train_main(args(data_root, base_out, "method=none")) == 0
    for name in ("last.pth", "best.pth", "config.yaml", "summary.csv"):
        assert (base_out / name).is_file(), name
    assert list((base_out / "tb").iterdir()), "TensorBoard events"
    assert not (base_out / "fused.pth").exists()
    assert re.fullmatch(r"top1=[\d.]+ top5=[\d.]+ loss=[\d.]+ images=12 img_per_s=[\d.]+",
                        capsys.readouterr().out.strip().splitlines()[-1])

    assert train_main(args(data_root, ref_out, f"model.pretrained={base_out / 'best.pth'}",
                           "refconv.init=zeros")) == 0
    baseline = load(base_out / "best.pth")["model"]
    refocused = load(ref_out / "last.pth")["model"]
    bases = {k[: -len(BASE_KEY)]: v for k, v in refocused.items() if k.endswith(BASE_KEY)}
    assert bases
    for prefix, base in bases.items():
        assert torch.equal(base, baseline[prefix + ".weight"]), f"{prefix}: base kernel changed"
        assert refocused[prefix + REFOCUS_KEY].abs().sum() > 0, f"{prefix}: W_r did not learn"

    fused = load(ref_out / "fused.pth")
    assert fused["arch"] == MODEL and fused["num_classes"] == 4 and fused["max_abs_diff"] <= 1e-4
    fresh = build_model(MODEL, num_classes=4)
    fresh.load_state_dict(fused["state_dict"], strict=True)
    restored = build_model(MODEL, num_classes=4, pretrained=str(ref_out / "last.pth"))  # fuses on the fly
    assert max_output_diff(fresh, restored, (3, 32, 32)) <= 1e-5
    assert (ref_out / "fused.safetensors").is_file()
    report = (ref_out / "refocus_report.txt").read_text()
    assert "depthwise" in report and "W_r params" in report


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_refocus_run_with_autocast_and_channels_last_on_cpu(data_root, tmp_path, amp):
    """The AMP paths the CUDA runs use, as far as a CPU runs them: autocast, fp16 with GradScaler (W_r's gradient
    reaches it scaled through the per-step transform; its overflows must be seen, or W_r would turn non-finite),
    channels_last. One thread: there channels_last and contiguous convs of this model differed by 0.01, which the
    fuse check must not mistake for a wrong fuse."""
    out = tmp_path / amp
    with one_thread():
        assert train_main(args(data_root, out, f"train.amp={amp}", "train.channels_last=true", "optim.accum_steps=2",
                               "optim.lr=0.01", "refconv.init=zeros")) == 0
    ckpt = load(out / "last.pth")
    weights = [v for k, v in ckpt["model"].items() if k.endswith(REFOCUS_KEY)]
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights)  # fp32 master
    if amp == "bf16":
        assert any(w.abs().sum() > 0 for w in weights)  # W_r learned from zeros through bf16 convs
    else:  # this from-scratch model's fp16 gradients overflow: GradScaler skipped those steps and backed off
        assert ckpt["scaler"]["scale"] < 2.0**16
    assert load(out / "fused.pth")["max_abs_diff"] <= 1e-4


def test_compiled_refocus_run_on_cpu_does_not_recompile_per_step(data_root, tmp_path):
    """train.compile (inductor, CPU) with the per-step transform: a W_t swapped in every step is a graph input."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "compiled"
    assert train_main(args(data_root, out, "train.compile=true", "optim.accum_steps=2", "optim.lr=0.01")) == 0
    steps = load(out / "last.pth")["global_step"]
    assert steps == 8 and counters["stats"]["unique_graphs"] < steps, dict(counters["stats"])
    assert load(out / "fused.pth")["max_abs_diff"] <= 1e-4
    torch._dynamo.reset()


def test_sync_bn_is_used_only_with_several_cuda_processes_and_refused_on_cpu():
    from refconv_train.errors import RefconvError
    from refconv_train.run.factories import use_sync_bn

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_sync_bn(True, True, cuda) and not use_sync_bn(True, False, cpu) and not use_sync_bn(False, True, cpu)
    with pytest.raises(RefconvError, match="train.sync_bn=false") as exc:
        use_sync_bn(True, True, cpu)
    assert "\n" not in str(exc.value)


def test_sync_bn_conversion_keeps_timms_fused_activations():
    """timm's BatchNormAct2d holds its activation: torch's converter turned it into a plain SyncBatchNorm and dropped
    it. Eval mode (running statistics) needs no process group, so the converted model must compute the same."""
    import timm

    from refconv_train.run.factories import to_sync_bn

    model = timm.create_model("mobilenetv2_050", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    synced = to_sync_bn(copy.deepcopy(model)).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    torch.testing.assert_close(synced(x), expected)


def test_lr_schedule_warms_up_then_cosine_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    sched = build_scheduler(opt, OptimConfig(epochs=2, warmup_epochs=1, min_lr=1e-3, warmup_start_factor=0.01), 10)
    lrs = [opt.param_groups[0]["lr"]]
    for step in range(1, 31):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.002)  # lr * warmup_start_factor
    assert lrs[5] == pytest.approx(0.002 + 0.5 * (0.2 - 0.002))  # linear, per step
    assert lrs[10] == pytest.approx(0.2)  # peak after warmup_epochs
    assert lrs[20] == pytest.approx(1e-3 + 0.5 * (0.2 - 1e-3))  # cosine half way
    assert lrs[30] == pytest.approx(1e-3)  # min_lr at the end
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_run_stopped_after_an_epoch_and_resumed_matches_a_straight_run(data_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("method=refconv", "optim.epochs=1", "optim.warmup_epochs=1")
    assert train_main(args(data_root, straight, *common)) == 0
    assert train_main(args(data_root, resumed, *common, "train.stop_after_epoch=1")) == 0
    assert load(resumed / "last.pth")["epoch"] == 1 and not (resumed / "fused.pth").exists()
    assert train_main(args(data_root, resumed, *common)) == 0  # resume: auto
    a, b = load(straight / "last.pth"), load(resumed / "last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=0, msg=k)
    assert (resumed / "fused.pth").is_file()
    rows = (resumed / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, across the restart


def test_per_step_transform_computes_w_t_once_per_step_with_plain_autograds_gradients(data_root, tmp_path,
                                                                                    monkeypatch):
    """Default: W_t once per optimizer step, not per micro-batch (counted), and the same update as autograd through
    the transform per micro-batch (compared after one step: later steps of this tiny from-scratch model are chaotic,
    BN over 4 images of 1x1 maps, and amplify float rounding, 1e-7, to anything)."""
    from refconv_train.methods.refconv import Refocus

    computed = []
    compute = Refocus._compute
    monkeypatch.setattr(Refocus, "_compute", lambda self, *a: computed.append(torch.is_grad_enabled()) or
                        compute(self, *a))
    runs, counts = {flag: tmp_path / flag for flag in ("true", "false")}, {}
    for flag, out in runs.items():
        computed.clear()
        assert train_main(args(data_root, out, "optim.accum_steps=2", "optim.warmup_epochs=0",
                               "train.max_steps_per_epoch=1", f"refconv.per_step_transform={flag}")) == 0
        counts[flag] = sum(computed)  # with autograd on; evaluation computes W_t once, cached, without
    layers = 18  # mobilenetv2_050's refocused convs; parametrize computes each W_t once when registering it
    assert counts == {"true": layers + layers, "false": layers + 2 * layers}  # one step of 2 micro-batches
    a, b = load(runs["true"] / "last.pth")["model"], load(runs["false"] / "last.pth")["model"]
    assert any(k.endswith(REFOCUS_KEY) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_two_process_ddp_on_cpu_trains_and_counts_each_val_image_once(data_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "refconv_train.cli.train", *args(data_root, out, "optim.warmup_epochs=0",
                                                    "data.batch_size=8")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images=12 " in proc.stdout.strip().splitlines()[-1]  # 12 val images, none padded or dropped
    assert sorted(p.name for p in out.glob("*.pth")) == ["best.pth", "fused.pth", "last.pth"]
    assert load(out / "last.pth")["global_step"] == 32 // 8


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refconv_train.cli.train", *argv], capture_output=True, text=True,
                          timeout=300)


def cli_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert_one_line_error(proc.returncode, proc.stderr, pattern)


def test_bad_input_is_a_one_line_error_and_leaves_checkpoints_untouched(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"precious")
    cli_error(run_cli(args(tmp_path / "nope", out)), r"data root .*nope")
    cli_error(run_cli(args(data_root, out, "model.num_classes=5")), r"4 class.*5|5.*4 class")
    cli_error(run_cli(args(data_root, out, "optim.lrr=0.1")), r"did you mean 'optim.lr'")
    assert (out / "last.pth").read_bytes() == b"precious"


def test_broken_data_folders_are_one_line_errors(tmp_path):
    root = make_demo_data(tmp_path / "d", num_classes=4, train_per_class=4, val_per_class=2, size=32)
    empty = root / "train" / "c01_square"
    for f in empty.iterdir():
        f.unlink()
    cli_error(run_cli(args(root, tmp_path / "r1")), r"c01_square")
    root2 = make_demo_data(tmp_path / "d2", num_classes=4, train_per_class=4, val_per_class=2, size=32)
    bad = sorted((root2 / "train" / "c00_circle").iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff garbage")
    cli_error(run_cli(args(root2, tmp_path / "r2")), re.escape(bad.name))


def test_summary_rows_hold_the_per_epoch_numbers(data_root, tmp_path):
    out = tmp_path / "s"
    assert train_main(args(data_root, out, "method=none", "optim.warmup_epochs=0")) == 0
    header, row = (out / "summary.csv").read_text().strip().splitlines()
    assert header.split(",") == ["epoch", "train_loss", "top1", "top5", "val_loss", "lr", "img_per_s", "epoch_s"]
    values = dict(zip(header.split(","), map(float, row.split(","))))
    assert values["epoch"] == 1 and 0 <= values["top1"] <= 100 and not math.isnan(values["train_loss"])
