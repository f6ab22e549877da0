"""refconv-study (refconv_train/study/): its quick mode end to end through the CLI on tiny generated data, restarts,
validation errors, the statistics against reference values, the study files of the retired scripts/study.py; and
the Lite0 weights conversion (scripts/convert_efficientnet_lite0.py) that the imagenet study needs."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from cli_helpers import assert_one_line_error, call
from PIL import Image
from test_fashion_mnist import load_script

from refconv_train.cli import study as study_cli
from refconv_train.config import config_to_dict, load_config
from refconv_train.study import load_study, paired_difference, t_quantile
from refconv_train.study.metrics import RunMetrics
from refconv_train.study.plan import aliases, baseline_run, check_configs, report_runs, select_runs, settings
from refconv_train.study.report import write_results
from refconv_train.study.stats import mean_std

ROOT = Path(__file__).resolve().parents[1]
convert = load_script("convert_efficientnet_lite0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """3 classes of random 16 px images: train/ (8 per class), holdout/ and val/ (4 each); start weights; a stage-2
    config of mobilenetv2_050 that starts from them."""
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("holdout", 4), ("val", 4)):
        for c in range(3):
            folder = root / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    from refconv_train import build_model

    torch.manual_seed(0)
    torch.save(build_model("mobilenetv2_050", num_classes=3, pretrained=False).state_dict(), root / "start.pth")
    stage2 = {"model": {"name": "mobilenetv2_050", "num_classes": 3, "pretrained": str(root / "start.pth")},
              "data": {"root": str(root / "data"), "img_size": 32, "batch_size": 8, "workers": 0},
              "optim": {"lr": 0.05, "warmup_epochs": 0, "epochs": 1}, "train": {"device": "cpu"}}
    (root / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    stage1 = {**stage2, "model": {**stage2["model"], "pretrained": False}, "method": "none"}
    (root / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    return root


def write_study(root: Path, name: str = "tiny.study.yaml", **changes) -> Path:
    """A study file: 2 selection candidates (fine-tuning lr 0.01, 0.1), 2 variants, 2 seeds, 1 control."""
    study = {
        "config": str(root / "stage2.yaml"), "output": str(root / "out"), "seeds": [0, 1], "budget": 2,
        "select": {"finetune": {"what": "fine-tuning", "lr": [0.01, 0.1],
                                "overrides": ["method=none", "optim.epochs={budget}"]}},
        "variants": [
            {"name": "finetune", "what": "fine-tuning at the chosen lr", "family": "finetune",
             "overrides": ["method=none", "optim.epochs={budget}"]},
            {"name": "refconv", "what": "RefConv zeros + step norm", "family": "finetune",
             "overrides": ["refconv.init=zeros", "refconv.step_norm=layer", "optim.epochs={budget}"]}],
        "controls": ["finetune"]}
    study.update(changes)
    path = root / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_quick_study_selects_on_holdout_reports_paired_differences_and_restarts(tiny):
    study = write_study(tiny, goal=0.3)
    rc, out, err = call(study_cli.main, [study, "--quick"])
    assert rc == 0, err[-3000:]
    root = tiny / "out_quick"
    for name in ("finetune_lr0.01", "finetune_lr0.1"):  # selection: seed 0, validated on holdout, never on val
        run = root / "select" / "seed0" / name
        assert (run / "DONE").is_file() and (run / "train.log").is_file()
        assert load_config(run / "config.yaml").data.val_split == "holdout"
        assert "refconv-train --config" in (run / "command.txt").read_text()
    select = json.loads((root / "select" / "results.json").read_text())
    chosen = select["selection"]["finetune"]
    assert chosen["lr"] in (0.01, 0.1) and chosen["top1"] == max(chosen["grid"].values())
    for seed in (0, 1):
        for v in ("finetune", "refconv"):
            cfg = load_config(root / "report" / f"seed{seed}" / v / "config.yaml")
            assert (cfg.data.val_split, cfg.train.seed, cfg.optim.lr) == ("val", seed, chosen["lr"])
            assert (cfg.method == "refconv") == (v == "refconv") and cfg.train.max_steps_per_epoch > 0  # quick mode

    results = json.loads((root / "report" / "results.json").read_text())
    assert results["controls"] == ["finetune"] and results["seeds"] == [0, 1]
    ft, rcv = results["variants"]["finetune"], results["variants"]["refconv"]
    for v in (ft, rcv):
        assert v["n"] == 2 and [r["seed"] for r in v["runs"]] == [0, 1]
        for r in v["runs"]:
            assert r["final"] == r["curve"][-1] and r["peak_mb"] > 100 and r["epoch_s"] > 0
            assert r["kernel_change"] > 0  # moved away from start.pth
        assert v["final_mean"] == pytest.approx(sum(r["final"] for r in v["runs"]) / 2)
    assert rcv["train_params"] > 5 * ft["train_params"] > 0  # W_r is much larger than the model
    diffs = [a["final"] - b["final"] for a, b in zip(rcv["runs"], ft["runs"])]
    expected = paired_difference(dict(enumerate(d + 50 for d in diffs)), dict.fromkeys(range(2), 50.0))
    assert rcv["paired"]["finetune"]["mean"] == pytest.approx(expected.mean)
    assert ft["paired"]["finetune"] is None
    table = (root / "report" / "results.md").read_text()
    assert "| variant | what | seeds | final top-1 | rank | best epoch | Δ vs finetune [95% CI] | goal: Δ ≥ +0.30, " \
           "interval > 0 | s / epoch | peak MB | train params | kernel change |" in table
    assert rcv["goal"]["met"] == (rcv["paired_stronger"]["mean"] >= 0.3 and rcv["paired_stronger"]["low"] > 0)
    assert sorted([rcv["rank"], ft["rank"]]) == [1, 2] and ft["goal"] is None
    assert "QUICK MODE" in table and f"finetune: lr {chosen['lr']}" in table
    assert table.count("\n| refconv |") == 1 and table.count("\n| finetune |") == 1
    assert (root / "report" / "curves.png").is_file() and (root / "select" / "curves.png").is_file()

    (root / "report" / "seed1" / "refconv" / "DONE").unlink()  # as if interrupted
    rc, out, err = call(study_cli.main, [study, "--quick", "--results-only"])  # what is finished, nothing trained
    assert rc == 0 and "== report" not in out and not (root / "report" / "seed1" / "refconv" / "DONE").exists()
    partial = json.loads((root / "report" / "results.json").read_text())["variants"]
    assert (partial["refconv"]["n"], partial["finetune"]["n"]) == (1, 2)
    assert "PARTIAL (--results-only): 3 of 4 runs finished" in (root / "report" / "results.md").read_text()
    rc, out, err = call(study_cli.main, [study, "--quick"])  # run again: resumed
    assert rc == 0, err[-3000:]
    assert out.count("finished earlier, skipped") == 5 and "seed1/refconv (resuming)" in out
    assert "resumed from" in (root / "report" / "seed1" / "refconv" / "train.log").read_text()

    changed = write_study(tiny, overrides=["optim.weight_decay=0.001"])  # other settings, same output folder
    line = assert_one_line_error(*call(study_cli.main, [changed, "--quick"])[::2])
    assert "select/seed0/finetune_lr0.01 holds a run with other settings" in line
    assert "optim.weight_decay: 4e-05 there, 0.001 now" in line and "delete the folder" in line


def test_dry_run_prints_the_baseline_selection_report_and_eval_commands_and_runs_nothing(tiny):
    study = write_study(tiny, "base.study.yaml", baseline={"config": str(tiny / "stage1.yaml")},
                        output=str(tiny / "dry"))
    rc, out, err = call(study_cli.main, [study, "--dry-run", "--seeds", "3", "optim.momentum=0.8"])
    assert rc == 0, err
    lines = [shlex.split(line) for line in out.strip().splitlines()]
    assert all("optim.momentum=0.8" in cmd for cmd in lines[:5])  # command-line overrides: every run
    assert len(lines) == 1 + 2 + 2 + 1  # baseline, 2 candidates, 2 variants x 1 seed, refconv-eval
    base = tiny / "dry" / "baseline"
    assert lines[0][2] == str(tiny / "stage1.yaml") and "data.val_split=holdout" in lines[0] \
        and "train.seed=0" in lines[0] and f"train.output={base}" in lines[0]
    for cmd in lines[1:5]:
        assert f"model.pretrained={base / 'last.pth'}" in cmd
    assert "optim.lr=<lr chosen for finetune>" in lines[3] and "train.seed=3" in lines[4]
    assert "--checkpoint" in lines[5] and str(base / "last.pth") in lines[5] and "val" in lines[5]
    assert not (tiny / "dry").exists()


@pytest.mark.parametrize("change, message", [
    ({"seed": [0]}, r"unknown key 'seed' \(valid: name, config"),
    ({"controls": ["retrain"]}, r"controls: 'retrain' is not a variant"),
    ({"variants": [{"name": "a", "family": "lr"}]}, r"variant 'a': family 'lr' is not a selection family"),
    ({"variants": [{"name": "a"}, {"name": "a"}], "controls": []}, r"variant 'a': duplicate variant name"),
    ({"variants": [{"name": "a", "overrides": ["optim.lrr=0.1"]}], "controls": []},
     r"variant 'a': unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    ({"variants": [{"name": "a", "family": "finetune", "overrides": ["optim.lr=0.1"]}], "controls": []},
     r"variant 'a': sets optim.lr and names family 'finetune'"),
    ({"budget": None}, r"uses \{budget\} but the study file sets no 'budget'"),
    ({"splits": {"select": "val"}}, r"splits: select and report are both 'val'"),
    ({"overrides": ["optim.epochs={E}"]}, r"unknown placeholder \{E\}"),
    ({"goal": "big"}, r"goal: expected the top-1 points to gain over the stronger control \(>= 0\), got 'big'"),
    ({"goal": float("nan")}, r"goal: expected the top-1 points to gain over the stronger control \(>= 0\), got nan"),
    ({"goal": -0.1}, r"goal: expected the top-1 points to gain over the stronger control \(>= 0\), got -0.1"),
    ({"goal": 0.3, "controls": []}, r"goal: is measured against the stronger control, but the study file names no"),
    ({"config": "nowhere.yaml"}, r"config: config file 'nowhere.yaml' not found"),
    ({"select": {"finetune": {"lr": [0.1], "overrides": ["refconv.map_k=maybe"]}}},
     r"selection candidate 'finetune_lr0.1': config key 'refconv.map_k' expects"),
])
def test_study_file_errors_are_one_line_before_anything_runs(tiny, tmp_path, change, message):
    study = write_study(tiny, "bad.study.yaml", output=str(tmp_path / "never"), **change)
    line = assert_one_line_error(*call(study_cli.main, [study])[::2], message)
    assert line.startswith(f"error: study file '{study}'") and not (tmp_path / "never").exists()


def test_t_quantiles_and_paired_intervals_match_reference_values():
    for df, q in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=5e-4)
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4) and t_quantile(0.025, 4) == pytest.approx(-2.776,
                                                                                                         abs=5e-4)
    p = paired_difference({0: 81.0, 1: 81.5, 2: 83.5, 7: 90.0}, {0: 80.0, 1: 81.0, 2: 82.0})  # seed 7 unpaired
    half = 4.303 * 0.5 / math.sqrt(3)  # differences 1.0, 0.5, 1.5: sample std 0.5
    assert (p.n, p.mean, p.low, p.high) == (3, pytest.approx(1.0), pytest.approx(1 - half, abs=1e-3),
                                             pytest.approx(1 + half, abs=1e-3))
    one = paired_difference({0: 2.0}, {0: 1.5})
    assert one.mean == 0.5 and math.isnan(one.low) and paired_difference({0: 1.0}, {1: 1.0}) is None
    assert mean_std([80.0, 81.0, 82.0]) == (81.0, 1.0) and mean_std([3.0]) == (3.0, None)


def test_table_pairs_every_variant_with_each_control_and_the_stronger_one(tmp_path):
    finals = {"ft": [80.0, 81.0, 82.0], "re": [79.0, 79.5, 80.0], "new": [81.0, 81.5, 83.5]}
    runs = {v: [RunMetrics(v, s, f"{v}{s}", [x - 5, x], x, x, 10.0, 900.0, 1000 if v != "new" else 250000, 0.01)
                for s, x in enumerate(xs)] for v, xs in finals.items()}
    whats = {"ft": "fine-tuning", "re": "re-training", "new": "candidate"}
    text = write_results(tmp_path, "t", ["a setting"], whats, runs, ["ft", "re"], {}, "val",
                         notes={"new": "= x: the same runs"}, goal=0.3)
    head = next(line for line in text.splitlines() if line.startswith("| variant"))
    assert ("| final top-1 | rank | best epoch | Δ vs ft [95% CI] | Δ vs re [95% CI] | Δ vs stronger control (ft) "
            "[95% CI] | goal: Δ ≥ +0.30, interval > 0 | s / epoch |") in head
    half = 4.303 * 0.5 / math.sqrt(3)  # new - ft: 1.0, 0.5, 1.5: mean 1.0 >= 0.3, but the interval crosses zero
    row = next(line for line in text.splitlines() if line.startswith("| new |"))
    assert row.startswith("| new | candidate (= x: the same runs) | 3 | 82.00 ± 1.32 | 1 / 3 | 82.00 ± 1.32 | "
                          f"+1.00 [{1 - half:+.2f}, {1 + half:+.2f}] |")
    assert row.endswith("| interval not above 0 | 10.0 | 900 | 0.25M | 0.01 |")
    assert row.count(f"+1.00 [{1 - half:+.2f}") == 2
    assert next(line for line in text.splitlines() if line.startswith("| re |")).split(" | ")[4] == "3 / 3"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["stronger_control"] == "ft" and data["variants"]["new"]["paired"]["re"]["mean"] == pytest.approx(2.5)
    assert data["variants"]["ft"]["paired"]["ft"] is None and len(data["variants"]["re"]["runs"]) == 3
    assert data["goal"] == 0.3 and data["variants"]["ft"]["goal"] is None
    assert data["variants"]["new"]["goal"] == {"goal": 0.3, "met": False, "short": 0.0, "interval_above_zero": False}

    def goal_cell(goal: float) -> str:
        text = write_results(tmp_path, "t", [], whats, runs, ["ft", "re"], {}, "val", goal=goal)
        return next(line for line in text.splitlines() if line.startswith("| new |")).split(" | ")[9]

    assert goal_cell(1.5) == "short 0.50; interval not above 0"
    runs["new"] = [RunMetrics("new", s, f"new{s}", [x], x, x, 10.0, 900.0, 1000, 0.01)
                   for s, x in enumerate([81.0, 82.1, 82.9])]  # new - ft: 1.0, 1.1, 0.9: interval [0.75, 1.25]
    assert goal_cell(0.3) == "met" and goal_cell(1.2) == "short 0.20"
    assert "goal" not in write_results(tmp_path, "t", [], whats, runs, ["ft", "re"], {}, "val").splitlines()[2]


# What scripts/study.py (and scripts/study_budget_probe.sh) ran before the study files replaced them: every run's
# resolved config, as the keys that differ from its config file (train.output, where it writes, left out; train.seed
# and data.val_split checked separately), recorded from the script's own commands with the winners of
# docs/reproduction.md (scratch: lr 0.06 for both; imagenet: 0.03 for both). Renamed: the one-lr candidates
# refconv_nonorm/_dwonly/_wd/_kaiming are now families named <name>_lr<lr>; report/finetune_lr<X> is report/finetune.
FT, RC = {"method": "none", "optim.warmup_epochs": 0}, {"refconv.init": "zeros", "optim.warmup_epochs": 0}
NORM = {**RC, "refconv.step_norm": "layer"}
OLD_RUNS = {
    "scratch": {
        "baseline": {},
        "select/finetune_lr0.006": {**FT, "optim.lr": 0.006, "optim.epochs": 2},
        "select/finetune_lr0.02": {**FT, "optim.lr": 0.02, "optim.epochs": 2},
        "select/finetune_lr0.06": {**FT, "optim.lr": 0.06, "optim.epochs": 2},
        "select/refconv_nonorm_lr0.02": {**RC, "optim.lr": 0.02, "optim.epochs": 2},
        "select/refconv_lr0.02": {**NORM, "optim.lr": 0.02, "optim.epochs": 2},
        "select/refconv_lr0.06": {**NORM, "optim.lr": 0.06, "optim.epochs": 2},
        "select/refconv_lr0.2": {**NORM, "optim.epochs": 2},  # lr 0.2 is the config's
        "select/refconv_dwonly_lr0.06": {**NORM, "refconv.exclude": ["conv_stem"], "optim.lr": 0.06,
                                         "optim.epochs": 2},
        "select/refconv_wd_lr0.06": {**NORM, "refconv.weight_decay": 0.001, "optim.lr": 0.06, "optim.epochs": 2},
        "select/refconv_kaiming_lr0.06": {**NORM, "refconv.init": "kaiming", "optim.lr": 0.06, "optim.epochs": 2},
        "report/finetune": {**FT, "optim.lr": 0.06, "optim.epochs": 2},
        "report/retrain": {"method": "none"},
        "report/refconv_paper": {},
        "report/refconv_norm": {**NORM, "optim.lr": 0.06, "optim.epochs": 2},
    },
    "imagenet": {
        "select/finetune_lr0.01": {**FT, "optim.lr": 0.01, "optim.epochs": 3},
        "select/finetune_lr0.03": {**FT, "optim.lr": 0.03, "optim.epochs": 3},
        "select/finetune_lr0.1": {**FT, "optim.epochs": 3},  # lr 0.1 is the config's
        "select/refconv_nonorm_lr0.03": {**RC, "optim.lr": 0.03, "optim.epochs": 3},
        "select/refconv_lr0.03": {**NORM, "optim.lr": 0.03, "optim.epochs": 3},
        "select/refconv_lr0.1": {**NORM, "optim.epochs": 3},
        "select/refconv_wd_lr0.03": {**NORM, "refconv.weight_decay": 0.001, "optim.lr": 0.03, "optim.epochs": 3},
        "report/finetune": {**FT, "optim.lr": 0.03, "optim.epochs": 3},
        "report/retrain": {"method": "none"},
        "report/refconv_paper": {},
        "report/refconv_norm": {**NORM, "optim.lr": 0.03, "optim.epochs": 3},
    },
    "imagenet_10ep": {
        "report/finetune_lr0.03": {**FT, "optim.lr": 0.03, "optim.epochs": 10},
        "report/retrain": {"method": "none", "optim.epochs": 9},  # 1 warmup epoch, as the config
        "report/refconv_norm": {**NORM, "optim.lr": 0.03, "optim.epochs": 10},
    },
}
OLD_OUTPUT = {"scratch": "runs/study/scratch", "imagenet": "runs/study/imagenet",
              "imagenet_10ep": "runs/study/imagenet_e10"}


@pytest.mark.parametrize("arm", list(OLD_RUNS))
def test_study_files_resolve_every_run_to_the_config_the_retired_study_script_ran(arm, monkeypatch):
    monkeypatch.chdir(ROOT)  # the study files name repository paths, as refconv-train does
    study = load_study(f"configs/study/{arm}.study.yaml")
    assert str(study.output) == OLD_OUTPUT[arm] and study.seeds == (0, 1, 2)
    chosen = {"finetune": 0.06, "refconv": 0.06} if arm == "scratch" else {"finetune": 0.03, "refconv": 0.03}
    report = report_runs(study, chosen)
    same = aliases(study, report)
    assert same == ({} if arm == "imagenet_10ep" else {"refconv_best": "refconv_norm"})  # run once, as before
    runs = ([baseline_run(study)] if study.baseline else []) + select_runs(study) + \
        [r for r in report if r.variant not in same]
    got = {}
    for r in runs:
        resolved = r.resolved()
        own = settings(config_to_dict(load_config(r.config)))
        diff = {k: v for k, v in resolved.items() if v != own[k]}
        seed, split = diff.pop("train.seed", own["train.seed"]), diff.pop("data.val_split", own["data.val_split"])
        assert (seed, split) == ((0, "holdout") if r.phase != "report" else (r.seed, "val")), r.folder
        assert r.config == ("configs/study/scratch_baseline.yaml" if r.phase == "baseline"
                            else f"configs/study/{arm.removesuffix('_10ep')}.yaml")
        name = "baseline" if r.phase == "baseline" else f"{r.phase}/{r.variant}"
        assert got.setdefault(name, diff) == diff, name  # the same settings for every seed
    assert got == OLD_RUNS[arm]
    assert len(runs) == len(OLD_RUNS[arm]) + (len(study.seeds) - 1) * sum(k.startswith("report/") for k in got)


def test_every_study_file_in_configs_resolves_every_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(Path("configs/study").glob("*.study.yaml"))
    assert {"scratch.study.yaml", "imagenet.study.yaml", "imagenet_10ep.study.yaml"} <= {f.name for f in files}
    for f in files:
        check_configs(load_study(f))


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


def write_scratch_study(root: Path, name: str = "scratch.study.yaml", **changes) -> Path:
    """An ``evaluate: deployed`` study: a plain one-stage arm, ACB from scratch, a second stage (RefConv) from each
    seed's own plain run, paired with the plain arm; fake benchmark ratios."""
    (root / "bench.json").write_text(json.dumps({"methods": {
        "baseline": {"train_ratio": 1.0, "memory_ratio": 1.0}, "acb": {"train_ratio": 2.0, "memory_ratio": 1.5},
        "refocus_per_step": {"train_ratio": 1.5, "memory_ratio": 1.25}}}))
    study = {
        "config": str(root / "stage1.yaml"), "output": str(root / "scratch_out"), "seeds": [0, 1], "budget": 1,
        "overrides": ["optim.epochs={budget}"], "evaluate": "deployed",
        "cost": {"unit": "plain", "ratios": "bench.json"},
        "variants": [
            {"name": "plain", "what": "from scratch"},
            {"name": "acb", "overrides": ["method=acb", "acb.branch_scale=1"], "reference": "plain"},
            {"name": "refconv", "start": "plain", "reference": "plain",
             "overrides": ["method=refconv", "refconv.init=zeros", "refconv.step_norm=layer"]}]}
    study.update(changes)
    path = root / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_deployed_study_starts_each_seed_from_its_own_run_reports_fused_top1_and_cost_and_resumes(tiny):
    study = write_scratch_study(tiny)
    rc, out, err = call(study_cli.main, [study, "--quick"])
    assert rc == 0, err[-3000:]
    root = tiny / "scratch_out_quick" / "report"
    order = [line.split()[3] for line in out.splitlines() if line.startswith("== report")]
    assert [Path(p).parent.name + "/" + Path(p).name for p in order] == \
        ["seed0/plain", "seed0/acb", "seed1/plain", "seed1/acb", "seed0/refconv", "seed1/refconv"]  # starts first
    results = json.loads((root / "results.json").read_text())
    for seed in (0, 1):
        cfg = load_config(root / f"seed{seed}" / "refconv" / "config.yaml")
        assert cfg.model.pretrained == str(root / f"seed{seed}" / "plain" / "last.pth")  # its own seed's stage 1
        assert load_config(root / f"seed{seed}" / "acb" / "config.yaml").model.pretrained is False
        for v, deployed in (("plain", "last.pth"), ("acb", "fused.pth"), ("refconv", "fused.pth")):
            run = root / f"seed{seed}" / v
            assert load_config(run / "config.yaml").data.val_split == "holdout"  # the test split only in the eval
            ev = json.loads((run / "deployed_val.json").read_text())
            assert ev["checkpoint"] == str(run / deployed) and ev["split"] == "val"
            assert results["variants"][v]["top1"][str(seed)] == ev["top1"]  # the reported number is the deployed one
    v = results["variants"]
    diffs = [v["refconv"]["top1"][s] - v["plain"]["top1"][s] for s in ("0", "1")]
    assert v["refconv"]["paired"]["diffs"] == pytest.approx(diffs) and v["plain"]["paired"] is None
    assert [s["variant"] for s in v["refconv"]["stages"]] == ["plain", "refconv"]
    assert (v["plain"]["cost_epochs_benchmark"], v["acb"]["cost_epochs_benchmark"],
            v["refconv"]["cost_epochs_benchmark"]) == (1.0, 2.0, 2.5)  # 1 x 1, 1 x 2, 1 x 1 + 1 x 1.5
    assert v["acb"]["memory_ratio_benchmark"] == 1.5 and results["cost_axis"] == "benchmark"
    assert v["refconv"]["train_s"] > v["plain"]["train_s"] > 0 and v["refconv"]["peak_mb"] > 100
    assert v["refconv"]["epochs_measured"] > 1.0 and v["plain"]["epochs_measured"] == pytest.approx(1.0)
    assert results["convergence"]["variant"] == "plain" and results["convergence"]["converged"] is False  # 1 epoch
    table = (root / "results.md").read_text()
    assert "| refconv | refconv | baseline 1 → refconv 1 | 2 |" in table and "NOT converged" in table
    assert (root / "cost.png").is_file() and (root / "curves.png").is_file()

    stamp = (root / "seed0" / "acb" / "deployed_val.json").stat().st_mtime_ns
    (root / "seed1" / "refconv" / "DONE").unlink()  # as if interrupted: run again, resumed and evaluated again
    (root / "seed1" / "refconv" / "deployed_val.json").unlink()
    rc, out, err = call(study_cli.main, [study, "--quick"])
    assert rc == 0, err[-3000:]
    assert out.count("finished earlier, skipped") == 5 and "seed1/refconv (resuming)" in out
    assert out.count("--json") == 1 and (root / "seed1" / "refconv" / "deployed_val.json").is_file()
    assert (root / "seed0" / "acb" / "deployed_val.json").stat().st_mtime_ns == stamp

    # --results-only: the report of what is finished, nothing trained (as while the study runs elsewhere)
    (root / "seed1" / "refconv" / "DONE").unlink()
    (root / "seed0" / "acb" / "deployed_val.json").unlink()  # finished but not evaluated yet: evaluated now
    rc, out, err = call(study_cli.main, [study, "--quick", "--results-only"])
    assert rc == 0, err[-3000:]
    assert "== report" not in out and not (root / "seed1" / "refconv" / "DONE").exists()
    assert "PARTIAL (--results-only): 5 of 6 runs finished" in (root / "results.md").read_text()
    partial = json.loads((root / "results.json").read_text())["variants"]
    assert partial["refconv"]["n"] == 1 and partial["acb"]["n"] == 2 and partial["refconv"]["paired"]["n"] == 1
    assert (root / "seed0" / "acb" / "deployed_val.json").is_file()
    (root / "seed1" / "refconv" / "DONE").write_text("")

    # Every deployed file, read by plain timm (strict) and evaluated by timm's own loader, gives the reported top-1.
    check = load_script("check_deployed")
    rc, out, err = call(check.main, [root, "--json", tiny / "check.json"])
    assert rc == 0, out + err
    rows = json.loads((tiny / "check.json").read_text())
    assert len(rows) == 6 and all(r["diff"] == 0 and r["images"] == 12 for r in rows)
    ev = root / "seed1" / "acb" / "deployed_val.json"
    ev.write_text(json.dumps({**json.loads(ev.read_text()), "top1": 0.5}))  # a report that is not the file's
    fused = root / "seed0" / "refconv" / "fused.pth"
    ckpt = torch.load(fused, weights_only=True)
    ckpt["state_dict"]["extra.weight"] = torch.zeros(1)  # not the original architecture any more
    torch.save(ckpt, fused)
    rc, out, _ = call(check.main, [root])
    assert rc == 1 and "4 of 6 deployed files" in out
    assert re.search(r"BAD does not load into timm: .*extra\.weight.*seed0/refconv/fused\.pth", out)
    assert re.search(r"BAD +\d+\.\d+ vs   0\.50 .*seed1/acb/fused\.pth", out)
    (root / "seed1" / "plain" / "config.yaml").unlink()  # a run folder the check cannot read: one line, exit 2
    line = assert_one_line_error(*call(check.main, [root])[::2], "seed1/plain: its deployed_val.json or config.yaml")
    assert line.startswith("error: ")


