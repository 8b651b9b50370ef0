# Sourced: sets the array cuda_args to the CMake arguments that a CUDA build of torch needs, empty without nvcc.
# Needs $PYTHON (the interpreter whose torch is built against).
#
# A CUDA build of torch makes its CMake package look for the CUDA toolkit. It guesses the toolkit's root from
# the nvcc on PATH, which is wrong when that nvcc is a wrapper; ask nvcc itself (its TOP). Torch also links
# libnvrtc, which some toolkits ship only as libnvrtc.so.N (or only in the nvidia-* pip packages).
cuda_args=()
if command -v nvcc >/dev/null 2>&1; then
  cuda_top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  if [ -n "$cuda_top" ] && [ -d "$cuda_top" ]; then
    cuda_top=$(cd "$cuda_top" && pwd -P)
    cuda_args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_top" -DCUDAToolkit_ROOT="$cuda_top")
    if ! ls "$cuda_top"/lib64/libnvrtc.so "$cuda_top"/lib/libnvrtc.so "$cuda_top"/targets/*/lib/libnvrtc.so \
      >/dev/null 2>&1; then
      nvrtc=$( (
        ls "$cuda_top"/lib64/libnvrtc.so.* "$cuda_top"/targets/*/lib/libnvrtc.so.* 2>/dev/null
        "$PYTHON" -c "import glob, os, nvidia
for root in nvidia.__path__:
    print('\n'.join(sorted(glob.glob(os.path.join(root, '**', 'libnvrtc.so*'), recursive=True))))" 2>/dev/null
      ) | grep -v -e alt -e builtins | head -n 1 || true)
      if [ -n "$nvrtc" ]; then
        cuda_args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
      fi
    fi
  fi
fi
