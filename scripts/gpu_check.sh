#!/usr/bin/env bash
# One-shot GPU checks for a lent CUDA machine: what CPUs cannot show. Logs and JSON go to $OUT (default
# runs/gpu_check); summary.txt holds one line per step (name, exit status, seconds, last line of its log).
#   1. the trainer's CUDA paths on the demo data, in parallel: a plain fp32 baseline, then from its weights RefConv in
#      fp32, bf16 + channels_last, fp16 (GradScaler) and torch.compile, DBB, OREPA and OWN, each fused and evaluated;
#      torchrun (1 process, NCCL, SyncBN, the per-step transform) for one epoch of two, then resumed;
#   2. alone on the GPU, one after another: scripts/benchmark.py at 224 px / batch 128 / bf16 + channels_last for each
#      of $BENCH_MODELS (RefConv vs baseline with the FLOP floor, then every method's step time and memory ratio),
#      and the input pipeline's decoded images/s per worker at 224 px.
# Usage: bash scripts/gpu_check.sh. Dry run on a CPU: DEVICE=cpu IMG=64 BS=8 BENCH_MODELS=resnet18 bash ...
# (BENCH_MODELS= PIPELINE=0 EXTRA=train.max_steps_per_epoch=2: the trainer paths alone, short)
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
IMG=${IMG:-224}
BS=${BS:-128}
BENCH_MODELS=${BENCH_MODELS-mobilenetv2_100 resnet18 convnext_atto}
METHODS=${METHODS:-acb repvgg dbb orepa wn cwn own}
CHAINS=${CHAINS-all}  # which training runs of part 1: all, none, or names (refconv_fp32 dbb_bf16_cl ...)
PLAIN_BENCH=${PLAIN_BENCH:-1}  # 0: skip the RefConv-vs-baseline benchmark (FLOP floor), keep the methods' one
WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
log() { echo "=== $*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME TIMEOUT CMD...: run, keep the log, record the status; returns the command's status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc $((SECONDS - t0))s: $(grep -v 'it/s' "$OUT/$name.log" | tail -n 1)"
  return $rc
}

$PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
  | tee -a "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null \
  | tee -a "$OUT/summary.txt"
$PY scripts/make_demo_data.py --out "$WORK/demo" >/dev/null

# 1. The trainer's paths (short runs on the demo data), from one plain baseline.
common=(--config configs/demo.yaml data.root="$WORK/demo" train.device="$DEVICE" data.workers=2 optim.epochs=1
        optim.warmup_epochs=1 train.resume=false ${EXTRA:-})
train=($PY -m refconv_train.cli.train "${common[@]}")
fuse_eval() {  # fuse_eval NAME RUN_DIR [eval flags]: fuse last.pth (verified), evaluate both files on the device
  local name=$1 run=$2; shift 2
  step "${name}_fuse" 90 $PY -m refconv_train.cli.fuse "$run/last.pth" -o "$run/last_fused.pth" &&
    for c in last last_fused; do
      step "${name}_eval_$c" 60 $PY -m refconv_train.cli.eval --data "$WORK/demo" --checkpoint "$run/$c.pth" \
        --device "$DEVICE" --workers 2 "$@"
    done
}
want() { [[ $CHAINS == all || " $CHAINS " == *" $1 "* ]]; }
chain() {  # chain NAME KEY=VALUE...: train from the baseline's weights, then fuse and evaluate (if CHAINS wants it)
  local name=$1; shift
  want "$name" || return 0
  step "train_$name" 180 "${train[@]}" model.pretrained="$WORK/base/best.pth" train.output="$WORK/$name" "$@" &&
    fuse_eval "$name" "$WORK/$name"
}
[[ $CHAINS != none ]] && step train_base_fp32 120 "${train[@]}" method=none train.output="$WORK/base"
if [[ $CHAINS != none && -f $WORK/base/best.pth ]]; then
  chain refconv_fp32 &
  chain refconv_bf16_cl train.amp=bf16 train.channels_last=true &
  [[ $DEVICE == cuda ]] && chain refconv_fp16 train.amp=fp16 &
  [[ $DEVICE == cuda ]] && chain refconv_compile train.amp=bf16 train.compile=true &
  chain dbb_bf16_cl method=dbb train.amp=bf16 train.channels_last=true &
  chain orepa_bf16_cl method=orepa train.amp=bf16 train.channels_last=true &
  chain own_bf16 method=own train.amp=bf16 &
  sync_bn=$([[ $DEVICE == cuda ]] && echo true || echo false)  # PyTorch's SyncBN is CUDA-only
  want torchrun && (  # torchrun, NCCL on CUDA: epoch 1 of 2 (the per-step transform, SyncBN), stop, resume for epoch 2, fuse
    ddp=(-m torch.distributed.run --standalone --nproc_per_node=1 -m refconv_train.cli.train "${common[@]}"
         model.pretrained="$WORK/base/best.pth" train.output="$WORK/torchrun" optim.epochs=2 optim.warmup_epochs=0
         train.amp=bf16 train.sync_bn="$sync_bn" refconv.per_step_transform=true)
    step torchrun_epoch1 150 $PY "${ddp[@]}" train.stop_after_epoch=1 &&
      step torchrun_resume 150 $PY "${ddp[@]/train.resume=false/train.resume=auto}" &&
      fuse_eval torchrun "$WORK/torchrun"
  ) &
  wait
fi
# 2. Benchmarks, alone on the device once the runs are done.
amp=(--amp bf16 --channels-last --repeats ${REPEATS:-3})
for m in $BENCH_MODELS; do
  [[ $PLAIN_BENCH == 1 ]] && step "bench_$m" 90 $PY scripts/benchmark.py --device "$DEVICE" "${amp[@]}" --model "$m" --img-size "$IMG" \
    --batch-size "$BS" --no-memory --json "$OUT/bench_$m.json"
  # shellcheck disable=SC2086
  step "methods_$m" 120 $PY scripts/benchmark.py --device "$DEVICE" "${amp[@]}" --model "$m" --img-size "$IMG" \
    --batch-size "$BS" --methods $METHODS --json "$OUT/methods_$m.json"
done
[[ ${PIPELINE:-1} == 1 ]] && step pipeline 90 $PY scripts/bench_pipeline.py --device "$DEVICE" --img-size "$IMG" \
  --batch-size 64 --workers 4 --repeats 3 --json "$OUT/pipeline.json"

for r in "$WORK"/*/summary.csv; do cp "$r" "$OUT/$(basename "$(dirname "$r")")_summary.csv" 2>/dev/null; done
log done
