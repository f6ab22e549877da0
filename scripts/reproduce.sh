#!/usr/bin/env bash
# RefConv on Fashion-MNIST at CPU scale: baseline, RefConv and the paper's Fig. 5 ablations, per seed, then a
# results table (docs/reproduction.md).
#
#   scripts/reproduce.sh [--seeds "0 1 2"] [--quick] [--src DIR] [--out DIR] [--device auto|cpu|cuda]
#
# Per seed S, into OUT/seedS/<variant>/ (each a refconv-train run: summary.csv, best.pth, last.pth, ...):
#   baseline                    configs/fashion_mnist/baseline.yaml, from scratch
#   refocus                     configs/fashion_mnist/refocus.yaml from the baseline's best.pth: W_b frozen, W_r learns
#   retrain                     the same without RefConv (refocus.enabled=false): the baseline trained again
#   finetune                    no RefConv, lr / 100, no warmup, same number of epochs
#   base_random_frozen          RefConv with W_b re-initialised at random, frozen
#   base_pretrained_trainable   RefConv with W_b = baseline, trainable
#   base_random_trainable       RefConv with W_b random, trainable
# then scripts/reproduce_table.py -> OUT/results.md, and refconv-analyze on the first seed's RefConv model -> OUT/analysis.
#
# --quick: a smoke test of the whole pipeline in minutes (20 train / 10 val images per class, 1 epoch per run),
# written to runs/reproduce_quick; its numbers mean nothing. Finished runs are skipped when the script is run again
# (delete OUT to start over); an interrupted run continues from its last.pth.
# Environment: FASHION_MNIST_SRC (the IDX files; default /usr/share/datasets/fashion-mnist, Debian's
# dataset-fashion-mnist package), PYTHON (default .venv/bin/python if present, else python3). On a shared CPU,
# OMP_NUM_THREADS=1 avoids thread oversubscription (measured 100x slower with 2 threads on a loaded 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS="0 1 2"
QUICK=0
SRC="${FASHION_MNIST_SRC:-/usr/share/datasets/fashion-mnist}"
OUT=""
DEVICE=auto
usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) SEEDS="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --src) SRC="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n "${SEEDS// /}" ]] || { echo "error: --seeds is empty; give e.g. --seeds \"0 1 2\"" >&2; exit 2; }
for s in $SEEDS; do
    [[ "$s" =~ ^[0-9]+$ ]] || { echo "error: seed '$s' is not a non-negative integer" >&2; exit 2; }
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
BIN="$(dirname "$PY")"
TRAIN="$BIN/refconv-train"; [[ -x "$TRAIN" ]] || TRAIN=refconv-train
ANALYZE="$BIN/refconv-analyze"; [[ -x "$ANALYZE" ]] || ANALYZE=refconv-analyze
# glibc returns big activation buffers to the OS after every step by default; keeping them is faster (Makefile).
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-1000000000}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-1000000000}"

if [[ $QUICK == 1 ]]; then
    DATA=data/fashion_mnist_quick; OUT="${OUT:-runs/reproduce_quick}"
    PREP=(--train-per-class 20 --val-per-class 10)
    COMMON=(optim.epochs=1 optim.warmup_epochs=0 data.batch_size=32 data.workers=0)
    EPOCHS=1
else
    DATA=data/fashion_mnist; OUT="${OUT:-runs/reproduce}"
    PREP=(--train-per-class 600 --val-per-class 500)
    COMMON=()
    EPOCHS=6  # warmup + cosine epochs of configs/fashion_mnist/*.yaml
fi
COMMON+=(data.root="$DATA" train.device="$DEVICE")

"$PY" scripts/prepare_fashion_mnist.py --src "$SRC" --out "$DATA" "${PREP[@]}"

# One refconv-train run into $1, skipped when finished; a folder that holds a run with other settings is an error.
run() {
    local out="$1"; shift
    local cmd="$TRAIN $* train.output=$out"
    if [[ -f "$out/command.txt" && "$(cat "$out/command.txt")" != "$cmd" ]]; then
        echo "error: $out holds a run with other settings ($out/command.txt); delete $OUT to start over" >&2
        exit 2
    fi
    if [[ -f "$out/DONE" ]]; then
        echo "== $out: finished earlier, skipped"
        return
    fi
    echo "== $out"
    mkdir -p "$out"
    echo "$cmd" > "$out/command.txt"
    local start=$SECONDS
    "$TRAIN" "$@" train.output="$out"
    echo "$((SECONDS - start)) s" > "$out/DONE"
}

start_all=$SECONDS
for seed in $SEEDS; do
    dir="$OUT/seed$seed"
    run "$dir/baseline" --config configs/fashion_mnist/baseline.yaml train.seed="$seed" "${COMMON[@]}"
    stage2=(--config configs/fashion_mnist/refocus.yaml model.pretrained="$dir/baseline/best.pth" train.seed="$seed"
            "${COMMON[@]}")
    run "$dir/refocus" "${stage2[@]}"
    run "$dir/retrain" "${stage2[@]}" refocus.enabled=false
    run "$dir/finetune" "${stage2[@]}" refocus.enabled=false optim.lr=0.001 optim.warmup_epochs=0 \
        optim.epochs="$EPOCHS"
    run "$dir/base_random_frozen" "${stage2[@]}" refocus.base_init=random
    run "$dir/base_pretrained_trainable" "${stage2[@]}" refocus.base=trainable
    run "$dir/base_random_trainable" "${stage2[@]}" refocus.base=trainable refocus.base_init=random
done

first=$(set -- $SEEDS; echo "$1")
"$ANALYZE" "$OUT/seed$first/refocus/best.pth" --out "$OUT/analysis"
"$PY" scripts/reproduce_table.py "$OUT" -o "$OUT/results.md"
echo "all runs: $((SECONDS - start_all)) s; table: $OUT/results.md; figures: $OUT/analysis"
