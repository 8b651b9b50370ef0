#!/usr/bin/env bash
# Builds the wheel with `pip wheel --no-build-isolation .`, installs it into a new virtualenv that has only
# the same torch, and runs the seed demo there, outside the source tree. Then, as a LibTorch user would, builds
# examples/cpp against the C++ package inside the installed wheel (find_package(TorchDP) through
# torch_dp.cmake_prefix_path) and runs one example briefly on CPU replicas.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/ensure_deps.sh
PYTHON=${PYTHON:-python3}
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/torch_dp-*.whl)
echo "check_wheel: built $(basename "$wheel")"
"$PYTHON" -m venv "$work/venv"
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
"$work/venv/bin/python" -m pip install -q "torch==$torch_version"
"$work/venv/bin/python" -m pip install -q "$wheel"
cd "$work"
"$work/venv/bin/python" "$root/examples/python/tutorial.py" --device cpu --replicas 3 > "$work/demo.log"
grep -c "In Model: input size torch.Size(\[10, 5\])" "$work/demo.log" >/dev/null
tail -n 2 "$work/demo.log"
echo "check_wheel: the wheel installs in a fresh virtualenv and runs the demo"

# The C++ package in the wheel, found the way README.md's C++ section says. Paths under $work are rewritten
# relative to it by ccache (CCACHE_BASEDIR), so the venv's new path each run still hits the cache.
start=$SECONDS
venv_python="$work/venv/bin/python"
prefix_path=$("$venv_python" -c 'import torch, torch_dp; print(torch_dp.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path)')
package=$("$venv_python" -c 'import os, torch_dp; print(os.path.dirname(torch_dp.__file__))')
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="$work"
fi
generator=()
if command -v ninja >/dev/null; then
  generator=(-G Ninja)
fi
cmake -S "$root/examples/cpp" -B "$work/examples" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix_path" "${launcher[@]}" >"$work/examples.log" 2>&1 || {
  cat "$work/examples.log" >&2
  exit 1
}
cmake --build "$work/examples" --target train_mlp >>"$work/examples.log" 2>&1 || {
  cat "$work/examples.log" >&2
  exit 1
}
lib=$(ldd "$work/examples/train_mlp" | awk '/libtorch_dp/ {print $3}')
if [[ "$(readlink -f "$lib")" != "$(readlink -f "$package")"/* ]]; then
  echo "check_wheel: train_mlp loads libtorch_dp from '$lib', not from the wheel's $package" >&2
  exit 1
fi
"$work/examples/train_mlp" --cpu --replicas 2 --epochs 2 | tail -n 1
echo "check_wheel: examples/cpp builds against the installed wheel's C++ package and runs ($((SECONDS - start)) s)"
