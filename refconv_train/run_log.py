"""What a run reports: its method once at the start (reparam_report.json and the method's table), then after each
epoch one log line, a row of summary.csv, TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from torch import nn

log = logging.getLogger("refconv_train")


class RunLog:
    def __init__(self, out: Path, total_epochs: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: library users may never train

        self.out, self.total_epochs = out, total_epochs
        self.writer = SummaryWriter(log_dir=str(out / "tb"))

    def epoch(self, row: dict) -> None:
        log.info("epoch %d/%d  train_loss %.4f  val top1 %.2f  top5 %.2f  lr %.3g  %.1f img/s  %.1fs",
                 row["epoch"], self.total_epochs, row["train_loss"], row["top1"], row["top5"], row["lr"],
                 row["img_per_s"], row["epoch_s"])
        path = self.out / "summary.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        step = row["epoch"]
        for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"), ("train/img_per_s", "img_per_s"),
                         ("val/top1", "top1"), ("val/top5", "top5"), ("val/loss", "val_loss")):
            if not math.isnan(row[key]):
                self.writer.add_scalar(tag, row[key], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_method_report(out: Path, model: nn.Module, report, method: str) -> dict:
    """``reparam_report.json`` (the method, its parameters during training, how far the start moved) and the
    method's table in the report's ``table_file`` (``refocus_report.txt`` for RefConv, ``reparam_report.txt``)."""
    info = {"method": method, "train_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if report is not None:
        log.info(report.summary())
        (out / report.table_file).write_text(report.table() + "\n")
        info.update(added_params=report.added_params, changed=len(report.layers), skipped=len(report.skipped),
                    start_max_abs_diff=report.start_max_abs_diff)
    write_json(out / "reparam_report.json", info)
    return info


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
