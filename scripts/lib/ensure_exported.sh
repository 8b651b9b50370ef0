#!/usr/bin/env bash
# Sourced by scripts/test.sh, check_install.sh and sanitize.sh: sets and exports TORCH_DP_EXPORTED_DIR, the folder
# of the models examples/python/export_model.py writes (model.pt, model.pt2, input.pt, expected.pt), which the C++
# tests, the serve_exported example and pytest load. Default: a cache folder per torch version, compiled once (half a
# minute on two CPU cores) and kept. With `cuda` as argument: TORCH_DP_EXPORTED_CUDA_DIR, the same compiled for CUDA.
# Needs PYTHON and the repository root as the current folder.
_exported_device=${1:-cpu}
_exported_torch=$("${PYTHON:-python3}" -c 'import torch; print(torch.__version__)')
if [[ "$_exported_device" == cpu ]]; then
  TORCH_DP_EXPORTED_DIR=${TORCH_DP_EXPORTED_DIR:-$HOME/.cache/torch_dp/exported-$_exported_torch}
  export TORCH_DP_EXPORTED_DIR
  _exported_dir=$TORCH_DP_EXPORTED_DIR
else
  TORCH_DP_EXPORTED_CUDA_DIR=${TORCH_DP_EXPORTED_CUDA_DIR:-$HOME/.cache/torch_dp/exported-$_exported_torch-cuda}
  export TORCH_DP_EXPORTED_CUDA_DIR
  _exported_dir=$TORCH_DP_EXPORTED_CUDA_DIR
fi
# expected.pt is written last: its presence says the rest is there.
if [[ ! -f "$_exported_dir/model.pt2" || ! -f "$_exported_dir/expected.pt" ]]; then
  "${PYTHON:-python3}" examples/python/export_model.py "$_exported_dir" --device "$_exported_device"
fi
unset _exported_device _exported_torch _exported_dir
