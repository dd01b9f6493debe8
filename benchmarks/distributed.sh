#!/usr/bin/env bash
# Training throughput of nin train with 1 process and with N processes under torchrun, on this machine.
# On CPUs each process gets cores/N threads (gloo); on a machine with N GPUs, one process per GPU (NCCL).
# Prints images/sec of the last epoch for each, read from the runs' metrics.jsonl.
#
#   bash benchmarks/distributed.sh [N] [extra nin train flags]     (default N=2)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2}; shift || true
cores=$(nproc)
common=(--subset 15360 --test-subset 1000 --epochs 2 --batch-size 128 --quiet "$@")
root="runs/bench-ddp-$(date +%Y%m%d-%H%M%S)"
echo "machine: $(nproc) cores, $(python3 -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'), $(date -Is)"
echo "nin train ${common[*]}"
nin train "${common[@]}" --threads "$cores" --out "$root/one" > /dev/null
OMP_NUM_THREADS=$(( cores / n > 0 ? cores / n : 1 )) python3 -m torch.distributed.run --standalone \
  --nproc-per-node "$n" -m nin train "${common[@]}" --batch-size $(( 128 / n )) --out "$root/many" > /dev/null 2>&1
for r in one many; do
  python3 - "$root/$r" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
env = json.load(open(f"{sys.argv[1]}/config.json"))["env"]
last = rows[-1]
print(f"{env['processes']} process(es) x {env['threads']} thread(s): {last['examples_per_sec']:,.0f} img/s "
      f"(last epoch), test acc {last['test_acc']:.4f}")
PY
done