@pytest.mark.parametrize("flags", [["--dry-run"], ["--phase", "select"]])
def test_results_only_refuses_flags_that_contradict_it(tiny, flags):
    study = write_scratch_study(tiny, "flags.study.yaml", output=str(tiny / "never_flags"))
    with pytest.raises(SystemExit) as e:
        study_cli.main([str(study), "--results-only", *flags])
    assert e.value.code == 2 and not (tiny / "never_flags").exists()


def test_deployed_dry_run_prints_each_start_and_each_deployed_eval(tiny):
    study = write_scratch_study(tiny, "dry_scratch.study.yaml", output=str(tiny / "dry_scratch"))
    rc, out, err = call(study_cli.main, [study, "--dry-run", "--seeds", "4"])
    assert rc == 0, err
    lines = [shlex.split(line) for line in out.strip().splitlines()]
    assert len(lines) == 6  # 3 variants x (refconv-train, refconv-eval)
    run = tiny / "dry_scratch" / "report" / "seed4"
    assert f"model.pretrained={run / 'plain' / 'last.pth'}" in lines[4]
    assert lines[3][lines[3].index("--checkpoint") + 1] == str(run / "acb" / "fused.pth")
    assert lines[1][lines[1].index("--checkpoint") + 1] == str(run / "plain" / "last.pth")
    assert not (tiny / "dry_scratch").exists()


