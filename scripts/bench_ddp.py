"""DDP training steps: baseline, RefConv with plain autograd, RefConv with PerStepTransform, side by side in one run.

Under DDP, plain autograd all-reduces W_r's gradient (mobilenetv2_100: 40.6M values more than the model);
PerStepTransform all-reduces the kernel-sized dL/dW_t instead. This times both, in alternating blocks (same
process group, same batches), and prints ratios against the baseline. Launch with torchrun (gloo on CPU, NCCL on
CUDA):

    torchrun --standalone --nproc_per_node=2 scripts/bench_ddp.py --model mobilenetv2_100 --img-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refconv_train import build_model, refocus_model  # noqa: E402
from refconv_train.config import OptimConfig  # noqa: E402
from refconv_train.engine import StepSettings, train_step  # noqa: E402
from refconv_train.methods.refconv.per_step import PerStepTransform, ddp_gradient_values  # noqa: E402
from refconv_train.run.factories import build_sgd  # noqa: E402

SETUPS = ("baseline", "refocus", "refocus_per_step")


def make_step(setup: str, args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=1000)
    if setup != "baseline":
        refocus_model(model)
    model.to(device).train()
    transform = None
    if setup == "refocus_per_step":
        transform = PerStepTransform(model, distributed=True)
        PerStepTransform.exclude_from_ddp(model)
        transform.broadcast()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = build_sgd([p for p in model.parameters() if p.requires_grad], 0.01, OptimConfig())
    reduced = ddp_gradient_values(model, per_step=transform is not None)

    scaler = torch.amp.GradScaler(device.type, enabled=False)
    settings = StepSettings(device=device)

    def step() -> None:  # refconv-train's own step: the engine's, not a copy of it
        train_step(ddp, [(x, y)], opt, scaler, settings, transform)

    return step, reduced


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2_100")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="per process (CPU)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size, args.img_size, args.threads) < 1:
        p.error("--steps, --repeats, --batch-size, --img-size and --threads must be >= 1")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
        y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
        steps, reduced = {}, {}
        for setup in SETUPS:
            steps[setup], reduced[setup] = make_step(setup, args, device, x, y)
            steps[setup]()  # warm-up
        times: dict[str, list[float]] = {s: [] for s in SETUPS}
        for _ in range(args.repeats):
            for setup in SETUPS:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[setup]()
                if cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                times[setup].append((time.perf_counter() - t0) / args.steps)
        med = {s: statistics.median(v) for s, v in times.items()}
        result = {"model": args.model, "world_size": world, "backend": dist.get_backend(), "img_size": args.img_size,
                  "batch_size_per_process": args.batch_size, "s_per_step": med, "allreduce_values": reduced,
                  "ratio_refocus": med["refocus"] / med["baseline"],
                  "ratio_refocus_per_step": med["refocus_per_step"] / med["baseline"]}
        if rank == 0:
            print(f"{args.model} | DDP {world} x {result['backend']} | {args.img_size} px, batch {args.batch_size} "
                  f"per process | median of {args.repeats} blocks x {args.steps} steps")
            for s in SETUPS:
                print(f"{s:18s} {med[s] * 1e3:8.1f} ms/step  {med[s] / med['baseline']:.3f} x baseline  "
                      f"all-reduce {reduced[s]:,} values/step")
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
