#!/usr/bin/env bash
# The GPU check: one command for a GPU machine. Builds torch_dp there against that machine's torch, exports the
# models the PackageDataParallel tests load (CPU and CUDA), runs the C++ tests (CUDA ones included), the Python tests including the parity suite against torch.nn.DataParallel,
# compute-sanitizer over the CUDA C++ tests, the benchmarks, DDP over NCCL with torch_dp inside
# (examples/python/ddp.py), the SyncBatchNorm benchmark and profiles of a small and a large forward, in that
# order (most wanted first). Logs and JSON go to OUTDIR/logs (the first argument, else $OUT, else
# ./gpu_check_out; packed into OUTDIR/logs.tgz under $OUT, whose files come back few), OUTDIR/summary.json holds
# the table, which is printed last, after the end of each failed step's log. The whole run keeps within
# GPU_CHECK_BUDGET seconds (default 540): each step's limit is cut to what is left, and steps with no time left
# are reported as such.
#
#   bash scripts/gpu_check.sh [OUTDIR]
#   GPU_CHECK_SKIP=memcheck,racecheck bash scripts/gpu_check.sh   # leave steps out
#   GPU_CHECK_EXTRA=bench_criterion bash scripts/gpu_check.sh       # add optional steps (named below)
#
# Optional steps, run only when GPU_CHECK_EXTRA names them (after pytest, before the other benchmarks):
#   bench_criterion  peak memory per device and step time of a language-model step with torch_dp.ParallelCriterion
#                    against the gathered loss and torch.nn.DataParallel ([0, 0], [0, 0, 0, 0]; about 60 s)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
outdir=${1:-${OUT:-$root/gpu_check_out}}
logs=$outdir/logs
mkdir -p "$logs"
PYTHON=${PYTHON:-python3}
skip=",${GPU_CHECK_SKIP:-},"
extra=",${GPU_CHECK_EXTRA:-},"
export PYTHONUNBUFFERED=1
jobs=$(nproc 2>/dev/null || echo 4)
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
results=()   # "name|status|seconds|detail"

step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, its output in logs/NAME.log
  local name=$1 limit=$2
  shift 2
  if [[ $skip == *",$name,"* ]]; then
    results+=("$name|skipped|0|GPU_CHECK_SKIP")
    return 0
  fi
  local left=$((deadline - SECONDS - 20))  # 20 s kept for the summary
  if [ $left -lt 10 ]; then
    results+=("$name|no-time|0|GPU_CHECK_BUDGET spent")
    return 1
  fi
  [ $limit -gt $left ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 0 ] || status="FAILED(rc=$rc)"
  [ $rc -eq 124 ] && status="TIMEOUT(${limit}s)"
  results+=("$name|$status|$((SECONDS - start))|$(tail -n 1 "$logs/$name.log" | cut -c1-90)")
  return $rc
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
} >"$logs/machine.txt" 2>&1

torch_prefix=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
source scripts/lib/cuda_cmake_args.sh
echo "cuda args: ${cuda_args[*]:-none}" >>"$logs/machine.txt"
step configure 240 cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda_args[@]}" \
  -DTORCH_DP_BUILD_TESTS=ON -DTORCH_DP_BUILD_PYTHON=ON -DTORCH_DP_BUILD_BENCHMARKS=ON \
  -DTORCH_DP_PYTHON_OUTPUT_DIR="$root/python/torch_dp" -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
  -DCMAKE_PREFIX_PATH="$torch_prefix"
step build 300 cmake --build build-gpu -j "$jobs"
built=$?
tests_bin=build-gpu/tests/cpp/torch_dp_tests
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"

