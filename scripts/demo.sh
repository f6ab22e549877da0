#!/usr/bin/env bash
# `make demo`: the whole RefConv story on a 2-core CPU in a few minutes, on procedurally drawn shapes (10 classes).
#   1. demo data (data/demo, skipped when up to date)
#   2. baseline: the plain model trained from scratch                      -> runs/demo/baseline/best.pth
#   3. refocus: RefConv initialised from the baseline, same recipe        -> runs/demo/refocus/{best,fused}.pth
#      and its control: the plain baseline re-trained with the same recipe -> runs/demo/retrain/best.pth
#   4. refconv-fuse of the refocus run's best.pth (prints max_abs_diff)     -> runs/demo/refocus/best_fused.pth
#   5. refconv-eval of baseline, RefConv and fused checkpoints (--json), then a results table.
# Every run starts clean: runs/demo/ is deleted first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
# Idle OpenMP threads sleep instead of spinning: when the 2 cores are shared (data-loader workers, anything else
# running), spinning threads were measured to make training steps 10-50x slower; on an idle machine it costs little.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

CONFIG=configs/demo.yaml
DATA=data/demo
OUT=runs/demo
REFOCUS_EPOCHS=${REFOCUS_EPOCHS:-4}  # cosine epochs of the refocus stage (after its warmup); the baseline's are in $CONFIG
EVAL=(--data "$DATA" --workers 0 --batch-size 100)

step() { printf '\n=== %s\n' "$*"; }

step "demo data -> $DATA"
python scripts/make_demo_data.py --out "$DATA"
rm -rf "$OUT"
start=$(date +%s)

step "baseline: the plain model from scratch -> $OUT/baseline"
refconv-train --config "$CONFIG" method=none train.output="$OUT/baseline" train.resume=false

step "refocus: RefConv from the baseline's best.pth -> $OUT/refocus"
refconv-train --config "$CONFIG" model.pretrained="$OUT/baseline/best.pth" train.output="$OUT/refocus" \
  train.resume=false optim.epochs="$REFOCUS_EPOCHS"

step "control: the plain baseline re-trained with the refocus stage's recipe -> $OUT/retrain"
# Without it, a gain of the refocus stage could just be its extra epochs (the paper's own control).
refconv-train --config "$CONFIG" method=none model.pretrained="$OUT/baseline/best.pth" \
  train.output="$OUT/retrain" train.resume=false optim.epochs="$REFOCUS_EPOCHS"

step "fuse: $OUT/refocus/best.pth -> $OUT/refocus/best_fused.pth"
refconv-fuse "$OUT/refocus/best.pth" -o "$OUT/refocus/best_fused.pth"

step "evaluate"
refconv-eval "${EVAL[@]}" --checkpoint "$OUT/baseline/best.pth" --json "$OUT/eval_baseline.json"
refconv-eval "${EVAL[@]}" --checkpoint "$OUT/retrain/best.pth" --json "$OUT/eval_retrain.json"
refconv-eval "${EVAL[@]}" --checkpoint "$OUT/refocus/best.pth" --json "$OUT/eval_refocus.json"
refconv-eval "${EVAL[@]}" --checkpoint "$OUT/refocus/best_fused.pth" --json "$OUT/eval_fused.json"
seconds=$(( $(date +%s) - start ))

step "results"
python scripts/demo_report.py "$OUT" --seconds "$seconds"
