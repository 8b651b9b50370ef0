#!/usr/bin/env bash
# The Python suite (pytest -m "not slow") on another Python than scripts/test.sh's python3. CI runs it for 3.13:
#
#   bash scripts/test_python_version.sh 3.13 [PYTEST_ARGS...]
#
# - The interpreter: pyenv's newest VERSION.x, else pythonVERSION on PATH.
# - Its own virtualenv, kept between runs outside the checkout (CI builds a fresh clone):
#   ${TORCH_DP_VENVS:-~/.cache/torch_dp}/venv-pyVERSION, filled by scripts/lib/ensure_deps.sh (torch==2.13.0, pytest,
#   hypothesis, transformers, accelerate). PyPI has no CPU build of torch for Linux, so this venv holds the CUDA
#   build (about 4.7 GB, downloaded once); it runs on the CPU, and its CMake package needs the CUDA toolkit (nvcc).
# - Its own build folder, build-pyVERSION/ (e.g. build-py313/): the library and torch_dp._C only, no C++ tests,
#   examples or sanitizers; ccache is shared with the other builds.
# - The tests run in a copy of what they read (pyproject.toml, python/torch_dp, tests/python, examples/python,
#   benchmarks/*.py, and python/csrc/bindings.cpp, where tests/python/test_stub.py finds the test-only hooks) in
#   build-pyVERSION/tree/, into which the build puts _C, libtorch_dp.so and _build_info.py: python/torch_dp/ holds
#   python3's build (same file names but _C's), and some tests start the examples with <checkout>/python first on
#   PYTHONPATH.
# TORCH_DP_BUILD_LOCK=FILE holds that lock file (flock) while configuring and building, for machines where
# several checkouts build at once.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
version=${1:?usage: bash scripts/test_python_version.sh VERSION [PYTEST_ARGS...]}
shift
start=$SECONDS
tag=py${version//./}

python=""
if command -v pyenv >/dev/null 2>&1; then
  python=$( (ls -d "$(pyenv root)/versions/$version".*/bin/"python$version" 2>/dev/null || true) | sort -V | tail -n 1)
fi
if [ -z "$python" ] && "python$version" --version >/dev/null 2>&1; then
  python=$(command -v "python$version")
fi
if [ -z "$python" ]; then
  echo "test_python_version: no Python $version here (pyenv install $version)" >&2
  exit 1
fi

venv=${TORCH_DP_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_dp}/venv-$tag
if ! "$venv/bin/python" -c "" >/dev/null 2>&1; then
  echo "test_python_version: new virtualenv $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
PYTHON=$venv/bin/python
source scripts/lib/ensure_deps.sh
torch_info=$("$PYTHON" -c "import torch; print(torch.__version__, torch.utils.cmake_prefix_path, torch.version.cuda or '')")
read -r torch_version torch_prefix torch_cuda <<<"$torch_info"
echo "test_python_version: Python $("$PYTHON" -c 'import platform; print(platform.python_version())'), torch $torch_version"

cuda_args=()
if [ -n "$torch_cuda" ]; then
  source scripts/lib/cuda_cmake_args.sh
fi

build=build-$tag
tree=$build/tree
package=$tree/python/torch_dp
rm -rf "$tree/tests" "$tree/examples" "$tree/benchmarks" "$tree/python/csrc"
mkdir -p "$package" "$tree/tests" "$tree/examples" "$tree/benchmarks" "$tree/python/csrc"
cp pyproject.toml "$tree/"
cp benchmarks/*.py "$tree/benchmarks/"  # test_overhead.py runs the steps overhead_callgrind.py measures
cp python/csrc/bindings.cpp "$tree/python/csrc/"
cp -r tests/python "$tree/tests/"
cp -r examples/python "$tree/examples/"
find "$package" -maxdepth 1 -type f ! -name "_build_info.py" ! -name "*.so*" -delete  # sources removed since
for file in python/torch_dp/*; do
  case ${file##*/} in
    _build_info.py | *.so* | __pycache__) ;;  # python3's build
    *) cp -r "$file" "$package/" ;;
  esac
done

lock=()
[ -n "${TORCH_DP_BUILD_LOCK:-}" ] && lock=(flock "$TORCH_DP_BUILD_LOCK")
if ! "${lock[@]}" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DTORCH_DP_BUILD_TESTS=OFF -DTORCH_DP_BUILD_PYTHON=ON \
    -DTORCH_DP_PYTHON_OUTPUT_DIR="$root/$package" -DPython3_EXECUTABLE="$PYTHON" \
    -DCMAKE_PREFIX_PATH="$torch_prefix" "${cuda_args[@]}" >"$build/configure.log" 2>&1; then
  tail -n 40 "$build/configure.log" >&2
  exit 1
fi
"${lock[@]}" cmake --build "$build" --target _C
echo "test_python_version: built $build in $((SECONDS - start)) s; pytest in $tree"

cd "$tree"
# The docs' tests (test_docs.py) read the whole checkout (README.md, docs/, git ls-files, the CMake files and C++
# sources), which this tree does not copy: they run with python3 in scripts/test.sh.
PYTHONPATH="$PWD/python" "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -m "not slow" \
  --ignore=tests/python/test_docs.py "$@"
echo "test_python_version: Python $version passed in $((SECONDS - start)) s"
