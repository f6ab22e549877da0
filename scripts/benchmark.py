"""Cost of RefConv: training-step and eval throughput of a model, its refocused twin and the fused result; with
``--methods``, the training cost of the paper's comparison methods (ACB, RepVGG, DBB, WN, CWN, OWN) beside RefConv's.

Both training setups live in ONE process and are timed in alternating blocks (A B A B ...) after warm-up, so drift
(thermal, other load, allocator state) hits both alike; each number is the median over ``--repeats`` blocks of
``--steps`` steps. A step is forward + cross-entropy + backward + SGD(momentum) step + ``zero_grad(set_to_none)``,
with the SGD `refconv-train` builds (``--sgd trainer``: the fused kernel where PyTorch has one).
Peak training memory is measured per setup in a fresh process, this script re-run with ``--memory-child`` (CPU:
growth of VmHWM over VmRSS from /proc/self/status; CUDA: ``torch.cuda.max_memory_allocated``), since a process's
high-water mark cannot be reset.

    python scripts/benchmark.py --model mobilenetv2_100 --img-size 128 --batch-size 32 [--json out.json]
    python scripts/benchmark.py --model resnet18 --methods acb repvgg dbb wn cwn own   # step time, memory, params
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from refconv_train import Refocus, build_model, fuse_model, methods  # noqa: E402
from refconv_train.config import OptimConfig  # noqa: E402
from refconv_train.engine import StepSettings, train_step  # noqa: E402
from refconv_train.methods.protocol import example_input  # noqa: E402
from refconv_train.methods.refconv.per_step import PerStepTransform, ddp_gradient_values  # noqa: E402
from refconv_train.run.factories import build_sgd  # noqa: E402

TRAIN_SETUPS = ("baseline", "refocus", "refocus_per_step")
SETUP_METHOD = {"baseline": "none", "refocus": "refconv", "refocus_per_step": "refconv"}  # else: a method's name
EVAL_SETUPS = ("baseline", "refocus", "fused")
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MEMORY_TAG = "peak_memory_bytes="


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenetv2_100", help="timm name or torchvision:<name>")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (warm-up then includes compiling)")
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches of --batch-size per optimizer step")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per setup before the timed blocks")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per setup (median is reported)")
    p.add_argument("--map-k", type=int, default=3)
    p.add_argument("--sgd", default="trainer", choices=("trainer", "default", "foreach", "fused"),
                   help="torch.optim.SGD implementation: trainer = what refconv-train builds (fused where PyTorch "
                        "has the kernel); default = PyTorch's choice for the device")
    p.add_argument("--dense-transform", default="auto", choices=("auto", "conv", "gemm"),
                   help="dense convs' transform: grouped conv or GEMM on cached patches (auto: GEMM on CUDA only)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--timer", default="wall", choices=("wall", "cpu"),
                   help="cpu: process CPU time instead of wall time (CPU only; robust on a shared machine with "
                        "--threads 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", metavar="OUT", help="also write the numbers as JSON")
    p.add_argument("--methods", nargs="+", choices=methods.names(), metavar="METHOD",
                   help=f"compare these registered methods' training steps with the baseline's and RefConv's "
                        f"instead ({', '.join(methods.names())})")
    p.add_argument("--memory-child", choices=TRAIN_SETUPS + tuple(methods.names()), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.amp == "fp16" and args.device != "cuda":
        p.error("--amp fp16 needs --device cuda (use bf16 on CPU)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.timer == "cpu" and args.device != "cpu":
        p.error("--timer cpu needs --device cpu")
    if min(args.steps, args.repeats, args.accum_steps) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --accum-steps must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------------------- building blocks
def build(args: argparse.Namespace, setup: str) -> tuple[nn.Module, int]:
    """The model of a setup (``baseline``, ``refocus``, ``refocus_per_step``) or of a registered method, through its
    registry entry (same seed: identical base weights); returns it and the trainable values the method adds (W_r;
    branches; scales)."""
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=1000)
    entry = methods.get(SETUP_METHOD.get(setup, setup))
    fields = {f.name for f in dataclasses.fields(entry.options)}
    options = entry.options(**({"map_k": args.map_k} if "map_k" in fields else {}))
    # cost does not depend on the weights: fresh=False skips the checks of the start (no untrained-kernel warning)
    report = entry.apply(model, options, example=example_input(model, args.img_size), fresh=False)
    return to_device(model, args), report.added_params if report is not None else 0


def to_device(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    model = model.to(args.device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(args.device), y.to(args.device)


def autocast(args: argparse.Namespace):
    if args.amp == "none":
        return nullcontext()
    return torch.autocast(args.device, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


def train_step_fn(model: nn.Module, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor,
                  per_step: bool = False) -> Callable[[], None]:
    """One training step of the engine as a closure (``--accum-steps`` micro-batches): only ``requires_grad``
    parameters (W_b is frozen) enter the optimizer. ``per_step``: W_t once per step (PerStepTransform), as
    refconv-train does."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if args.sgd == "trainer":
        opt = build_sgd(params, lr=0.01, optim=OptimConfig())  # the recipe: momentum 0.9, wd 4e-5
    else:
        impl = {"foreach": dict(foreach=True), "fused": dict(fused=True)}.get(args.sgd, {})
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=4e-5, **impl)
    scaler = torch.amp.GradScaler(args.device, enabled=args.amp == "fp16")
    fwd = torch.compile(model) if args.compile else model
    transform = PerStepTransform(model) if per_step else None
    settings = StepSettings(device=torch.device(args.device), amp=args.amp, channels_last=args.channels_last)
    micro_batches = [(x, y)] * args.accum_steps

    def step() -> None:  # refconv-train's own step: the engine's, not a copy of it
        train_step(fwd, micro_batches, opt, scaler, settings, transform)

    return step


