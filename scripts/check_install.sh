#!/usr/bin/env bash
# Checks the installed C++ package: installs the build made by scripts/build.sh (build/, or $BUILD_DIR) into a
# fresh prefix, configures examples/cpp as a standalone project against it (find_package(TorchDP)), builds the
# examples and runs them for a few epochs (each exits non-zero if its loss did not go down), then serves the models
# export_model.py wrote with serve_exported (non-zero if they differ from the unwrapped model).
# Extra arguments go to the examples (e.g. --replicas 2 --cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
PYTHON=${PYTHON:-python3}
if [[ ! -f "$BUILD_DIR/cmake_install.cmake" ]]; then
  echo "check_install: $BUILD_DIR is not a configured build; run scripts/build.sh first" >&2
  exit 1
fi
# Under the build folder, so the examples' build is kept between runs (and ccache hits); the install prefix is
# made anew every time, so what the examples find is only what `cmake --install` put there.
work="$PWD/$BUILD_DIR/check-install"
prefix="$work/install"
rm -rf "$prefix"
cmake --install "$BUILD_DIR" --prefix "$prefix" >/dev/null
torch_prefix=$("$PYTHON" -c "import torch; print(torch.utils.cmake_prefix_path)")
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake -S examples/cpp -B "$work/examples" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix;$torch_prefix" \
  "${launcher[@]}" >/dev/null
cmake --build "$work/examples"
# The examples must use the installed library, not the one in the build tree.
for example in train_mlp train_convnet serve_exported; do
  lib=$(ldd "$work/examples/$example" | awk '/libtorch_dp/ {print $3}')
  if [[ "$lib" != "$prefix"/* ]]; then
    echo "check_install: $example loads libtorch_dp from '$lib', not from $prefix" >&2
    exit 1
  fi
done
"$work/examples/train_mlp" --epochs 5 "$@"
"$work/examples/train_convnet" --epochs 5 "$@"
# Models exported from Python (examples/python/export_model.py), served over two CPU replicas and compared with the
# unwrapped model: the AOTInductor package and the TorchScript file.
source scripts/lib/ensure_exported.sh
"$work/examples/serve_exported" "$TORCH_DP_EXPORTED_DIR/model.pt2" cpu cpu
"$work/examples/serve_exported" "$TORCH_DP_EXPORTED_DIR/model.pt" cpu cpu
echo "check_install: the installed package builds and runs the examples"