@pytest.mark.parametrize("change, message", [
    ({"variants": [{"name": "a", "start": "b"}]}, r"variant 'a': start 'b' is not another variant"),
    ({"variants": [{"name": "a", "reference": "a"}]}, r"variant 'a': reference 'a' is not another variant"),
    ({"variants": [{"name": "a"}, {"name": "b", "start": "a"}, {"name": "c", "start": "b"}]},
     r"variant 'c': start 'b' starts from 'a': a start must be a one-stage variant"),
    ({"variants": [{"name": "a"}, {"name": "b", "start": "a", "overrides": ["model.pretrained=x.pth"]}]},
     r"variant 'b': sets model.pretrained and has a start \('a'\)"),
    ({"evaluate": "best"}, r"evaluate: expected one of training, deployed, got 'best'"),
    ({"cost": {"unit": "nope"}}, r"cost.unit: 'nope' is not a variant"),
    ({"evaluate": "training", "cost": {"unit": "plain"}}, r"cost: the cost report needs 'evaluate: deployed'"),
    ({"cost": None}, r"evaluate: deployed: needs cost.unit"),
    ({"overrides": ["optim.epochs={budget*0}"]}, r"unknown placeholder \{budget\*0\}"),
    ({"controls": ["plain"]}, r"controls: an 'evaluate: deployed' study pairs each variant with its own 'reference'"),
    ({"evaluate": None, "cost": None}, r"variant 'acb': reference: needs 'evaluate: deployed'"),
])
def test_deployed_study_file_errors_are_one_line(tiny, tmp_path, change, message):
    study = write_scratch_study(tiny, "bad_scratch.study.yaml", output=str(tmp_path / "never"), **change)
    line = assert_one_line_error(*call(study_cli.main, [study])[::2], message)
    assert line.startswith(f"error: study file '{study}'") and not (tmp_path / "never").exists()


