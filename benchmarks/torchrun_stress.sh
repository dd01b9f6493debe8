#!/usr/bin/env bash
# N back-to-back 2-process torchrun runs of the command tests/test_distributed.py uses, to catch a rare
# failure of one of them (a worker lost to SIGABRT at exit: "terminate called without an active exception").
# Each run trains in a fresh temporary --out directory, removed afterwards; each run's exit status, wall time
# and, for a failure, the last lines of its stderr are recorded.
#
#   bash benchmarks/torchrun_stress.sh [--load] [N] [OUT_JSON]        (default N=30)
#
#   --load     keep every core busy with a background loop meanwhile (killed on exit): the failure was
#              first seen on a busy machine
#   OUT_JSON   default: benchmarks/results/torchrun-stress-<machine-kind>-<YYYYMMDD-HHMMSS>.json
#
# Prints "torchrun stress: K of N runs exited 0"; exits 0 only when all N did.
# NIN_STRESS_TIMEOUT (seconds, default 180) bounds one run; a run past it counts as failed (status 124).
set -uo pipefail
cd "$(dirname "$0")/.."

load=0
if [[ "${1:-}" == "--load" ]]; then load=1; shift; fi
n=${1:-30}
out_json=${2:-}
per_run_timeout=${NIN_STRESS_TIMEOUT:-180}
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash benchmarks/torchrun_stress.sh [--load] [N] [OUT_JSON]" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/nin-torchrun-stress.XXXXXX")
loaders=()
cleanup() {
  local pid
  for pid in "${loaders[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${loaders[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if (( load )); then
  for _ in $(seq "$(nproc)"); do
    ( trap - EXIT INT TERM; while :; do :; done ) &
    loaders+=("$!")
  done
fi

cmd=(python3 -m torch.distributed.run --standalone --nproc-per-node=2 -m nin train
     --subset 256 --test-subset 200 --epochs 2 --no-batch-norm --lr 0.02 --schedule constant --seed 3
     --device cpu --quiet --batch-size 32 --checkpoint-every 3 --keep-last 0)
echo "torchrun stress: $n run(s)$( ((load)) && echo ", with $(nproc) busy loop(s)"): ${cmd[*]} --out DIR"

runs="$work/runs.jsonl"
: > "$runs"
passed=0
for i in $(seq "$n"); do
  dir=$(mktemp -d "$work/run-$i.XXXXXX")
  start=$(date +%s.%N)
  OMP_NUM_THREADS=1 timeout -k 10 "$per_run_timeout" "${cmd[@]}" --out "$dir/out" > "$dir/stdout" 2> "$dir/stderr"
  rc=$?
  end=$(date +%s.%N)
  (( rc == 0 )) && passed=$((passed + 1))
  python3 - "$i" "$rc" "$start" "$end" "$dir/stderr" >> "$runs" <<'PY'
import json, re, sys
i, rc, start, end, err = sys.argv[1:]
text = open(err, errors="replace").read()
lines = text.splitlines()
rec = {"run": int(i), "exit": int(rc), "seconds": round(float(end) - float(start), 2),
       "abort": "terminate called" in text or "exitcode  : -6" in text,
       "worker_exitcodes": [int(c) for c in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", text, re.M)]}
if int(rc) != 0 or rec["abort"]:
    # the workers' own last words come first (torchrun's traceback and failure table follow them)
    agent = next((k for k, line in enumerate(lines) if line.startswith("Traceback") and k + 3 < len(lines)
                  and "torch/distributed/run.py" in "".join(lines[k:k + 6])), len(lines))
    rec["stderr_workers"] = lines[:agent][-15:]
    rec["stderr_tail"] = lines[-15:]
print(json.dumps(rec))
PY
  printf '  run %3d: exit %3d  %6.1f s\n' "$i" "$rc" "$(awk "BEGIN{print $end - $start}")"
  if (( rc != 0 )); then
    grep -v '^\s*File \|^\s*\^\|^\s*raise \|^[WE][0-9]\{4\} ' "$dir/stderr" \
      | grep -m 12 'terminate\|Fatal\|rror\|rank  \|exitcode' | sed 's/^/      | /'
  fi
  rm -rf "$dir"
done

doctor="$work/doctor.json"
python3 -m nin doctor --json --no-measure > "$doctor" 2> /dev/null || : > "$doctor"
python3 - "$runs" "$doctor" "$n" "$passed" "$load" "$out_json" "${cmd[*]} --out DIR" <<'PY'
import datetime, json, os, platform, re, subprocess, sys
runs_file, doctor_file, n, passed, load, out_json, command = sys.argv[1:]
import torch
import nin

runs = [json.loads(line) for line in open(runs_file)]
machine = {"cores": os.cpu_count(), "platform": platform.platform()}
kind_name = None
try:
    kind = json.load(open(doctor_file)).get("kind")
except (ValueError, AttributeError):
    kind = None
if kind is not None:
    machine["kind"] = kind
    if isinstance(kind, dict):
        kind_name = next((kind[k] for k in ("slug", "name", "id", "label") if isinstance(kind.get(k), str)), None)
    elif isinstance(kind, str):
        kind_name = kind
else:
    cpuinfo = open("/proc/cpuinfo").read()
    m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    machine["cpu"] = m.group(1).strip() if m else platform.processor()
    machine["avx512_bf16"] = "avx512_bf16" in cpuinfo
    kind_name = f"cpu{os.cpu_count()}" + ("-avx512bf16" if machine["avx512_bf16"] else "")
slug = re.sub(r"[^A-Za-z0-9.]+", "-", kind_name or "unknown").strip("-").lower()
now = datetime.datetime.now()
path = out_json or f"benchmarks/results/torchrun-stress-{slug}-{now:%Y%m%d-%H%M%S}.json"
os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
record = {"benchmark": "torchrun_stress", "date": now.isoformat(timespec="seconds"), "torch": torch.__version__,
          "python": platform.python_version(), "nin": os.path.dirname(nin.__file__), "machine": machine, "load": bool(int(load)), "command": command,
          "runs_total": int(n), "runs_passed": int(passed), "aborts": sum(r["abort"] for r in runs),
          "seconds_total": round(sum(r["seconds"] for r in runs), 1), "runs": runs}
try:
    record["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
with open(path, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
print(f"record: {path}")
PY
echo "torchrun stress: $passed of $n runs exited 0"
(( passed == n ))
