#!/usr/bin/env bash
# Lints the Python code with ruff (configured in pyproject.toml), installing the pinned ruff where it is missing.
# CI runs this first; a violation fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RUFF_VERSION=0.17.6
if ! "$PYTHON" -m ruff --version 2>/dev/null | grep -qx "ruff $RUFF_VERSION"; then
  echo "lint: installing ruff==$RUFF_VERSION"
  "$PYTHON" -m pip install -q "ruff==$RUFF_VERSION"
fi
"$PYTHON" -m ruff check python tests benchmarks examples setup.py
