#!/usr/bin/env bash
# Installs what building and testing torch_dp needs, where it is missing: a C++ toolchain, CMake, Ninja,
# ccache, Catch2 and valgrind (Debian/Ubuntu packages), and torch, pytest and hypothesis (pip). Sourced by the
# scripts that build; safe to run again.
set -euo pipefail

missing_packages=()
command -v cmake >/dev/null 2>&1 || missing_packages+=(cmake)
command -v ninja >/dev/null 2>&1 || missing_packages+=(ninja-build)
command -v g++ >/dev/null 2>&1 || missing_packages+=(g++)
command -v ccache >/dev/null 2>&1 || missing_packages+=(ccache)
# valgrind: the callgrind instruction count per forward, the stable bound tests/python/test_overhead.py checks.
command -v valgrind >/dev/null 2>&1 || missing_packages+=(valgrind)
if [ ! -e /usr/include/catch2/catch.hpp ] && [ ! -e /usr/include/catch2/catch_test_macros.hpp ]; then
  missing_packages+=(catch2)
fi
if [ ${#missing_packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "ensure_deps: installing ${missing_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_packages[@]}" >/dev/null
  else
    echo "ensure_deps: please install ${missing_packages[*]}" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
# torch: keep whatever torch is installed (a CUDA build on a GPU machine); else the pinned CPU build.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "ensure_deps: installing torch==2.13.0"
  "$PYTHON" -m pip install -q torch==2.13.0
fi
for module in pytest hypothesis; do
  if ! "$PYTHON" -c "import $module" >/dev/null 2>&1; then
    echo "ensure_deps: installing $module"
    "$PYTHON" -m pip install -q "$module"
  fi
done
# Test dependencies of tests/python/test_real_models.py (Hugging Face models and Trainer, which needs accelerate),
# pinned; both accept the torch above as it is (accelerate asks for torch>=2.0).
if ! "$PYTHON" -c "import transformers" >/dev/null 2>&1; then
  echo "ensure_deps: installing transformers==5.25.0"
  "$PYTHON" -m pip install -q "transformers==5.25.0" ||
    echo "ensure_deps: could not install transformers; tests/python/test_real_models.py will skip" >&2
fi
if ! "$PYTHON" -c "import accelerate" >/dev/null 2>&1; then
  echo "ensure_deps: installing accelerate==1.16.0"
  "$PYTHON" -m pip install -q "accelerate==1.16.0" ||
    echo "ensure_deps: could not install accelerate; the Trainer tests will skip" >&2
fi

# ccache keys on absolute paths; relative to the checkout they match across clones (CI builds a fresh clone).
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
