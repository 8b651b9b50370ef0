#!/usr/bin/env bash
# The benchmarks, side by side: torch_dp against the plain module, the ideal and torch.nn.DataParallel (Python),
# against LibTorch's data_parallel (C++, CUDA builds of torch only), what SyncBatchNorm costs, and what finding an
# unchanged module tree costs (bench_dict_watch.py), and an AOTInductor package through torch_dp (bench_exported.py;
# its packages are compiled once per torch version into ~/.cache/torch_dp). Builds first
# (scripts/build.sh, benchmarks on). Writes the JSON of each run into OUTDIR (default build/bench).
#
#   bash scripts/bench.sh [--quick] [--device cpu|cuda] [--out OUTDIR]
# CI runs `bash scripts/bench.sh --quick` on the CPU; BENCHMARKS.md holds measured tables (machine and date).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=() device=() outdir=build/bench
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --device) device=(--device "$2"); shift ;;
    --out) outdir=$2; shift ;;
    *) echo "usage: bash scripts/bench.sh [--quick] [--device cpu|cuda] [--out OUTDIR]" >&2; exit 2 ;;
  esac
  shift
done
bash scripts/build.sh -DTORCH_DP_BUILD_BENCHMARKS=ON
mkdir -p "$outdir"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" benchmarks/bench_dp.py "${device[@]}" "${quick[@]}" --json "$outdir/bench_dp.json"
"$PYTHON" benchmarks/bench_refresh.py "${device[@]}" "${quick[@]}" --json "$outdir/bench_refresh.json"
"$PYTHON" benchmarks/bench_sync_bn.py "${device[@]}" "${quick[@]}" --json "$outdir/bench_sync_bn.json"
"$PYTHON" benchmarks/bench_dict_watch.py
"$PYTHON" benchmarks/bench_exported.py "${device[@]}" "${quick[@]}" --json "$outdir/bench_exported.json"
build/benchmarks/bench_cpp "${quick[@]}" --json "$outdir/bench_cpp.json"
