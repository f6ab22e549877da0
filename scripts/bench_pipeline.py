"""Trainer and data-pipeline throughput, side by side in one process.

1. Decoded + augmented images/s of ONE data-loading worker (the paper's train transform at --img-size), from JPEGs of
   ImageNet-like size (generated, --src-size px): multiply by data.workers for what a node's loader can feed. Side
   by side, alternating: ours (torchvision.io decode, v2 transforms on uint8, normalization left to the device) and
   the classic one (PIL decode, v1 transforms, ToTensor + Normalize in the worker).
2. Training images/s of the trainer's per-step work (``refconv_train.engine.train_step``, the per-step LR, the loss
   and finiteness bookkeeping of ``LossMeter``, read every step as on CPU) against a bare loop (forward, backward,
   SGD step) over the same model, DataLoader and batch, alternating blocks; reports the ratio.

    python scripts/bench_pipeline.py --model mobilenetv2_100 --img-size 128 --batch-size 32 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refconv_train import build_model, refocus_model  # noqa: E402
from refconv_train.config import OptimConfig  # noqa: E402
from refconv_train.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset, build_loader, build_transform  # noqa: E402
from refconv_train.demo_data import make_demo_data  # noqa: E402
from refconv_train.engine import LossMeter, StepSettings, train_step  # noqa: E402
from refconv_train.run.factories import build_scheduler  # noqa: E402


def decode_rates(datasets: dict, n: int, repeats: int = 3) -> dict[str, float]:
    """Images/s of each dataset's __getitem__ (decode + augment) in this one process (one worker's rate): the
    median over ``repeats`` alternating blocks of ``n`` images."""
    rates: dict[str, list[float]] = {name: [] for name in datasets}
    for ds in datasets.values():
        ds[0]
    for r in range(repeats):
        for name, ds in datasets.items():
            t0 = time.perf_counter()
            for i in range(n):
                ds[(i + r * n) % len(ds)]
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in rates.items()}


def classic_dataset(root: Path, img_size: int) -> ImageFolder:
    """The pipeline most ImageNet scripts use (and this project did before): PIL, v1 transforms, float output."""
    bilinear = T.InterpolationMode.BILINEAR
    tf = T.Compose([T.RandomResizedCrop(img_size, interpolation=bilinear), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return ImageFolder(str(root / "train"), transform=tf)


def bare_loop(model, batches, optimizer, settings) -> int:
    images = 0
    for x, y in batches:
        x, y = settings.to_device(x, y)  # copy + normalize on the device, as every loop must now
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += x.shape[0]
    return images


def take(iterator, n):
    for _ in range(n):
        yield next(iterator)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2_100")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--src-size", type=int, default=400, help="side of the generated JPEGs (ImageNet: ~400x350)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per timed block")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--decode-images", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--refocus", action="store_true", help="time the refocused model (default: baseline)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_data(Path(tmp) / "d", num_classes=10, train_per_class=40, val_per_class=2,
                              size=args.src_size)
        dataset = build_dataset(root, "train", build_transform(args.img_size, True), 10)
        rates = decode_rates({"ours": dataset, "classic": classic_dataset(root, args.img_size)}, args.decode_images)
        per_worker = rates["ours"]
        print(f"data: {per_worker:.1f} decoded+augmented img/s per worker ({args.src_size}px JPEG -> "
              f"{args.img_size}px train transform); classic PIL + ToTensor/Normalize pipeline {rates['classic']:.1f} "
              f"img/s, ratio {per_worker / rates['classic']:.2f}")

        model = build_model(args.model, num_classes=10).to(device)
        if args.refocus:
            refocus_model(model)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=4e-5)
        scheduler = build_scheduler(optimizer, OptimConfig(epochs=100, warmup_epochs=0), 1000)
        loader = build_loader(dataset, args.batch_size, train=True, workers=args.workers, distributed=False,
                              rank=0, world_size=1, seed=0, pin_memory=device.type == "cuda")
        settings = StepSettings(device=device)
        scaler = torch.amp.GradScaler(device.type, enabled=False)

        def batches():
            while True:
                loader.sampler.set_epoch(loader.sampler.epoch + 1)
                yield from loader

        stream = batches()
        model.train()
        bare_loop(model, take(stream, 2), optimizer, settings)  # warm-up: workers started, allocator warm
        times = {"bare": [], "trainer": []}
        step = 0
        for _ in range(args.repeats):
            for name in ("bare", "trainer"):
                t0 = time.perf_counter()
                if name == "bare":
                    n = bare_loop(model, take(stream, args.steps), optimizer, settings)
                else:
                    meter, n = LossMeter(device), 0
                    for batch in take(stream, args.steps):
                        result = train_step(model, [batch], optimizer, scaler, settings)
                        meter.add(step, result)
                        n += result.images
                        step += 1
                        scheduler.step_update(num_updates=step)
                        meter.read(0, optimizer.param_groups[0]["lr"])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(n / (time.perf_counter() - t0))
        bare, trainer = statistics.median(times["bare"]), statistics.median(times["trainer"])
        print(f"train: bare loop {bare:.1f} img/s, refconv-train engine {trainer:.1f} img/s, "
              f"ratio {trainer / bare:.3f} ({args.model}{' refocused' if args.refocus else ''}, "
              f"batch {args.batch_size}, {args.img_size}px, {args.workers} workers, {args.device})")
        if args.json:
            Path(args.json).write_text(json.dumps({"decode_img_per_s_per_worker": per_worker,
                                                   "classic_decode_img_per_s_per_worker": rates["classic"],
                                                   "bare_img_per_s": bare,
                                                   "trainer_img_per_s": trainer, "ratio": trainer / bare,
                                                   "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
