#!/usr/bin/env bash
# Re-measure every figure in docs/performance.md on this machine (about 30 minutes on 2 CPU cores).
# Each command prints its settings, machine and date; nothing here is a pass/fail test.
set -euo pipefail
cd "$(dirname "$0")/.."
nin bench --baseline                                 # nin_d2l at 224, batch 128: fast path vs the seed's way
nin bench --model nin28 --ablate --repeats 5         # the default model, each speed switch flipped in turn
nin bench --ablate channels_last,fused --repeats 2  # the same for nin_d2l at 224 (bf16 and compile are slow to time here)
nin bench --time-to-accuracy --epochs 2              # default recipe, 2-minute budget
nin bench --time-to-accuracy --epochs 10             # default recipe, 10-minute budget
out="runs/perf-$(date +%Y%m%d-%H%M%S)"
/usr/bin/time -v nin train --out "$out" --quiet 2>&1 | grep -E "test acc|Maximum resident|Elapsed"
