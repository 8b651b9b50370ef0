#!/usr/bin/env bash
# Configures and builds torch_dp once in build/: the library, the Catch2 tests, and the Python module placed in
# python/torch_dp/ so that `PYTHONPATH=python` imports it. Extra arguments go to the CMake configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure_deps.sh
PYTHON=${PYTHON:-python3}
cmake -S . -B build -G Ninja \
  -DTORCH_DP_BUILD_TESTS=ON \
  -DTORCH_DP_BUILD_PYTHON=ON \
  -DTORCH_DP_PYTHON_OUTPUT_DIR="$PWD/python/torch_dp" \
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
  "$@" >/dev/null
cmake --build build
