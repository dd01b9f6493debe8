#!/usr/bin/env bash
# Everything nin measures on an NVIDIA GPU, in one call of under 8 minutes; all output goes under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu.sh            # on a machine with a CUDA GPU
#   OUT=/tmp/dry bash benchmarks/gpu.sh --dry-run   # the same steps on the CPU, tiny, to check the script
#
# Steps, each under its own time limit, each logged in $OUT/gpu.log:
#   1. nin doctor --json                                      -> doctor.json
#   2. the CUDA-only tests (tests/test_cuda.py)               -> cuda-tests.xml
#   3. nin bench --baseline: nin_d2l at 224 vs the seed's way -> bench records (benchmarks/results format)
#   4. nin bench --time-to-accuracy, the default recipe       -> a record
#   5. nin train --preset d2l --epochs 2                      -> d2l-metrics.jsonl, its summary line in gpu.log
#   6. nin export of that run (ONNX where onnxruntime is installed, else TorchScript) -> export.json
# The records land in $OUT/records/ (copy them to benchmarks/results/, then run
# python benchmarks/render_performance.py). $OUT/gpu-out.tar.gz holds all of it.
#
# Data: real Fashion-MNIST from NIN_DATA_DIR, or .data/fashion-mnist/ in this checkout (carry it to a machine
# that has no copy: mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/),
# or the usual places (nin datasets). nin itself runs from src/ (PYTHONPATH), so no install is needed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
NAME=gpu.sh
# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

if [ "$DRY" = 1 ]; then
  dev=cpu
  bench_speed=(--size 96 --steps 1 --repeats 1 --latency-runs 2 --workers 1)
  tta=(--epochs 1 --subset 2048)
  d2l=(--epochs 1 --resize 96 --subset 256 --test-subset 256)
else  # the test module skips itself without a GPU, so the dry run only checks that the step runs
  dev=cuda
  bench_speed=(--repeats 5)
  tta=()
  d2l=(--epochs 2)
fi

step doctor 60 bash -c "'$PY' -m nin doctor --device $dev --json > '$OUT/doctor.json' && '$PY' -m nin doctor --device $dev"
step cuda-tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rA --junitxml="$OUT/cuda-tests.xml"
step bench-baseline 240 "$PY" -m nin bench --device "$dev" --baseline "${bench_speed[@]}" --record "$OUT/records"
step time-to-accuracy 180 "$PY" -m nin bench --device "$dev" --time-to-accuracy "${tta[@]}" --record "$OUT/records"
step d2l-preset 240 "$PY" -m nin train --preset d2l --device "$dev" "${d2l[@]}" --out "$WORK/d2l"
if [ -e "$WORK/d2l/metrics.jsonl" ]; then
  cp "$WORK/d2l/metrics.jsonl" "$OUT/d2l-metrics.jsonl"
  fmt=$("$PY" -c "import importlib.util as u; print('onnx' if u.find_spec('onnxruntime') else 'torchscript')")
  step export 120 "$PY" -m nin export "$WORK/d2l" --format "$fmt" --out "$WORK/d2l-model.$fmt"
  [ -e "$WORK/d2l-model.$fmt.json" ] && cp "$WORK/d2l-model.$fmt.json" "$OUT/export.json"
fi

finish
