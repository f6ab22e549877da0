"""Runs that survive: SIGKILL / SIGTERM mid-epoch, elastic restarts, NaN loss, bad images, failed checkpoint writes.

Every interrupted run is resumed and must end with exactly the weights of an uninterrupted run (CPU, same seed,
DataLoader workers > 0: augmentations are seeded per sample, so they do not depend on the worker or the restart).
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import train_args

from refconv_train import RefconvError
from refconv_train import checkpoint as checkpoint_lib
from refconv_train.demo_data import make_demo_data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("d") / "demo", num_classes=4, train_per_class=8, val_per_class=2,
                          size=32)


def run_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    # 32 images / batch 8 = 4 steps per epoch, 2 epochs = 8 optimizer steps. RefConv with step normalisation: a
    # resume must also restore every W_r group's lr_scale (a W_r step at the plain lr would move its kernel ~100x).
    return train_args(data_root, out, 4, "data.workers=2", "optim.epochs=1", "optim.warmup_epochs=1",
                      "refconv.step_norm=layer", "train.deterministic=true", "train.checkpoint_every_steps=2",
                      *extra)


def run(argv: list[str], fault: str = "", nproc: int = 0, restarts: int = 0, timeout: int = 400):
    env = dict(os.environ, OMP_NUM_THREADS="1", REFCONV_FAULT=fault)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={restarts}", "-m", "refconv_train.cli.train", *argv]
    else:
        cmd = [sys.executable, "-m", "refconv_train.cli.train", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def final_weights(out: Path) -> dict:
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 0
    return ckpt["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("straight")
    proc = run(run_args(data_root, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(out)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run_bit_for_bit(data_root, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = run(run_args(data_root, out), fault="kill@6")  # epoch 1, step 2: right after a step checkpoint
    assert proc.returncode == -9
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 2, 6)
    proc = run(run_args(data_root, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step 2 of the epoch" in proc.stderr
    assert_same_weights(final_weights(out), uninterrupted)


def test_sigterm_writes_the_current_step_exits_cleanly_and_resumes_exactly(data_root, tmp_path, uninterrupted):
    out = tmp_path / "term"
    proc = run(run_args(data_root, out), fault="sigterm@2")  # arrives after step 2: step 3 finishes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SIGTERM received" in proc.stderr and "rerun the same command to resume" in proc.stderr
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (0, 3, 3)
    assert not (out / "fused.pth").exists()
    assert run(run_args(data_root, out)).returncode == 0
    assert_same_weights(final_weights(out), uninterrupted)


def test_elastic_restart_after_a_worker_crash_finishes_with_the_uninterrupted_weights(data_root, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    proc = run(run_args(data_root, straight, "train.checkpoint_every_steps=1"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One restart is needed; a second one absorbs a rendezvous that times out on a loaded 2-core machine.
    proc = run(run_args(data_root, crashed, "train.checkpoint_every_steps=1"), fault="crash@5:1", nproc=2,
               restarts=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash at global step 5" in proc.stderr
    assert "resumed from" in proc.stderr
    assert_same_weights(final_weights(crashed), final_weights(straight))


def test_nan_loss_stops_with_one_line_error_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    out = tmp_path / "nan"
    proc = run(run_args(data_root, out, "data.workers=0"), fault="nan@3")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite loss at epoch 0 step 2 (lr=")
    ckpt = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nonfinite_steps_can_be_skipped_when_allowed(data_root, tmp_path):
    out = tmp_path / "skip_nan"
    proc = run(run_args(data_root, out, "data.workers=0", "train.max_nonfinite_skips=1"), fault="nan@3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(out / "last.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_corrupt_image_is_skipped_and_counted_with_skip(tmp_path):
    root = make_demo_data(tmp_path / "d", num_classes=4, train_per_class=8, val_per_class=2, size=32)
    sorted((root / "train" / "c02_triangle").iterdir())[1].write_bytes(b"\xff\xd8\xff not a jpeg")
    proc = run(run_args(root, tmp_path / "r", "data.on_bad_image=skip", "optim.warmup_epochs=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 unreadable training images" in proc.stderr


def test_failed_checkpoint_write_keeps_the_previous_file_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    checkpoint_lib.atomic_save({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_lib.torch, "save", disk_full)
    with pytest.raises(RefconvError, match="No space left on device.*previous checkpoint is intact"):
        checkpoint_lib.atomic_save({"v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RefconvError, match="cannot write checkpoint"):
        checkpoint_lib.atomic_save({"v": torch.ones(1)}, blocker / "sub" / "last.pth")


def test_malformed_fault_injection_spec_is_a_clear_error(monkeypatch):
    from refconv_train.faults import Fault

    monkeypatch.setenv("REFCONV_FAULT", "boom")
    with pytest.raises(RefconvError, match="REFCONV_FAULT='boom' is malformed"):
        Fault.from_env(0)
