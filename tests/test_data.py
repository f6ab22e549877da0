"""Demo data, dataset checks, transforms, samplers and loaders (refconv_train.demo_data, refconv_train.data)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from refconv_train.data import (
    ShardedEvalSampler,
    TrainSampler,
    build_dataset,
    build_loader,
    build_transform,
    normalize_images,
)
from refconv_train.demo_data import class_names, make_demo_data
from refconv_train.errors import RefconvError

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_classes": 4, "train_per_class": 6, "val_per_class": 3, "size": 32}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default demo set (10 classes, 60 + 20 per class, 64 px), generated once for the module."""
    return make_demo_data(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A tiny, private copy that tests may corrupt."""
    return make_demo_data(tmp_path / "small", **SMALL)


def _corrupt(root: Path) -> Path:
    bad = sorted((root / "train" / class_names(4)[1]).glob("*.jpg"))[2]
    bad.write_bytes(b"this is not a jpeg" * 10)
    return bad


# --- demo data -------------------------------------------------------------------------------------------------


def test_demo_data_has_expected_classes_and_counts(demo: Path) -> None:
    for split, per_class in (("train", 60), ("val", 20)):
        ds = build_dataset(demo, split, None, num_classes=10)
        assert ds.classes == class_names(10) == sorted(ds.classes)
        assert len(ds) == 10 * per_class
        assert all(ds.targets.count(c) == per_class for c in range(10))
        image, _ = ds[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert (demo / "spec.json").is_file()


def test_demo_data_is_byte_identical_on_regeneration(tmp_path: Path) -> None:
    first = _digest(make_demo_data(tmp_path / "a", **SMALL))
    second = _digest(make_demo_data(tmp_path / "b", **SMALL))
    assert first == second and len(first) == 4 * 9 + 1
    assert _digest(make_demo_data(tmp_path / "a", **SMALL)) == first  # overwriting in place too
    assert _digest(make_demo_data(tmp_path / "c", **SMALL, seed=1)) != first


def test_demo_data_refuses_to_overwrite_foreign_data(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(RefconvError, match="not demo data") as exc:
        make_demo_data(tmp_path, **SMALL)
    _one_line(exc)
    assert (tmp_path / "train" / "cat").is_dir()


def test_demo_data_is_learnable_by_a_tiny_cnn(demo: Path) -> None:
    """A three-layer CNN trained for ~3 s on 32 px images clearly beats chance (10 %) on the val split."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is as fast and does not suffer when the CPUs are shared

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_dataset(demo, split, build_transform(32, train=False), num_classes=10)
        images, targets = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return normalize_images(torch.stack(images)), torch.tensor(targets)

    xt, yt = tensors("train")
    xv, yv = tensors("val")
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 10))
    try:
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _ in range(15):
            for idx in torch.randperm(len(xt)).split(32):
                loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            accuracy = (net(xv).argmax(1) == yv).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.4, accuracy


