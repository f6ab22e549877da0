"""The study (scripts/study.py, study_report.py, convert_efficientnet_lite0.py): its quick mode end to end, the
statistics of its table, the validity of every variant, and the weights conversion."""

from __future__ import annotations

import csv
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cli_helpers import assert_one_line_error, call
from test_fashion_mnist import load_script, write_idx

from refconv_train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
study = load_script("study")
report = load_script("study_report")
convert = load_script("convert_efficientnet_lite0")


@pytest.fixture(scope="module")
def idx_src(tmp_path_factory) -> Path:
    """Random 28x28 'Fashion-MNIST': 40 train and 20 test images per class, enough for --quick's subset."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("idx")
    for split, per_class in (("train", 40), ("t10k", 20)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        write_idx(src / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8))
        write_idx(src / f"{split}-labels-idx1-ubyte", labels)
    return src


def test_quick_study_selects_on_holdout_then_reports_on_test_and_restarts(idx_src, tmp_path, capsys, monkeypatch):
    # Two of the selection's candidates keep CI short; the others are checked as configs below.
    candidates = {v.name: v for v in study.SCRATCH.select}
    monkeypatch.setattr(study.SCRATCH, "select", [candidates["finetune_lr0.006"], candidates["refconv_lr0.06"]])
    out, data = tmp_path / "study", tmp_path / "data"
    argv = ["--quick", "--arm", "scratch", "--seeds", "0", "--out", str(out), "--data", str(data),
            "--src", str(idx_src)]
    assert study.main(argv) == 0
    root = out / "scratch"
    assert (root / "baseline" / "DONE").is_file()
    chosen = (root / "select" / "results.md").read_text()
    assert "Chosen by final holdout top-1" in chosen and (root / "select" / "curves.png").is_file()
    for v in study.SCRATCH.select:  # every selection run validated on the holdout split, never on test
        command = (root / "select" / "seed0" / v.name / "command.txt").read_text()
        assert "data.val_split=holdout" in command and "data.val_split=val" not in command
    report_runs = sorted(p.name for p in (root / "report" / "seed0").iterdir())
    assert len(report_runs) == 5 and {"retrain", "refconv_paper", "refconv_norm"} <= set(report_runs)
    norm = shlex.split((root / "report" / "seed0" / "refconv_norm" / "command.txt").read_text())
    finetune = next(n for n in report_runs if n.startswith("finetune_"))
    assert "refocus.step_norm=layer" in norm and "refocus.init=zeros" in norm
    assert f"optim.lr={finetune.split('_lr')[1]}" in norm  # at the chosen fine-tuning lr
    table = (root / "report" / "results.md").read_text()
    assert "top-1 % on the test split" in table and f"Δ vs {finetune} [95% CI]" in table and "Δ vs retrain" in table
    for name in report_runs:
        assert f"| {name} |" in table
    assert (root / "report" / "curves.png").is_file()
    capsys.readouterr()

    assert study.main(argv) == 0  # restart: every run is skipped
    assert capsys.readouterr().out.count("finished earlier, skipped") == 1 + len(study.SCRATCH.select) + 5
    (root / "report" / "seed0" / "retrain" / "command.txt").write_text("refconv-train other settings\n")
    rc, _, err = call(study.main, argv)
    assert "holds a run with other settings" in assert_one_line_error(rc, err)


def test_every_variant_is_a_valid_config_with_the_arms_epoch_budget():
    for arm in study.ARMS.values():
        finetunes = [v for v in arm.select if v.name.startswith("finetune")]
        variants = arm.select + list(study.FIXED.values()) + [study.norm_variant(arm, finetunes[0])]
        for v in variants:
            overrides = [o.replace("{E}", str(arm.epochs)) for o in v.overrides]
            cfg = load_config(str(ROOT / arm.config), overrides)
            assert cfg.optim.warmup_epochs + cfg.optim.epochs == arm.epochs, (arm.name, v.name)
            assert cfg.refocus.enabled == v.refocus, (arm.name, v.name)
    base = load_config(str(ROOT / study.SCRATCH.baseline))
    stage2 = load_config(str(ROOT / study.SCRATCH.config))
    assert not base.refocus.enabled and base.model.pretrained is False and base.data.val_split == "holdout"
    for key in ("name", "num_classes"):
        assert getattr(base.model, key) == getattr(stage2.model, key)
    assert vars(base.data) | {"val_split": "val"} == vars(stage2.data)  # the same images and augmentation
    assert (base.optim.lr, base.optim.warmup_epochs) == (stage2.optim.lr, stage2.optim.warmup_epochs)


def write_run(folder: Path, curve: list[float], epochs: int = 2) -> None:
    folder.mkdir(parents=True)
    config = f"model:\n  pretrained: false\noptim:\n  epochs: {epochs}\n  warmup_epochs: 0\n"
    (folder / "config.yaml").write_text(config)
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "top1", "epoch_s"])
        for i, t in enumerate(curve):
            w.writerow([i + 1, t, 10.0])


def test_table_pairs_by_seed_with_a_t_interval_and_leaves_out_unfinished_runs(tmp_path):
    finals = {"ctl": [80.0, 81.0, 82.0], "new": [81.0, 81.5, 83.5]}  # paired differences 1.0, 0.5, 1.5
    for name, values in finals.items():
        for seed, value in enumerate(values):
            write_run(tmp_path / f"seed{seed}" / name, [value - 5, value])
    write_run(tmp_path / "seed3" / "new", [70.0])  # 1 of 2 epochs: unfinished
    runs = report.collect(tmp_path, ["ctl", "new"], [0, 1, 2, 3])
    mean, low, high, n = report.paired([r for r in runs if r.variant == "new"], [r for r in runs if r.variant == "ctl"])
    half = 4.303 * 0.5 / math.sqrt(3)  # t(0.975, 2) * sample std of (1.0, 0.5, 1.5) / sqrt(3)
    assert n == 3 and mean == pytest.approx(1.0) and (low, high) == (pytest.approx(1 - half), pytest.approx(1 + half))
    text = report.write(tmp_path, {"ctl": "control", "new": "candidate"}, [0, 1, 2, 3], controls=["ctl"])
    row = next(line for line in text.splitlines() if line.startswith("| new |"))
    assert "| 3 | 82.00 ± 1.32 |" in row and f"+1.00 [{1 - half:+.2f}, {1 + half:+.2f}]" in row


def test_lite0_weights_in_efficientnet_pytorch_names_become_a_strict_timm_state_dict(tmp_path):
    timm_state = timm.create_model("tf_efficientnet_lite0").state_dict()
    source = {f"_m{i}.{key.rsplit('.', 1)[1]}": v for i, (key, v) in enumerate(timm_state.items())}  # by position
    torch.save(source, tmp_path / "lite0.pth")
    rc, out, err = call(convert.main, [tmp_path / "lite0.pth", "-o", tmp_path / "timm.pth"])
    assert rc == 0, err
    converted = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert list(converted) == list(timm_state) and all(torch.equal(converted[k], timm_state[k]) for k in timm_state)

    swapped = dict(list(source.items())[:1] + list(source.items())[2:3] + list(source.items())[1:2]
                   + list(source.items())[3:])  # a weight where a bias belongs
    torch.save(swapped, tmp_path / "bad.pth")
    rc, _, err = call(convert.main, [tmp_path / "bad.pth", "-o", tmp_path / "x.pth"])
    assert "does not pair with" in assert_one_line_error(rc, err) and not (tmp_path / "x.pth").exists()
