#!/usr/bin/env bash
# The accuracy runs that need an NVIDIA GPU (docs/accuracy.md), in one call of under 10 minutes (the steps' time
# limits add up to 9.5); output under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_accuracy.sh chapter   # the chapter's models at 224x224, 10-20 epochs each
#   OUT=/some/dir bash benchmarks/gpu_accuracy.sh best      # --preset best over 3 seeds, then nin28_l on holdout
#   OUT=/tmp/dry bash benchmarks/gpu_accuracy.sh chapter --dry-run   # the same steps on the CPU, tiny
#
# chapter: `--preset d2l` as the chapter runs it (lr 0.1, fp32), the reader's lr 0.04 for 20 epochs, and d2l's
#          AlexNet (lr 0.01) and VGG-11 (lr 0.05, a quarter of its width, as d2l trains it) baselines with the
#          chapter's recipe, in that order.
# best:    `nin bench --time-to-accuracy --preset best` for seeds 0-2 on the test set, then nin28_l for 60 epochs
#          (a candidate for 95%) scored on 5,000 held-out training images only: settings are chosen there, never
#          on the test set.
# Each finished run becomes a record in $OUT/records/ (benchmarks/results format, with this machine's nin doctor
# fingerprint); a step past its time limit is stopped and left unrecorded. Copy the records to
# benchmarks/results/ and run python benchmarks/render_accuracy.py. Data and set-up as in benchmarks/gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:-}
DRY=0
case "${2:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) SUITE=bad ;;
esac
case "$SUITE" in
  chapter|best) ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_accuracy.sh chapter|best [--dry-run]" >&2; exit 2 ;;
esac
NAME=gpu_accuracy.sh
# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

if [ "$DRY" = 1 ]; then  # one epoch of two steps of each run, on the CPU: it checks the steps, not the figures
  dev=cpu
  toy=(--batch-size 8 --eval-batch-size 8 --subset 16 --test-subset 16 --epochs 1)
  small=(--resize 96)
else
  dev=cuda
  toy=()
  small=()
fi

trained() {  # trained NAME SECONDS nin train ARGS...: a run, then its record if it finished in time
  local name=$1 limit=$2; shift 2
  local out="$WORK/$name"
  step "$name" "$limit" "$PY" -m nin "$@" --device "$dev" "${toy[@]}" --out "$out" || return 0
  cp "$out/metrics.jsonl" "$OUT/$name-metrics.jsonl"
  step "$name-record" 60 "$PY" benchmarks/record_run.py "$out" --command "nin $*" --results "$OUT/records" || true
}

step doctor 60 bash -c "'$PY' -m nin doctor --device $dev --json > '$OUT/doctor.json' && '$PY' -m nin doctor --device $dev"
case "$SUITE" in
  chapter)
    trained d2l 90 train --preset d2l "${small[@]}"
    trained d2l-reader 150 train --preset d2l --lr 0.04 --epochs 20 "${small[@]}"
    trained alexnet 90 train --preset d2l --model alexnet --lr 0.01 "${small[@]}"
    trained vgg11 180 train --preset d2l --model vgg11 --width 0.25 --lr 0.05 "${small[@]}" ;;
  best)
    if [ "$DRY" = 1 ]; then bench=(--epochs 1 --subset 512); else bench=(); fi
    for s in 0 1 2; do
      step "best-seed$s" 120 "$PY" -m nin bench --device "$dev" --time-to-accuracy --preset best --seed "$s" \
        --targets 0.94,0.95 --record "$OUT/records" "${bench[@]}"
    done
    trained best-l-60 150 train --holdout 5000 --preset best --model nin28_l --epochs 60 ;;
esac
finish