def test_make_demo_data_script_skips_when_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in-process: a subprocess would pay the package's import time again
    args = ["--out", str(tmp_path / "demo"), "--classes", "3", "--train-per-class", "2", "--val-per-class", "1",
            "--size", "32"]
    assert script.main(args) == 0 and "wrote 9 images" in capsys.readouterr().out
    assert script.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert script.main([*args, "--force"]) == 0 and "wrote" in capsys.readouterr().out
    assert script.main([*args, "--classes", "99"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# --- transforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("img_size", [32, 56])
def test_transforms_give_the_requested_size(demo: Path, train: bool, img_size: int) -> None:
    ds = build_dataset(demo, "val", build_transform(img_size, train=train))
    image, _ = ds[3]
    assert image.shape == (3, img_size, img_size) and image.dtype == torch.uint8  # normalized on the device


def test_eval_transform_resizes_shorter_side_by_crop_pct() -> None:
    resize = build_transform(224, train=False).transforms[0]
    assert resize.size == [256]
    with pytest.raises(RefconvError):
        build_transform(224, train=False, crop_pct=0)


# --- dataset checks --------------------------------------------------------------------------------------------


def test_missing_root_raises_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(RefconvError, match="does not exist") as exc:
        build_dataset(tmp_path / "nope", "train", None)
    assert "nope" in _one_line(exc)


def test_missing_split_raises_naming_the_path(small: Path) -> None:
    shutil.rmtree(small / "val")
    with pytest.raises(RefconvError, match="has no 'val' folder: expected the ImageNet layout") as exc:
        build_dataset(small, "val", None)
    assert str(small) in _one_line(exc)


def test_empty_class_folder_raises_naming_it(small: Path) -> None:
    (small / "train" / "zz_empty").mkdir()
    (small / "train" / "zz_empty" / "notes.txt").write_text("no images here")
    with pytest.raises(RefconvError, match="zz_empty") as exc:
        build_dataset(small, "train", None)
    assert "has no images" in _one_line(exc)


def test_num_classes_mismatch_names_both_numbers_and_the_fix(small: Path) -> None:
    with pytest.raises(RefconvError) as exc:
        build_dataset(small, "train", None, num_classes=1000)
    message = _one_line(exc)
    assert "4 class folders" in message and "num_classes=1000" in message and "model.num_classes=4" in message
    assert len(build_dataset(small, "train", None, num_classes=4)) == 24


def test_bad_on_bad_image_value_is_rejected(small: Path) -> None:
    with pytest.raises(RefconvError, match="on_bad_image"):
        build_dataset(small, "train", None, on_bad_image="ignore")


# --- unreadable images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_raises_naming_the_file(small: Path, workers: int) -> None:
    bad = _corrupt(small)
    ds = build_dataset(small, "train", build_transform(32, train=False))
    loader = build_loader(ds, batch_size=4, train=False, workers=workers, distributed=False, rank=0, world_size=1,
                          seed=0, pin_memory=False)
    with pytest.raises(RefconvError, match="cannot read image") as exc:
        list(loader)
    assert str(bad) in _one_line(exc)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_skipped_and_counted(small: Path, workers: int) -> None:
    bad = _corrupt(small)
    ds = build_dataset(small, "train", build_transform(32, train=False), on_bad_image="skip")
    index = [path for path, _ in ds.samples].index(str(bad))
    assert torch.equal(ds[index][0], ds[index + 1][0])  # replaced by the next sample, deterministically
    assert ds.bad_images == 1
    ds.reset_bad_images()
    loader = build_loader(ds, batch_size=4, train=False, workers=workers, distributed=False, rank=0, world_size=1,
                          seed=0, pin_memory=False)
    for epoch in (1, 2):  # persistent workers keep counting into the same shared counter
        batches = list(loader)
        assert sum(len(targets) for _, targets in batches) == len(ds)
        assert ds.bad_images == epoch
    ds.reset_bad_images()
    assert ds.bad_images == 0


# --- samplers and loaders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 7, 10])
def test_sharded_eval_sampler_covers_every_index_exactly_once(world_size: int, length: int) -> None:
    shards = [list(ShardedEvalSampler(length, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardedEvalSampler(length, r, world_size)) for r in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_sharded_eval_sampler_rejects_bad_rank() -> None:
    with pytest.raises(RefconvError):
        ShardedEvalSampler(10, 2, 2)


def test_distributed_eval_loader_counts_every_image_once(small: Path) -> None:
    ds = build_dataset(small, "val", build_transform(32, train=False))  # 12 images over 5 ranks
    seen = []
    for rank in range(5):
        loader = build_loader(ds, batch_size=2, train=False, workers=0, distributed=True, rank=rank, world_size=5,
                              seed=0, pin_memory=False)
        seen += list(loader.sampler)
    assert sorted(seen) == list(range(len(ds)))


def test_train_sampler_is_distributed_shuffled_and_drops_uneven_tail(small: Path) -> None:
    ds = build_dataset(small, "train", None)  # 24 images
    samplers = [TrainSampler(ds, world_size=5, rank=r, seed=3) for r in range(5)]
    shards = [list(s) for s in samplers]
    assert all(len(s) == 4 for s in shards) and len(set(sum(shards, []))) == 20
    again = TrainSampler(ds, world_size=5, rank=0, seed=3)
    assert list(again) == shards[0]
    assert list(again) != shards[0]  # no set_epoch: the next pass advances the epoch by itself
    again.set_epoch(0)
    assert list(again) == shards[0]


def test_loader_with_workers_is_reproducible_for_a_seed(small: Path) -> None:
    ds = build_dataset(small, "train", build_transform(24, train=True))

    def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = build_loader(ds, batch_size=5, train=True, workers=2, distributed=False, rank=0, world_size=1,
                              seed=seed, pin_memory=False)
        loader.sampler.set_epoch(0)
        assert len(loader) == 24 // 5  # drop_last defaults to train
        return list(loader)

    first, second, other = batches(7), batches(7), batches(8)
    assert len(first) == len(second) == 4
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(first, other, strict=True))


@pytest.mark.parametrize("torchvision_io", [True, False])
def test_images_decode_to_rgb_uint8_whatever_the_format(tmp_path: Path, monkeypatch, torchvision_io: bool) -> None:
    """torchvision.io for JPEG/PNG (grayscale, CMYK and alpha converted to RGB), PIL for the rest (BMP) and for
    everything once torchvision drops its (deprecated) decoders."""
    from PIL import Image

    from refconv_train import data as data_lib
    from refconv_train.data import read_image

    if not torchvision_io:
        monkeypatch.setattr(data_lib, "decode_image", None)

    rgb = Image.new("RGB", (20, 10), (200, 30, 60))
    files = {
        "rgb.jpg": rgb, "cmyk.jpg": rgb.convert("CMYK"), "gray.png": rgb.convert("L"),
        "alpha.png": rgb.convert("RGBA"), "pic.bmp": rgb, "upper.JPEG": rgb,
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        decoded = read_image(str(tmp_path / name))
        assert decoded.shape == (3, 10, 20) and decoded.dtype == torch.uint8, name
        expected = torch.tensor(image.convert("RGB").getpixel((5, 5)), dtype=torch.float)
        assert (decoded[:, 5, 5].float() - expected).abs().max() <= 8, name  # JPEG is lossy


def test_batches_are_normalized_on_the_device_float_batches_pass_through() -> None:
    from refconv_train.data import IMAGENET_MEAN, IMAGENET_STD
    from refconv_train.engine import StepSettings

    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(normalize_images(images), expected)
    settings = StepSettings(device=torch.device("cpu"), channels_last=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out, targets = settings.to_device(images, torch.tensor([1, 2]))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, images.float() / 127.5 - 1)
    already = torch.randn(2, 3, 5, 5)
    assert settings.to_device(already, targets)[0].equal(already)
