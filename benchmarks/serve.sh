#!/usr/bin/env bash
# nin serve under load and soaked (issue 21), kept as records in benchmarks/results/ (one JSON file each, with the
# machine's fingerprint from nin doctor), then docs/performance.md re-rendered. Run it on a quiet machine: other
# jobs on the cores change every figure. The load benchmark is not pass/fail; the soak exits 1 on any failure.
# About 10 minutes on a 2-core CPU (training the short run included).
#
#   bash benchmarks/serve.sh           # trains a short nin28 run (1 epoch, 4,096 images), then both
#   bash benchmarks/serve.sh RUN       # a trained run of yours (its ONNX export is written as RUN/serve-load.onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
rec=(--record benchmarks/results)
nin doctor --no-measure | head -3                          # the machine kind every record below names
run="${1:-}"
if [ -z "$run" ]; then
  run="$(mktemp -d)/run"
  nin train --epochs 1 --subset 4096 --quiet --out "$run"
fi
python3 benchmarks/serve_load.py "$run" "${rec[@]}"        # 1, 8, 32 clients; batching on/off; torch and ONNX
soak=0
python3 benchmarks/serve_soak.py "$run" "${rec[@]}" || soak=$?  # 10,000 mixed requests, every answer checked
python3 benchmarks/render_performance.py
exit "$soak"                                               # a failed soak is kept as a record, then fails here
