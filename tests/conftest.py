"""Shared fixtures: one tiny demo data set and one short baseline + refocus training run per test session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import train_args

TINY_MODEL = "mobilenetv2_050"
TINY_CLASSES = 7  # 7 x 3 = 21 val images: odd, and not a multiple of 2 processes x eval batch 4
TINY_SIZE = 32


@dataclass(frozen=True)
class TinyRuns:
    data: Path  # demo data root (train/, val/)
    classes: int
    val_images: int
    refocus: Path  # output folder of a RefConv run: last.pth, best.pth, fused.pth
    baseline: Path  # output folder of a baseline run: last.pth, best.pth


def tiny_train_args(data: Path, output: Path, *extra: str) -> list[str]:
    """:func:`train_args` of the session's tiny runs: 3 epochs, no warmup, a small lr."""
    return train_args(data, output, TINY_CLASSES, "optim.epochs=3", "optim.warmup_epochs=0", "optim.lr=0.01",
                      "train.resume=false", *extra)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine OpenMP's spinning threads make tiny runs 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """:func:`one_thread` for a whole test module of small ops on tiny inputs (``pytestmark = usefixtures(...)``)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    from refconv_train.cli import train
    from refconv_train.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("tiny")
    data = make_demo_data(root / "data", num_classes=TINY_CLASSES, train_per_class=6, val_per_class=3,
                          size=TINY_SIZE)
    runs = TinyRuns(data, TINY_CLASSES, TINY_CLASSES * 3, root / "refocus", root / "baseline")
    # Enough steps for the norm statistics to settle: an eval-mode net with fresh ones amplifies fp32 rounding ~1e3x,
    # and then no export can match PyTorch to 1e-4. The refocus run starts from the baseline, as in the demo.
    with one_thread():
        assert train.main(tiny_train_args(data, runs.baseline, "method=none")) == 0
        assert train.main(tiny_train_args(data, runs.refocus, f"model.pretrained={runs.baseline / 'best.pth'}",
                                          "optim.epochs=1")) == 0  # W_r is big: its checkpoints are ~80 MB
    return runs
