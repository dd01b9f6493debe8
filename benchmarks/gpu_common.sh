# Shared by the GPU scripts (gpu.sh, gpu_accuracy.sh); sourced, never run. The caller sets NAME (its own name)
# and DRY (1 for --dry-run), and is in the checkout's root. This sets OUT, PY, LOG, WORK (a scratch folder removed
# on exit) and NIN_DATA_DIR where the checkout carries the data, refuses a machine without CUDA unless DRY, and
# defines step (run one step under a time limit) and finish (pack $OUT and say what failed).
OUT=${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${NIN_DATA_DIR:-}" ] && [ -e .data/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  export NIN_DATA_DIR="$PWD/.data/fashion-mnist"
fi

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "$NAME: no CUDA GPU here ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1));" \
       "nothing to measure. --dry-run runs the same steps on the CPU at toy sizes." >&2
  exit 2
fi
mkdir -p "$OUT/records" || exit 2
LOG="$OUT/${NAME%.sh}.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nin-gpu-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, remember a failure, return its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( SECONDS - t0 )) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
  return "$rc"
}

finish() {  # pack $OUT, then exit 1 if a step failed
  tar -czf "$OUT/gpu-out.tar.gz" -C "$OUT" --exclude gpu-out.tar.gz . 2>> "$LOG"
  if [ ${#failed[@]} -gt 0 ]; then
    for f in "${failed[@]}"; do echo "$NAME: failed: $f"; done | tee -a "$LOG" >&2
    exit 1
  fi
  echo "$NAME: every step passed; results in $OUT" | tee -a "$LOG"
}
