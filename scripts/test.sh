#!/usr/bin/env bash
# Every test: installs what is missing, builds once (scripts/build.sh), then runs ctest (C++), the installed-
# package C++ example, and pytest (Python).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
PYTHON=${PYTHON:-python3}
# The exported models the C++ tests, the installed-package example and pytest load, compiled once per torch version.
source scripts/ensure_exported.sh
ctest --test-dir build --output-on-failure
bash scripts/check_install.sh
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest tests/python -q -p no:cacheprovider
