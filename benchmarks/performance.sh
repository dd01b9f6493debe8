#!/usr/bin/env bash
# Re-measure the figures of docs/performance.md on this machine and keep them as records in benchmarks/results/
# (one JSON file per run, with the machine's fingerprint from nin doctor), then re-render the page.
# About 15 minutes on a 2-core bf16 CPU, 30 on a 2-core CPU without native bf16. Nothing here is pass/fail.
#
#   bash benchmarks/performance.sh            # everything
#   bash benchmarks/performance.sh --quick    # the nin_d2l headline and the 2-epoch time to accuracy only
set -euo pipefail
cd "$(dirname "$0")/.."
rec=(--record benchmarks/results)
nin doctor                                                  # the machine kind every record below names
nin bench --baseline --repeats 5 "${rec[@]}"               # nin_d2l at 224, batch 128: fast path vs the seed's way
nin bench --time-to-accuracy --epochs 2 "${rec[@]}"        # default recipe, 2-minute budget
if [ "${1:-}" != "--quick" ]; then
  nin bench --model nin28 --ablate --repeats 5 "${rec[@]}"  # the default model, each speed switch flipped in turn
  nin bench --time-to-accuracy --epochs 10 "${rec[@]}"     # default recipe, 10-minute budget
  out="runs/perf-$(date +%Y%m%d-%H%M%S)"
  /usr/bin/time -v nin train --out "$out" --quiet 2>&1 | grep -E "test acc|Maximum resident|Elapsed"
fi
python3 benchmarks/render_performance.py
