#!/usr/bin/env bash
# Does the imagenet arm's result survive a longer budget? The study's 3 epochs are 57 SGD steps, and its curves are
# still climbing at the end. This probe reruns its chosen fine-tuning control, the re-training control and
# refconv_norm (zeros + step norm at the fine-tuning lr) with EPOCHS epochs each on the test split, after
# `scripts/study.py --arm imagenet` (which prepares the data and weights). Nothing is selected here: the settings are
# the study's. Restartable: refconv-train resumes each run from its last.pth, finished runs are skipped.
#   scripts/study_budget_probe.sh            # EPOCHS=10 SEEDS="0 1 2" -> runs/study/imagenet_e10/
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-10}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-runs/study/imagenet_e$EPOCHS}
BIN=${BIN:-.venv/bin}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000
common=(--config configs/study/imagenet.yaml model.pretrained=data/tf_efficientnet_lite0_imagenet.pth
        data.root=data/fashion_mnist_5k data.val_split=val)
fixed=(optim.warmup_epochs=0 "optim.epochs=$EPOCHS")
declare -A variant=(
  [finetune_lr0.03]="refocus.enabled=false optim.lr=0.03 ${fixed[*]}"
  [refconv_norm]="refocus.enabled=true refocus.init=zeros refocus.step_norm=layer optim.lr=0.03 ${fixed[*]}"
  # the config's own recipe (lr 0.1 per 256, 1 warmup epoch), over the same number of epochs
  [retrain]="refocus.enabled=false optim.warmup_epochs=1 optim.epochs=$((EPOCHS - 1))"
)
for seed in $SEEDS; do
  for name in finetune_lr0.03 retrain refconv_norm; do
    dir="$OUT/seed$seed/$name"
    if [[ -f "$dir/DONE" ]]; then echo "== $dir: finished earlier, skipped"; continue; fi
    echo "== $dir"
    mkdir -p "$dir"
    # shellcheck disable=SC2086  # the overrides are words
    "$BIN/refconv-train" "${common[@]}" ${variant[$name]} "train.seed=$seed" "train.output=$dir" \
      >> "$dir/train.log" 2>&1 || { echo "$(tail -1 "$dir/train.log") (log: $dir/train.log)" >&2; exit 1; }
    touch "$dir/DONE"
  done
done
"$BIN/python" scripts/study_report.py "$OUT" --controls finetune_lr0.03 retrain