def test_budget_expressions_expand_and_the_scratch_studies_give_every_two_stage_arm_the_controls_epochs(monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in ("scratch_resnet18", "scratch_mobilenetv2_050"):
        study = load_study(f"configs/study/{name}.study.yaml")
        assert study.expand(["a={budget}", "b={budget*2+1}", "c={budget+1}"]) == \
            [f"a={study.budget}", f"b={2 * study.budget + 1}", f"c={study.budget + 1}"]
        runs = {r.variant: r.resolved() for r in report_runs(study, {}) if r.seed == 0}
        total = {v: c["optim.warmup_epochs"] + c["optim.epochs"] for v, c in runs.items()}
        by_name = {v.name: v for v in study.variants}
        assert total["baseline_2x"] == 2 * total["baseline"]
        for v in study.variants:
            assert runs[v.name]["model.pretrained"] is False or v.start == "baseline"
            if v.start:  # stage 1 + stage 2 = the equal-budget control, paired with it
                assert total["baseline"] + total[v.name] == total["baseline_2x"] and v.reference == "baseline_2x"
            elif v.name != "baseline":
                assert total[v.name] == total["baseline"] or v.name == "baseline_2x"
                assert by_name[v.name].reference == "baseline"
        for v in ("acb", "repvgg", "dbb", "orepa"):
            assert runs[v]["method"] == v and runs[v][f"{v}.branch_scale"] == 1.0
        assert runs["refconv_paper"]["refconv.init"] == "xavier"
        assert runs["refconv_norm"]["refconv.step_norm"] == "layer"


def test_cost_figure_script_draws_one_panel_per_deployed_report_and_refuses_other_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    figure = load_script("cost_figure")

    def report(name: str) -> dict:
        one = {"stages": [{"variant": "plain", "method": "baseline", "epochs": 10}], "mean": 85.0, "std": 0.2,
               "cost_epochs_benchmark": 10.0, "epochs_measured": 10.4}
        two = {**one, "stages": one["stages"] * 2, "mean": 86.0, "std": None, "cost_epochs_benchmark": 21.0}
        return {"name": name, "unit": "plain", "split": "val", "seeds": [0, 1, 2], "cost_axis": "benchmark",
                "variants": {"plain": one, "refconv": two, "unfinished": {**one, "mean": None}}}

    paths = []
    for name in ("scratch_resnet18", "scratch_mobilenetv2_050"):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report(name)))
    assert figure.main([*map(str, paths), "-o", str(tmp_path / "cost.png")]) == 0
    assert Image.open(tmp_path / "cost.png").size[0] > Image.open(tmp_path / "cost.png").size[1] * 2  # 2 panels
    (tmp_path / "other.json").write_text(json.dumps({"variants": {}}))
    assert figure.main([str(tmp_path / "other.json"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not the report of an 'evaluate: deployed' study" in capsys.readouterr().err
