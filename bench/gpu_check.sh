#!/usr/bin/env bash
# The cuda backend checked end to end: on a GPU host, or on a CPU under numba's CUDA simulator.
#
#   bash bench/gpu_check.sh              on a device (from the repository root); installs the gpu
#                                        and test extras first; writes bench/results/gpu_check.txt
#   bash bench/gpu_check.sh --simulate   the same checks on a CPU: kernels under the simulator,
#                                        the CuPy path on tests/cuda/fake_cupy.py (counting host
#                                        syncs and kernel launches); writes gpu_check_simulated.txt
#   bash bench/gpu_check.sh --compile    no device needed: every kernel compiled for sm_80 and sm_90
#                                        (numba-cuda + the pip toolkit's ptxas: the test extra),
#                                        kvgpu/kernels/cuda_build.py; writes gpu_compile.txt and
#                                        gpu_compile_sm80.json / _sm90.json; its last line is
#     gpu-compile: kernels K/K, max registers R, spill bytes S, stack bytes T, occupancy O%
#   options: --instances N (parity steps; default 32 simulated, 1000 on a device), --skip-tier (not
#   the CUDA tier's pytest run: tests/test_cuda_sim.py runs it by itself), --no-install
#
# Every step runs under its own `timeout` and its status is recorded; a failing step does not
# stop the others (no `set -e`).  The Python of the steps is bench/gpu_check.py.  The last line
# is always:
#   gpu-check: seed parity P/Q, search parity R/S, host syncs per solve_batch call H, kernel launches per call L
set -uo pipefail

SIMULATE=0
COMPILE=0
TIER=1
INSTANCES=""
INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --simulate) SIMULATE=1 ;;
    --compile) COMPILE=1 ;;
    --skip-tier) TIER=0 ;;
    --instances)
      if [ $# -lt 2 ] || ! [[ "$2" =~ ^[0-9]+$ ]]; then
        echo "gpu_check.sh: --instances needs a count (--simulate, --compile, --instances N, --skip-tier, --no-install)" >&2; exit 2
      fi
      INSTANCES="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    *) echo "gpu_check.sh: unknown option $1 (--simulate, --compile, --instances N, --skip-tier, --no-install)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$COMPILE" = 1 ]; then
  # both capabilities side by side, one process each (numba-cuda compiles a process's device
  # functions for one capability); each under its own timeout
  unset NUMBA_ENABLE_CUDASIM
  exec > >(tee "$OUT/gpu_compile.txt") 2>&1
  date -u
  rm -f "$OUT"/gpu_compile_sm*.json
  pids=()
  for cc in 8.0 9.0; do
    timeout --kill-after=10 1500 "$PY" -m kvgpu.kernels.cuda_build --cc "$cc" --json "$OUT/gpu_compile_sm${cc/./}.json" \
      > "$WORK/compile_$cc.txt" 2>&1 &
    pids+=($!)
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for cc in 8.0 9.0; do cat "$WORK/compile_$cc.txt"; done
  date -u
  "$PY" -m kvgpu.kernels.cuda_build --summary "$OUT/gpu_compile_sm80.json" "$OUT/gpu_compile_sm90.json"
  exit $rc
fi
COMMON=(--work "$WORK")
[ -n "$INSTANCES" ] && COMMON+=(--instances "$INSTANCES")
if [ "$SIMULATE" = 1 ]; then
  LOG="$OUT/gpu_check_simulated.txt"
  export NUMBA_ENABLE_CUDASIM=1
  COMMON+=(--simulate)
else
  LOG="$OUT/gpu_check.txt"
  unset NUMBA_ENABLE_CUDASIM KVGPU_DISABLE_GPU
fi
exec > >(tee "$LOG") 2>&1

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, record "NAME: ok|FAILED|TIMEOUT (s)"
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local took=$((SECONDS - t0)) word
  case $rc in
    0) word="ok" ;;
    124|137) word="TIMEOUT after ${limit}s" ;;
    *) word="FAILED (exit $rc)" ;;
  esac
  printf '%-26s %s (%ss)\n' "$name" "$word" "$took" >> "$WORK/status.txt"
  echo "-- $name: $word (${took}s)"
}

date -u
echo "mode: $([ "$SIMULATE" = 1 ] && echo "simulated (numba CUDA simulator, NumPy stand-in for CuPy)" || echo device)"
if [ "$SIMULATE" = 0 ]; then
  step "nvidia-smi" 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  [ "$INSTALL" = 1 ] && step "install gpu,test extras" 600 "$PY" -m pip install -q -e ".[gpu,test]"
fi
step "environment and probe" 120 "$PY" bench/gpu_check.py env "${COMMON[@]}"
step "probe kernel" 120 "$PY" bench/gpu_check.py probe "${COMMON[@]}"
# the CUDA tier: tests/cuda (kernels against the numba backend; under the simulator with the
# barrier checker and garbage-filled working memory), as pytest tests
if [ "$SIMULATE" = 1 ]; then
  [ "$TIER" = 1 ] && step "CUDA tier (pytest, simulator)" 3000 "$PY" -m pytest -q -p no:cacheprovider tests/cuda
else
  [ "$TIER" = 1 ] && step "CUDA tier (pytest, device)" 600 env KVGPU_CUDA_TIER=device "$PY" -m pytest -q \
    -p no:cacheprovider tests/cuda tests/test_backends.py
fi
step "seed parity" 1200 "$PY" bench/gpu_check.py seed "${COMMON[@]}"
step "search parity" 1200 "$PY" bench/gpu_check.py search "${COMMON[@]}"
if [ "$SIMULATE" = 0 ]; then
  # host syncs and launches are counted on the stand-in (real CuPy cannot be instrumented): the
  # same code path, seed and search mode, several small batches, under the simulator
  step "sync/launch counts, seed (sim)" 900 env NUMBA_ENABLE_CUDASIM=1 "$PY" bench/gpu_check.py seed --work "$WORK" \
    --simulate --instances 8 --save-as counts_seed
  step "sync/launch counts, search (sim)" 900 env NUMBA_ENABLE_CUDASIM=1 "$PY" bench/gpu_check.py search \
    --work "$WORK" --simulate --instances 8 --save-as counts_search
  step "timings" 600 "$PY" bench/gpu_check.py timings "${COMMON[@]}"
fi
date -u
echo "== summary"
"$PY" bench/gpu_check.py summary --work "$WORK" || {
  cat "$WORK/status.txt"
  echo "gpu-check: seed parity 0/0, search parity 0/0, host syncs per solve_batch call n/a, kernel launches per call n/a"
}
