#!/usr/bin/env bash
# One-shot GPU checks, for a lent CUDA machine (what CPUs cannot show): benchmark ratios at 224 px / batch 128 with
# bf16 + channels_last, torch.compile, and training smoke runs through bf16, fp16 (GradScaler), channels_last,
# compile and NCCL (torchrun). Logs go to $OUT (default runs/gpu_check). Usage: bash scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
log() { echo "=== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME TIMEOUT CMD...: run, keep the log, record the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc $((SECONDS - t0))s: $(grep -v 'it/s' "$OUT/$name.log" | tail -n 1)"
}

$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/summary.txt"
$PY scripts/make_demo_data.py --out /tmp/demo >/dev/null

# 1. refocus vs baseline training step, eval of the fused model (the GPU targets in docs/performance.md)
for m in ${BENCH_MODELS-mobilenetv2_100 resnet18}; do
  step "bench_$m" 150 $PY scripts/benchmark.py --device cuda --amp bf16 --channels-last --model $m \
    --img-size 224 --batch-size 128 --json "$OUT/bench_$m.json"
done
# the dense transform's two forms (auto = GEMM on cached patches on CUDA), resnet18 only
[[ -n ${BENCH_MODELS-1} ]] && step bench_resnet18_denseconv 150 $PY scripts/benchmark.py --device cuda --amp bf16 \
  --channels-last --model resnet18 --img-size 224 --batch-size 128 --dense-transform conv \
  --json "$OUT/bench_resnet18_denseconv.json"
[[ -n ${BENCH_COMPILE-1} ]] && step bench_mobilenetv2_100_compile 200 $PY scripts/benchmark.py --device cuda --amp bf16 --channels-last --compile \
  --model mobilenetv2_100 --img-size 224 --batch-size 128 --no-memory --json "$OUT/bench_mobilenetv2_100_compile.json"

# 2. the trainer's CUDA paths on the demo data (short runs)
common=(--config configs/demo.yaml data.root=/tmp/demo train.device=cuda data.workers=4 optim.epochs=1
        optim.warmup_epochs=1 model.pretrained=false refconv.base_init=random)
step train_bf16_cl 120 $PY -m refconv_train.cli.train "${common[@]}" train.amp=bf16 train.channels_last=true \
  train.output=/tmp/r_bf16
step train_fp16 120 $PY -m refconv_train.cli.train "${common[@]}" train.amp=fp16 train.output=/tmp/r_fp16
step train_torchrun_nccl 120 $PY -m torch.distributed.run --nproc_per_node=1 -m refconv_train.cli.train \
  "${common[@]}" train.amp=bf16 train.sync_bn=true train.output=/tmp/r_nccl
step fuse 60 $PY -m refconv_train.cli.fuse /tmp/r_bf16/last.pth -o /tmp/r_bf16/deploy.pth
for c in /tmp/r_bf16/last.pth /tmp/r_bf16/deploy.pth; do
  step "eval_$(basename "$c" .pth)" 60 $PY -m refconv_train.cli.eval --data /tmp/demo --checkpoint "$c" \
    --device cuda --amp bf16 --channels-last
done
cp /tmp/r_bf16/summary.csv "$OUT/train_bf16_summary.csv" 2>/dev/null || true
step train_compile 200 $PY -m refconv_train.cli.train "${common[@]}" train.amp=bf16 train.compile=true \
  train.output=/tmp/r_compile
log done
