"""examples/: the detection and segmentation examples end to end in their quick form, on generated Fashion-MNIST.

Each: a backbone with (briefly) trained weights through torchvision's hub path, RefConv on it, a plain loop with the
model's own losses, fused, strictly loaded into a freshly built torchvision model, the same boxes / masks."""

from __future__ import annotations

import importlib
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_thread

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
canvases = importlib.import_module("fashion_canvases")
pretrain = importlib.import_module("pretrain_backbone")
detection = importlib.import_module("detection")
segmentation = importlib.import_module("segmentation")


def write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(src: Path, per_class: dict[str, int]) -> Path:
    """Ten classes of 28x28 items: a bright bar whose angle and length follow the class, plus noise."""
    rng = np.random.default_rng(0)
    src.mkdir(parents=True)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    for split, n in per_class.items():
        labels = np.repeat(np.arange(10), n)
        images = np.zeros((len(labels), 28, 28))
        for i, c in enumerate(labels):
            angle = c * np.pi / 10
            along, across = xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)
            images[i] = 220 * ((np.abs(across) < 3 + c % 3) & (np.abs(along) < 8 + c)) + rng.integers(0, 30, (28, 28))
        write_idx(src / f"{split}-images-idx3-ubyte", images)
        write_idx(src / f"{split}-labels-idx1-ubyte", labels)
    return src


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Canvases (64 px) and the backbone's stand-in weights, installed where torchvision's hub cache looks."""
    root = tmp_path_factory.mktemp("examples")
    src = fake_fashion_mnist(root / "src", {"train": 12, "t10k": 4})
    canvases.build(src, root / "canvases", train=24, val=8, size=64)
    with one_thread():
        state, losses, _ = pretrain.pretrain(src, steps=4, batch=8, size=32)
    pretrain.install(state, root / "torch_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        yield canvases.load_split(root / "canvases", "train"), canvases.load_split(root / "canvases", "val")


def test_canvases_are_deterministic_and_boxes_frame_their_masks(quick, tmp_path):
    train, _ = quick
    src = fake_fashion_mnist(tmp_path / "src", {"train": 3, "t10k": 2})
    a = canvases.paste(*canvases.read_items(src, "train", canvases.CLASSES), 6, 64, seed=3)
    b = canvases.paste(*canvases.read_items(src, "train", canvases.CLASSES), 6, 64, seed=3)
    assert torch.equal(a["images"], b["images"]) and all(torch.equal(x, y) for x, y in zip(a["boxes"], b["boxes"]))
    for mask, boxes, labels in zip(train["masks"], train["boxes"], train["labels"]):
        assert len(boxes) >= 1
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for (x1, y1, x2, y2), label in zip(boxes.int().tolist(), labels.tolist()):
            region = mask[y1:y2, x1:x2]
            assert (region == label).any(dim=0).all() and (region == label).any(dim=1).all()  # tight box
            covered[y1:y2, x1:x2] = True
        assert not (mask.bool() & ~covered).any()  # every labelled pixel lies in a box


def test_detection_example_learns_fuses_and_reloads_into_torchvision_exactly(quick):
    train, val = quick
    with one_thread():  # (4 pretraining steps leave kernels that still look untrained: the guard may warn)
        result = detection.run(train, val, steps=6, batch=4, size=64, log_every=0)
    assert result["refocused"] == 16  # mobilenet_v3_large's spatial convs, stem included; heads left alone
    losses = result["losses"]
    assert sum(losses[-2:]) < sum(losses[:2])  # SSD's own losses fall
    assert 0 <= result["map50_after"] <= 1
    assert result["fused_max_abs_diff"] <= 1e-4  # same boxes, labels and scores


def test_segmentation_example_learns_fuses_and_reloads_into_torchvision_exactly(quick):
    train, val = quick
    with one_thread():
        result = segmentation.run(train, val, steps=6, batch=4, log_every=0)
    assert result["layers"] == 16
    losses = result["losses"]
    assert sum(losses[-2:]) < sum(losses[:2])
    assert result["fused_max_abs_diff"] <= 1e-4 and result["fused_mask_pixels_changed"] == 0


def test_segmentation_example_trains_a_comparison_method_through_the_same_loop(quick):
    train, val = quick
    with one_thread():
        result = segmentation.run(train, val, steps=2, batch=4, log_every=0, method="acb")
    assert result["method"] == "acb" and result["layers"] > 0
    # Two steps from a 4-step backbone leave logits of ~160: the ACB fuse is exact in fp64 (1e-11, measured), fp32
    # sums its branches in another order (0.02 apart); the relative bound still catches any wrong kernel or bias.
    assert result["fused_max_abs_diff"] <= 1e-3 * result["logit_scale"]


def test_mean_ap_and_mean_iou_on_known_cases():
    data = {"boxes": [torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[20.0, 20, 30, 30]])],
            "labels": [torch.tensor([1]), torch.tensor([1])]}
    exact = [{"boxes": b, "scores": torch.ones(1), "labels": torch.tensor([1])} for b in data["boxes"]]
    assert detection.mean_ap(exact, data, 2) == pytest.approx(1.0)
    half = [exact[0], {"boxes": torch.tensor([[50.0, 50, 60, 60]]), "scores": torch.tensor([0.5]),
                       "labels": torch.tensor([1])}]
    assert detection.mean_ap(half, data, 2) == pytest.approx(0.5)  # recall 0.5 at precision 1, then a miss
    target = torch.tensor([[0, 0, 1, 1]])
    assert segmentation.mean_iou(target, target, 2) == pytest.approx(1.0)
    assert segmentation.mean_iou(torch.zeros_like(target), target, 2) == pytest.approx(0.25)  # bg 0.5, fg 0
