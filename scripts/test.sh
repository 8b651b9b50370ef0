#!/usr/bin/env bash
# Every test: installs what is missing, builds once (scripts/build.sh), then runs ctest (C++, the tests on the
# simulated devices included), the installed-package C++ example, pytest (Python), and pytest again on distinct
# simulated devices, in a process of its own (tests/simulated_devices/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
PYTHON=${PYTHON:-python3}
# The exported models the C++ tests, the installed-package example and pytest load, compiled once per torch version.
source scripts/lib/ensure_exported.sh
ctest --test-dir build --output-on-failure
bash scripts/check_install.sh
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest tests/python -q -p no:cacheprovider
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest tests/simulated_devices/python -q \
  -p no:cacheprovider
