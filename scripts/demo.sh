#!/usr/bin/env bash
# The seed demo: installs what is missing, builds torch_dp, and runs PyTorch's data-parallelism tutorial on
# torch_dp (every GPU if there is one, else 4 CPU replicas). Arguments go to the tutorial (--replicas N, --device).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh >/dev/null
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" examples/python/tutorial.py "$@"
