#!/usr/bin/env bash
# Checks formatting and lints: Python with ruff (format and lint, configured in pyproject.toml), C++ with
# clang-format (.clang-format), installing the pinned tools where they are missing. CI runs this first; a violation
# fails it. `bash scripts/lint.sh --fix` formats in place instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=18.1.8
if ! "$PYTHON" -m ruff --version 2>/dev/null | grep -qx "ruff $RUFF_VERSION"; then
  echo "lint: installing ruff==$RUFF_VERSION"
  "$PYTHON" -m pip install -q "ruff==$RUFF_VERSION"
fi
clang_format() {
  "$PYTHON" -c 'import clang_format, sys; sys.argv[0] = "clang-format"; clang_format.clang_format()' "$@"
}
if ! clang_format --version 2>/dev/null | grep -q "clang-format version $CLANG_FORMAT_VERSION"; then
  echo "lint: installing clang-format==$CLANG_FORMAT_VERSION"
  "$PYTHON" -m pip install -q "clang-format==$CLANG_FORMAT_VERSION"
fi
PY_PATHS=(python tests benchmarks examples setup.py)
mapfile -t CXX_FILES < <(git ls-files '*.cpp' '*.h')
if [[ ${1:-} == --fix ]]; then
  "$PYTHON" -m ruff format "${PY_PATHS[@]}"
  "$PYTHON" -m ruff check --fix "${PY_PATHS[@]}"
  clang_format -i "${CXX_FILES[@]}"
  exit 0
fi
"$PYTHON" -m ruff format --check "${PY_PATHS[@]}"
"$PYTHON" -m ruff check "${PY_PATHS[@]}"
clang_format --dry-run --Werror "${CXX_FILES[@]}"
echo "lint: ruff format, ruff check and clang-format found nothing to change"