def eval_step_fn(model: nn.Module, args: argparse.Namespace, x: torch.Tensor) -> Callable[[], None]:
    model.eval()
    fwd = torch.compile(model) if args.compile else model

    def step() -> None:
        with torch.no_grad(), autocast(args):
            fwd(x)

    return step


def time_alternating(fns: dict[str, Callable[[], None]], steps: int, warmup: int, repeats: int, device: str,
                     timer: str = "wall") -> tuple[dict[str, list[float]], float | None]:
    """Seconds per step of every ``fn``, one list entry per block; blocks alternate between the fns.

    Also returns, on CPU, the median CPU utilisation of the blocks (process CPU time / (wall time * threads)): well
    below 1 means other processes took the cores and wall times are inflated.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    out: dict[str, list[float]] = {name: [] for name in fns}
    utils = []
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":  # events time the GPU work, not the launch queue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(steps):
                    fn()
                end.record()
                end.synchronize()
                out[name].append(start.elapsed_time(end) / 1000 / steps)
            else:
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    fn()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                utils.append(cpu / (wall * torch.get_num_threads()))
                out[name].append((cpu if timer == "cpu" else wall) / steps)
    return out, statistics.median(utils) if utils else None


def forward_flops(model: nn.Module, args: argparse.Namespace, x: torch.Tensor) -> int:
    """Conv and matmul FLOPs of one forward with autograd on (so a refocused model computes ``W_t``), counted by
    torch's FlopCounterMode. Only the forward: its backward formula ignores conv groups (it counts mobilenetv2_100's
    backward at 20x its forward), so the step estimate is derived in :func:`flop_floor`."""
    with FlopCounterMode(display=False) as counter, autocast(args):
        model(x)
    return counter.get_total_flops()


def flop_floor(base_forward: int, refocus_forward: int) -> float:
    """Training FLOPs refocus / baseline: the network's step costs ~3 forwards (forward, input grads, weight grads);
    the transform ``T = refocus - baseline`` costs 2 (forward and W_r's grad; the frozen W_b gets none)."""
    return (3 * base_forward + 2 * (refocus_forward - base_forward)) / (3 * base_forward)


# ----------------------------------------------------------------------------------------------- peak memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args: argparse.Namespace, setup: str) -> int:
    """In a fresh process: bytes that building and training ``setup`` added at their peak."""
    x, y = make_batch(args)  # the batch is counted in neither setup
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _proc_status_kib("VmRSS")
        if start is None:
            raise RuntimeError("no /proc/self/status (not Linux): CPU peak memory is not measured")
        start *= 1024
    step = train_step_fn(build(args, setup)[0], args, x, y, per_step=setup == "refocus_per_step")
    for _ in range(3):  # the 2nd step adds momentum buffers, the 3rd shows the steady state
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _proc_status_kib("VmHWM") * 1024 - start


def peak_training_memories(args: argparse.Namespace, setups) -> dict[str, tuple[int | None, str | None]]:
    """Bytes each training setup adds at its peak (model, W_r, grads, momentum, activations), each measured in a fresh
    interpreter (a process's high-water mark cannot be reset); returns setup -> ``(bytes, None)`` or ``(None, error)``.

    On CUDA the probes run at once: ``max_memory_allocated`` counts one process's allocations only, so they cannot
    disturb each other, and a lent GPU's minutes go to the measurements instead of to eight interpreter starts. On CPU
    they run one after another: VmHWM is per process too, but the cores and the RAM are shared."""
    def start(setup):
        cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--memory-child", setup]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc) -> tuple[int | None, str | None]:
        try:
            out, err = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None, "memory subprocess timed out"
        lines = out.strip().splitlines()
        if proc.returncode == 0 and lines and lines[-1].startswith(MEMORY_TAG):
            return int(lines[-1][len(MEMORY_TAG):]), None
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return None, f"memory subprocess failed (exit {proc.returncode}): {tail}"

    if args.device == "cuda":
        procs = {s: start(s) for s in setups}
        return {s: finish(p) for s, p in procs.items()}
    return {s: finish(start(s)) for s in setups}


# ----------------------------------------------------------------------------------------------- the benchmark
def apply_settings(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    Refocus.dense_gemm = {"auto": None, "conv": False, "gemm": True}[args.dense_transform]


def run_benchmark(args: argparse.Namespace) -> dict:
    apply_settings(args)
    x, y = make_batch(args)
    base, _ = build(args, "baseline")
    refocused, n_refocus = build(args, "refocus")
    per_step, _ = build(args, "refocus_per_step")
    train, train_util = time_alternating(
        {"baseline": train_step_fn(base, args, x, y), "refocus": train_step_fn(refocused, args, x, y),
         "refocus_per_step": train_step_fn(per_step, args, x, y, per_step=True)},
        args.steps, args.warmup, args.repeats, args.device, args.timer)
    del per_step

    flops = {"baseline": forward_flops(base, args, x), "refocus": forward_flops(refocused, args, x)}
    reduced = {"baseline": ddp_gradient_values(base, False), "refocus": ddp_gradient_values(refocused, False),
               "refocus_per_step": ddp_gradient_values(refocused, True)}

    fused = copy.deepcopy(refocused)
    fuse_model(fused)
    fused_parametrized = sum(parametrize.is_parametrized(m) for m in fused.modules())
    evals, eval_util = time_alternating(
        {"baseline": eval_step_fn(base, args, x), "refocus": eval_step_fn(refocused, args, x),
         "fused": eval_step_fn(fused, args, x)},
        args.steps, max(args.warmup, 1), args.repeats, args.device, args.timer)

    def throughput(times: list[float], micro_batches: int = 1) -> float:
        return args.batch_size * micro_batches / statistics.median(times)

    res: dict = {
        "model": args.model, "device": args.device, "device_name": device_name(args.device),
        "threads": torch.get_num_threads(), "img_size": args.img_size, "batch_size": args.batch_size,
        "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "sgd": args.sgd,
        "dense_transform": args.dense_transform,
        "timer": args.timer, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "torch": torch.__version__, "cpu_util": {"train": train_util, "eval": eval_util},
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_VARS},
        "train_s_per_step": train, "eval_s_per_step": evals,
        "accum_steps": args.accum_steps,
        "train_img_s": {k: throughput(v, args.accum_steps) for k, v in train.items()},
        "eval_img_s": {k: throughput(v) for k, v in evals.items()},
        "fused_parametrized_modules": fused_parametrized,
        "refocus_params": n_refocus,
        "refocus_train_bytes": 3 * 4 * n_refocus,  # W_r + its grad + its momentum buffer, fp32
        "forward_flops": flops, "flop_ratio": flop_floor(flops["baseline"], flops["refocus"]),
        "ddp_reduced_values": reduced,
    }
    res["train_ratio"] = statistics.median(train["refocus"]) / statistics.median(train["baseline"])
    res["train_ratio_paired"] = statistics.median(r / b for r, b in zip(train["refocus"], train["baseline"]))
    res["train_ratio_best"] = min(train["refocus"]) / min(train["baseline"])  # fastest blocks: least disturbed
    res["train_ratio_per_step"] = statistics.median(train["refocus_per_step"]) / statistics.median(train["baseline"])
    res["eval_ratio_refocus"] = statistics.median(evals["refocus"]) / statistics.median(evals["baseline"])
    res["eval_ratio_fused"] = statistics.median(evals["fused"]) / statistics.median(evals["baseline"])
    if not args.no_memory:
        probes = peak_training_memories(args, TRAIN_SETUPS)
        res["peak_memory_bytes"] = {s: mem for s, (mem, _) in probes.items()}
        errors = {s: err for s, (_, err) in probes.items() if err}
        mem = res["peak_memory_bytes"]
        known = None not in mem.values()
        res["memory_ratio"] = mem["refocus"] / mem["baseline"] if known else None
        res["memory_ratio_per_step"] = mem["refocus_per_step"] / mem["baseline"] if known else None
        if errors:
            res["memory_errors"] = errors
    return res


def run_methods(args: argparse.Namespace) -> dict:
    """Training step time (alternating blocks, one process), peak training memory (fresh processes) and parameters
    during training of the baseline, RefConv (W_t once per step, as refconv-train runs it) and each method."""
    apply_settings(args)
    x, y = make_batch(args)
    setups = ["baseline", "refocus_per_step", *args.methods]
    models = {s: build(args, s) for s in setups}
    times, util = time_alternating(
        {s: train_step_fn(m, args, x, y, per_step=s == "refocus_per_step") for s, (m, _) in models.items()},
        args.steps, args.warmup, args.repeats, args.device, args.timer)
    base = statistics.median(times["baseline"])
    rows = {}
    for s, (model, added) in models.items():
        rows[s] = {"train_ratio": statistics.median(times[s]) / base,
                   "train_img_s": args.batch_size * args.accum_steps / statistics.median(times[s]),
                   "train_params": sum(p.numel() for p in model.parameters()), "added_params": added}
    if not args.no_memory:
        for s, (mem, err) in peak_training_memories(args, setups).items():
            rows[s]["peak_memory_bytes"] = mem
            if err:
                rows[s]["memory_error"] = err
        for s in setups:
            mem, ref = rows[s]["peak_memory_bytes"], rows["baseline"]["peak_memory_bytes"]
            rows[s]["memory_ratio"] = mem / ref if mem and ref else None
    return {"model": args.model, "device": args.device, "device_name": device_name(args.device),
            "threads": torch.get_num_threads(), "img_size": args.img_size, "batch_size": args.batch_size,
            "amp": args.amp, "channels_last": args.channels_last, "repeats": args.repeats, "steps": args.steps,
            "timer": args.timer, "torch": torch.__version__, "cpu_util": util, "methods": rows}


def format_methods(r: dict) -> str:
    lines = [f"{r['model']} | {r['device']} ({r['device_name']}, {r['threads']} threads) | {r['img_size']} px, batch "
             f"{r['batch_size']} | amp={r['amp']} channels_last={r['channels_last']} | {r['timer']} time, median of "
             f"{r['repeats']} alternating blocks x {r['steps']} steps",
             f"{'method':10s} {'train img/s':>12s} {'step time / baseline':>21s} {'peak memory':>12s} "
             f"{'memory / baseline':>18s} {'train params':>13s} {'added':>12s}"]
    for name, m in r["methods"].items():
        mem = m.get("peak_memory_bytes")
        name = {"refocus_per_step": "refconv"}.get(name, name)  # the setup refconv-train runs
        ratio = m.get("memory_ratio")
        lines.append(f"{name:10s} {m['train_img_s']:12.1f} {m['train_ratio']:21.3f} "
                     f"{'n/a' if mem is None else f'{mem / 2**20:.1f} MiB':>12s} "
                     f"{'n/a' if ratio is None else f'{ratio:.3f}':>18s} {m['train_params']:13,} "
                     f"{m['added_params']:12,}")
    lines.append("refconv = RefConv with W_t once per optimizer step (refconv-train's default); train params: every "
                 "parameter held during training (frozen W_b included); added: trainable values the method adds")
    if r["cpu_util"] is not None and r["cpu_util"] < 0.85:
        lines.append(f"warning: CPU utilisation {r['cpu_util']:.2f} < 0.85: other processes shared the cores")
    return "\n".join(lines)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        model = "cpu"
    return f"{model}, {os.cpu_count()} logical CPUs"


def format_table(r: dict) -> str:
    def mib(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 2**20:.1f} MiB"

    def ips(kind: str, setup: str) -> str:
        return f"{r[kind][setup]:9.1f} img/s"

    malloc = " ".join(f"{k}={v}" for k, v in r["malloc_env"].items() if v) or "default glibc malloc"
    lines = [
        f"{r['model']} | {r['device']} ({r['device_name']}, {r['threads']} threads) | {r['img_size']} px, "
        f"batch {r['batch_size']} x {r['accum_steps']} micro-batches | amp={r['amp']} "
        f"channels_last={r['channels_last']} compile={r['compile']} "
        f"sgd={r['sgd']} dense_transform={r['dense_transform']} | {r['timer']} time, median of {r['repeats']} "
        f"blocks x {r['steps']} steps | {malloc}",
        f"{'':6s} {'baseline':>15s} {'refocus':>15s} {'fused':>15s}  ratio (time)",
        f"{'train':6s} {ips('train_img_s', 'baseline')} {ips('train_img_s', 'refocus')} {'-':>15s}  "
        f"refocus/baseline = {r['train_ratio']:.3f} (paired blocks {r['train_ratio_paired']:.3f}, "
        f"fastest blocks {r['train_ratio_best']:.3f})",
        f"{'train*':6s} {'':>15s} {ips('train_img_s', 'refocus_per_step')} {'-':>15s}  "
        f"refocus/baseline = {r['train_ratio_per_step']:.3f} (* W_t once per step: what refconv-train runs)",
        f"{'eval':6s} {ips('eval_img_s', 'baseline')} {ips('eval_img_s', 'refocus')} {ips('eval_img_s', 'fused')}  "
        f"fused/baseline = {r['eval_ratio_fused']:.3f} (refocus/baseline {r['eval_ratio_refocus']:.3f})",
    ]
    if "peak_memory_bytes" in r:
        mem = r["peak_memory_bytes"]
        ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        kind = "torch.cuda.max_memory_allocated" if r["device"] == "cuda" else "VmHWM growth, fresh process"
        lines.append(f"{'memory':6s} {mib(mem['baseline']):>15s} {mib(mem['refocus']):>15s} {'-':>15s}  "
                     f"refocus/baseline = {ratio} (peak of training, {kind})")
        ratio = "n/a" if r["memory_ratio_per_step"] is None else f"{r['memory_ratio_per_step']:.3f}"
        lines.append(f"{'memory*':7s}{'':>15s} {mib(mem['refocus_per_step']):>15s} {'-':>15s}  "
                     f"refocus/baseline = {ratio}")
        lines += [f"memory {k}: {v}" for k, v in r.get("memory_errors", {}).items()]
    lines.append(f"W_r: {r['refocus_params']:,} params; W_r + grad + momentum = 3 * 4 B * {r['refocus_params']:,} "
                 f"= {mib(r['refocus_train_bytes'])}")
    flops = r["forward_flops"]
    lines.append(f"forward FLOPs (conv + matmul): baseline {flops['baseline'] / 1e9:.2f} G, refocus "
                 f"{flops['refocus'] / 1e9:.2f} G; training FLOPs ratio {r['flop_ratio']:.3f} (the train ratio's "
                 f"floor at equal efficiency, before the optimizer's extra W_r traffic)")
    red = r["ddp_reduced_values"]
    lines.append(f"DDP all-reduce per step: baseline {red['baseline']:,} values, refocus {red['refocus']:,} "
                 f"(W_r's gradients), refocus* {red['refocus_per_step']:,} (dL/dW_t instead)")
    lines.append(f"fused model: {r['fused_parametrized_modules']} parametrized modules")
    util = r["cpu_util"]["train"]
    if util is not None and util < 0.85:
        hint = "CPU times are less affected" if r["timer"] == "cpu" else "try --threads 1 --timer cpu"
        lines.append(f"warning: CPU utilisation {util:.2f} < 0.85 in the training blocks: other processes shared the "
                     f"cores and inflated wall times ({hint}, or use a quiet machine)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.memory_child:
        apply_settings(args)
        print(f"{MEMORY_TAG}{memory_child(args, args.memory_child)}")
        return None
    result = run_methods(args) if args.methods else run_benchmark(args)
    print((format_methods if args.methods else format_table)(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