if [ $built -eq 0 ]; then
  # The models the PackageDataParallel tests load ([package] in ctest, test_package_data_parallel.py), written by
  # examples/python/export_model.py for the CPU and for CUDA; without them those tests fail, saying so.
  export TORCH_DP_EXPORTED_DIR="$root/build-gpu/exported" TORCH_DP_EXPORTED_CUDA_DIR="$root/build-gpu/exported-cuda"
  step export_models 180 bash -c '"$0" examples/python/export_model.py "$TORCH_DP_EXPORTED_DIR" &&
    "$0" examples/python/export_model.py "$TORCH_DP_EXPORTED_CUDA_DIR" --device cuda' "$PYTHON"
  step ctest 120 ctest --test-dir build-gpu --output-on-failure
  # pytest-xdist, where installed, spreads the tests over a few processes (a crash then fails one test, not the run).
  xdist=()
  "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 4 --dist load --max-worker-restart 50)
  step pytest 240 "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -m "not slow" -rfEs "${xdist[@]}" \
    --junitxml="$logs/pytest.xml"
  if [[ $extra == *",bench_criterion,"* ]]; then  # optional: GPU_CHECK_EXTRA=bench_criterion
    step bench_criterion 180 "$PYTHON" benchmarks/bench_criterion.py --device cuda --quick \
      --json "$logs/bench_criterion.json"
  fi
  # What refreshing replicas' copies on every forward costs, next to trust_version_counters and nn.DataParallel.
  step bench_refresh 120 "$PYTHON" benchmarks/bench_refresh.py --device cuda --quick --json "$logs/bench_refresh.json"
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
  if [ -n "$sanitizer" ]; then
    step memcheck 150 "$sanitizer" --tool memcheck --error-exitcode 1 "$tests_bin" "[cuda]"
    step racecheck 150 "$sanitizer" --tool racecheck --error-exitcode 1 "$tests_bin" "[cuda]"
  else
    results+=("memcheck|skipped|0|no compute-sanitizer" "racecheck|skipped|0|no compute-sanitizer")
  fi
  step bench_py 240 "$PYTHON" benchmarks/bench_dp.py --device cuda --quick --json "$logs/bench_py.json"
  if [ -x build-gpu/benchmarks/bench_cpp ]; then
    step bench_cpp 200 build-gpu/benchmarks/bench_cpp --devices 0,0 --json "$logs/bench_cpp_2.json"
    step bench_cpp4 200 build-gpu/benchmarks/bench_cpp --devices 0,0,0,0 --json "$logs/bench_cpp_4.json"
  else
    results+=("bench_cpp|skipped|0|not built")
  fi
  # DDP over NCCL with torch_dp inside: one process, two replicas on GPU 0 (examples/python/ddp.py).
  step ddp_nccl 120 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 examples/python/ddp.py \
    --device cuda --replicas 2 --epochs 2
  step bench_sync_bn 120 "$PYTHON" benchmarks/bench_sync_bn.py --device cuda --quick --json "$logs/bench_sync_bn.json"
  # Where the time goes against the ideal: Linear(5, 2) on [0, 0] and ResNet-50 on [0, 0, 0, 0] (their targets
  # are in BENCHMARKS.md): wall clock, profiler totals and a table.
  step profile 90 "$PYTHON" benchmarks/profile_forward.py --device cuda --model tiny --replicas 2
  if "$PYTHON" -c "import torchvision" 2>/dev/null; then
    step profile_resnet 120 "$PYTHON" benchmarks/profile_forward.py --device cuda --model resnet50 --replicas 4 \
      --iters 30
  fi
fi

# The end of each failed step's log, then summary.json and the table.
for row in "${results[@]}"; do
  case "$row" in
    *"|FAILED"*|*"|TIMEOUT"*)
      name=${row%%|*}
      echo "==== $name (last lines of logs/$name.log) ===="
      tail -n 30 "$logs/$name.log" | cut -c1-300
      ;;
  esac
done
# summary.json and the table
"$PYTHON" - "$outdir" "${results[@]}" <<'PY'
import json, sys
outdir, rows = sys.argv[1], [r.split("|", 3) for r in sys.argv[2:]]
summary = {"machine": open(f"{outdir}/logs/machine.txt").read().strip().splitlines(),
           "steps": [{"name": n, "status": s, "seconds": int(t), "last_line": d} for n, s, t, d in rows]}
json.dump(summary, open(f"{outdir}/summary.json", "w"), indent=2)
print("\n".join(summary["machine"]))
print(f"{'step':<12} {'status':<16} {'s':>5}  last line")
for n, s, t, d in rows:
    print(f"{n:<12} {s:<16} {t:>5}  {d}")
PY
if [ -n "${OUT:-}" ] && [ "$outdir" = "$OUT" ]; then
  # Only a few files come back from $OUT: pack the logs into one.
  tar -czf "$outdir/logs.tgz" -C "$outdir" logs && rm -rf "$logs"
fi
for row in "${results[@]}"; do
  case "$row" in *"|FAILED"*|*"|TIMEOUT"*|*"|no-time"*) exit 1 ;; esac
done
exit 0
