#!/usr/bin/env bash
# Builds the wheel with `pip wheel --no-build-isolation .`, installs it into a new virtualenv that has only
# the same torch, and runs the seed demo there, outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_deps.sh
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
