"""Fashion-MNIST for the study: IDX -> ImageFolder conversion (synthetic IDX files), holdout split, errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, call
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


prep = load_script("prepare_fashion_mnist")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """IDX of unsigned bytes: magic 0x00 0x00 0x08 ndim, big-endian int32 sizes, the data; gzipped for *.gz."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def idx_src(tmp_path: Path) -> tuple[Path, dict]:
    """Synthetic Fashion-MNIST: 10 classes, 3 train and 2 test images each in shuffled order, 28x28 random pixels.
    The train files are gzipped, the test files plain (both forms occur)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    arrays = {}
    for split, per_class, suffix in (("train", 3, ".gz"), ("t10k", 2, "")):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(src / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(src / f"{split}-labels-idx1-ubyte{suffix}", labels)
        arrays[split] = (images, labels)
    return src, arrays


def test_idx_to_imagefolder(idx_src, tmp_path: Path):
    src, arrays = idx_src
    out = tmp_path / "fm"
    rc, stdout, err = call(prep.main, ["--src", src, "--out", out, "--train-per-class", 2, "--val-per-class", 1])
    assert rc == 0, err
    assert "wrote 20 train + 10 val images" in stdout
    for split, (images, labels), per_class in (("train", arrays["train"], 2), ("val", arrays["t10k"], 1)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == prep.CLASSES == ["0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal",
                                           "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot"]
        for label, name in enumerate(prep.CLASSES):
            files = sorted((out / split / name).glob("*.png"))
            first = np.flatnonzero(labels == label)[:per_class]  # the first N of the class, in file order
            assert [int(f.stem) for f in files] == list(first)
            for f, i in zip(files, first):
                with Image.open(f) as img:
                    assert img.mode == "L" and img.size == (28, 28)
                    assert np.array_equal(np.asarray(img), images[i])
    spec = json.loads((out / "spec.json").read_text())
    assert spec["train_counts"] == dict.fromkeys(prep.CLASSES, 2) and spec["val_per_class"] == 1

    rc, stdout, _ = call(prep.main, ["--src", src, "--out", out, "--train-per-class", 2, "--val-per-class", 1])
    assert rc == 0 and "already up to date" in stdout
    rc, stdout, _ = call(prep.main, ["--src", src, "--out", out])  # other arguments: rewritten, all images
    assert rc == 0 and "wrote 30 train + 20 val images" in stdout
    assert len(list((out / "train").rglob("*.png"))) == 30


def test_holdout_takes_the_last_images_of_each_class_out_of_train(idx_src, tmp_path: Path):
    src, arrays = idx_src
    out = tmp_path / "fm"
    rc, stdout, err = call(prep.main, ["--src", src, "--out", out, "--holdout-per-class", 1, "--train-per-class", 1])
    assert rc == 0, err
    assert "wrote 10 train + 20 val images (+ 10 holdout)" in stdout
    _, labels = arrays["train"]
    for label, name in enumerate(prep.CLASSES):
        of_class = list(np.flatnonzero(labels == label))  # 3 per class, in file order
        assert [int(f.stem) for f in (out / "holdout" / name).glob("*.png")] == of_class[-1:]
        assert [int(f.stem) for f in (out / "train" / name).glob("*.png")] == of_class[:1]  # first of the rest
    rc, _, err = call(prep.main, ["--src", src, "--out", tmp_path / "b", "--holdout-per-class", 3])
    line = assert_one_line_error(rc, err)
    assert "leaves no training images" in line and not (tmp_path / "b" / "train").exists()


def test_the_tree_trains_as_imagefolder(idx_src, tmp_path: Path):
    from refconv_train import data as data_lib

    src, _ = idx_src
    assert call(prep.main, ["--src", src, "--out", tmp_path / "fm"])[0] == 0
    ds = data_lib.build_dataset(tmp_path / "fm", "val", data_lib.build_transform(32, False, 1.0), num_classes=10)
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and ds.classes == prep.CLASSES and len(ds) == 20


def test_missing_damaged_and_foreign(idx_src, tmp_path: Path):
    src, _ = idx_src
    (src / "t10k-labels-idx1-ubyte").unlink()
    line = assert_one_line_error(*call(prep.main, ["--src", src, "--out", tmp_path / "a"])[::2])
    assert "t10k-labels-idx1-ubyte[.gz] not found" in line and "--src" in line
    assert not (tmp_path / "a").exists()

    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x14" + bytes(5))  # says 20, holds 5
    assert "truncated" in assert_one_line_error(*call(prep.main, ["--src", src, "--out", tmp_path / "a"])[::2])
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not idx")
    assert "not an IDX file" in assert_one_line_error(*call(prep.main, ["--src", src, "--out", tmp_path / "a"])[::2])

    write_idx(src / "t10k-labels-idx1-ubyte", np.repeat(np.arange(10), 2).astype(np.uint8))
    foreign = tmp_path / "foreign"
    (foreign / "train" / "x").mkdir(parents=True)
    rc, _, err = call(prep.main, ["--src", src, "--out", foreign])
    assert "not written by this script" in assert_one_line_error(rc, err)
    assert (foreign / "train" / "x").is_dir()
    assert "--val-per-class must be >= 1" in assert_one_line_error(
        *call(prep.main, ["--src", src, "--out", tmp_path / "b", "--val-per-class", 0])[::2])
