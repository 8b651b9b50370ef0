#!/usr/bin/env bash
# The C++ tests under sanitizers (CI runs this after scripts/test.sh):
#
#   1. build-asan/: the library and every Catch2 test with AddressSanitizer + UndefinedBehaviorSanitizer
#      (-DTORCH_DP_SANITIZE=ON), and a run of all of them.
#   2. build-tsan/: the library and the worker pool's tests with ThreadSanitizer (-DTORCH_DP_TSAN=ON), and a
#      run of them: test_parallel_apply.cpp (the pool itself: nested runs, two threads on one pool, exceptions,
#      thread-local state), test_data_parallel*.cpp and test_script_data_parallel.cpp (the C++ modules, whose
#      replicas run on the pool).
#
# Both builds are separate from build/ and use -O1 -g1 (fast enough to build, line numbers in reports). libtorch
# itself is not instrumented: the sanitizers check torch_dp's code and the test code, and see libtorch only
# through the allocator and pthread calls they intercept. ~8 minutes on 2 cores from cold (ccache makes
# reruns quick); each test run takes seconds.
#
#   bash scripts/sanitize.sh          # both
#   bash scripts/sanitize.sh asan     # or only one
#   bash scripts/sanitize.sh tsan
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure_deps.sh
root=$PWD
which=${1:-all}
jobs=$(nproc 2>/dev/null || echo 2)

configure_and_build() {  # configure_and_build DIR TARGET CMAKE_OPTIONS...
  local dir=$1 target=$2
  shift 2
  cmake -S . -B "$dir" -G Ninja \
    -DTORCH_DP_BUILD_TESTS=ON \
    -DTORCH_DP_BUILD_PYTHON=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1" \
    "$@" >/dev/null
  cmake --build "$dir" -j "$jobs" --target "$target"
}

if [[ $which == all || $which == asan ]]; then
  start=$SECONDS
  echo "sanitize: AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan)"
  configure_and_build build-asan torch_dp_tests -DTORCH_DP_SANITIZE=ON -DTORCH_DP_TSAN=OFF
  # ASAN_OPTIONS:
  #   detect_leaks=1                 LeakSanitizer at exit. libtorch's own allocations are still reachable from
  #                                  its globals at exit, so no leak suppression has been needed.
  #   detect_stack_use_after_return  catches a task that keeps a reference to its caller's stack frame (a
  #                                  worker running after run() returned); costs some speed, which is fine here.
  #   check_initialization_order, strict_init_order   static initialisation order problems across libraries.
  #   detect_odr_violation=2         one definition rule violations between libtorch_dp and the tests.
  # No option turns a check off, with one exception below: the tests that load AOTInductor packages (tagged
  # [package]: PackageDataParallel's, and the contract over every front-end) run in a second process without
  # LeakSanitizer. LSan's exit-time scan crashes there ("Tracer caught signal 11" while
  # it walks the main thread's dynamic TLS) once a process has loaded and unloaded a few AOTInductor model
  # libraries (dlopen/dlclose, one per loader): its tracer reads the TLS block of a library already unloaded.
  # It happens with those tests alone, after every test passed, and with no torch_dp code on the stack; the
  # address and undefined-behaviour checks still run on them.
  asan_options=detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:detect_odr_violation=2
  export ASAN_OPTIONS=detect_leaks=1:$asan_options
  # UBSAN_OPTIONS: a stack for every report; the build already makes every UB check fatal
  # (-fno-sanitize-recover=undefined in CMakeLists.txt), so a report fails the run.
  export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  # The package the PackageDataParallel tests load ([package]; examples/python/export_model.py, cached).
  source scripts/lib/ensure_exported.sh cpu
  build-asan/tests/cpp/torch_dp_tests "~[package]" --order rand --rng-seed 20261128
  ASAN_OPTIONS=detect_leaks=0:$asan_options build-asan/tests/cpp/torch_dp_tests "[package]" --order rand \
    --rng-seed 20261128
  unset ASAN_OPTIONS UBSAN_OPTIONS
  echo "sanitize: ASan+UBSan passed in $((SECONDS - start)) s (build and run)"
fi

if [[ $which == all || $which == tsan ]]; then
  start=$SECONDS
  echo "sanitize: ThreadSanitizer build (build-tsan)"
  configure_and_build build-tsan torch_dp_tsan_tests -DTORCH_DP_TSAN=ON -DTORCH_DP_SANITIZE=OFF
  # TSAN_OPTIONS:
  #   suppressions=scripts/lib/tsan.supp  false reports inside uninstrumented libtorch, one commented entry each.
  #   second_deadlock_stack=1         both stacks in lock-order reports.
  #   exitcode=66 (the default)       any report fails the run, after every test ran, so all reports show.
  # OMP_NUM_THREADS=1: libtorch's intra-op parallelism (OpenMP, libgomp) synchronises its threads with raw
  # futexes that TSan cannot see, so every parallel kernel would be reported (memory allocated on one thread
  # and filled by an OpenMP thread). With one OpenMP thread, kernels run on the calling thread and the only
  # concurrency left is torch_dp's: the callers and the pool's workers, which is what this run checks.
  export TSAN_OPTIONS="suppressions=$root/scripts/lib/tsan.supp second_deadlock_stack=1"
  export OMP_NUM_THREADS=1
  log=$(mktemp)
  status=0
  build-tsan/tests/cpp/torch_dp_tsan_tests --order rand --rng-seed 20261128 >"$log" 2>&1 || status=$?
  if grep -q "unexpected memory mapping" "$log"; then
    # TSan of some GCC versions cannot map its shadow memory under the high ASLR entropy of recent kernels
    # (vm.mmap_rnd_bits=32); without address randomisation it can.
    echo "sanitize: TSan could not map its shadow memory; rerunning without ASLR (setarch -R)"
    status=0
    setarch "$(uname -m)" -R build-tsan/tests/cpp/torch_dp_tsan_tests --order rand --rng-seed 20261128 \
      >"$log" 2>&1 || status=$?
  fi
  cat "$log"
  rm -f "$log"
  unset TSAN_OPTIONS OMP_NUM_THREADS
  if [ $status -ne 0 ]; then
    echo "sanitize: ThreadSanitizer run failed (exit $status)" >&2
    exit $status
  fi
  echo "sanitize: TSan passed in $((SECONDS - start)) s (build and run)"
fi
