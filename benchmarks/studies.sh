#!/usr/bin/env bash
# Run the built-in studies at a budget and copy each report (report.md, figures, configs, study.json,
# results.jsonl; no checkpoints) into docs/experiments/NAME/. A study already finished in
# runs/study-NAME-BUDGET is not retrained: its recorded runs are reused.
#
#   bash benchmarks/studies.sh                 # every study, cpu budget
#   bash benchmarks/studies.sh lr head         # some of them
#   BUDGET=full bash benchmarks/studies.sh     # the seed's settings, on a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-cpu}
studies=("$@")
[ ${#studies[@]} -eq 0 ] && studies=(lr mlp-layers head regularization init)
for s in "${studies[@]}"; do
  out="runs/study-$s-$BUDGET"
  start=$(date +%s)
  nin study "$s" --budget "$BUDGET" --out "$out"
  echo "== $s: $(( $(date +%s) - start )) s wall"
  dest="docs/experiments/$s${BUDGET/#cpu/}"
  [ "$BUDGET" != cpu ] && dest="docs/experiments/$s-$BUDGET"
  rm -rf "$dest" && mkdir -p "$dest"
  cp -r "$out"/report.md "$out"/curves.png "$out"/sweep.png "$out"/study.json "$out"/results.jsonl "$out"/configs "$dest"/
done
