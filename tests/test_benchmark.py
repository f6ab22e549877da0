"""scripts/benchmark.py runs end to end on a tiny model and reports what it promises (no timing assertions)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("refconv_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # --threads sets the process's count: do not leak it into later tests


def test_benchmark_reports_ratios_memory_and_a_plain_fused_model(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = benchmark.main(["--model", "mobilenetv2_050", "--img-size", "32", "--batch-size", "2", "--steps", "1",
                             "--warmup", "1", "--repeats", "2", "--threads", "1", "--accum-steps", "2",
                             "--json", str(out)])
    printed = capsys.readouterr().out
    for text in ("refocus/baseline =", "fused/baseline =", "img/s", "W_r:", "peak of training", "FLOPs ratio"):
        assert text in printed, text
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["fused_parametrized_modules"] == 0
    assert result["sgd"] == "trainer"
    assert result["forward_flops"]["refocus"] > result["forward_flops"]["baseline"] > 0  # the transform is counted
    assert result["flop_ratio"] > 1
    assert result["train_ratio"] > 0 and result["eval_ratio_fused"] > 0 and result["train_ratio_paired"] > 0
    assert set(result["train_img_s"]) == {"baseline", "refocus", "refocus_per_step"}
    assert result["train_ratio_per_step"] > 0 and result["memory_ratio_per_step"] > 0
    reduced = result["ddp_reduced_values"]  # dL/dW_t has the kernels' shapes: the plain model's volume
    assert reduced["refocus_per_step"] == reduced["baseline"] and reduced["refocus"] > 4 * reduced["baseline"]
    assert set(result["eval_img_s"]) == {"baseline", "refocus", "fused"}
    assert result["refocus_params"] > 0 and result["refocus_train_bytes"] == 12 * result["refocus_params"]
    mem = result["peak_memory_bytes"]
    assert not result.get("memory_errors"), result.get("memory_errors")
    assert mem["baseline"] > 0 and mem["refocus"] > 0 and result["memory_ratio"] > 0


def test_pipeline_benchmark_reports_decode_rate_and_trainer_ratio(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("refconv_bench_pipeline", SCRIPT.parent / "bench_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pipe.json"
    assert module.main(["--model", "resnet10t", "--img-size", "32", "--src-size", "64", "--batch-size", "4",
                        "--workers", "0", "--steps", "1", "--repeats", "1", "--decode-images", "4",
                        "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decoded+augmented img/s per worker" in printed and "refconv-train engine" in printed
    result = json.loads(out.read_text())
    assert result["decode_img_per_s_per_worker"] > 0 and result["classic_decode_img_per_s_per_worker"] > 0
    assert result["ratio"] > 0


def test_ddp_benchmark_times_three_setups_under_torchrun(tmp_path):
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(SCRIPT.parent / "bench_ddp.py"), "--model", "mobilenetv2_050", "--img-size", "32", "--batch-size", "2",
           "--steps", "1", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert result["ratio_refocus"] > 0 and result["ratio_refocus_per_step"] > 0
    values = result["allreduce_values"]  # per step: the kernel-sized dL/dW_t instead of W_r's gradient
    assert values["refocus_per_step"] == values["baseline"] < values["refocus"]
