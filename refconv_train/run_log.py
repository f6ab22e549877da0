"""What a run reports after each epoch: one log line, a row of summary.csv, TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

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
