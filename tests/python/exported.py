"""The exported models the deployment tests load, compiled once per torch version: examples/python/export_model.py
writes model.pt (TorchScript), model.pt2 (an AOTInductor package), input.pt and expected.pt into a cache folder
(~/.cache/torch_dp/exported-<version>, or $TORCH_DP_EXPORTED_DIR, which scripts/test.sh sets). A missing file is
compiled again (half a minute on two CPU cores); a present one costs nothing."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPORT_SCRIPT = os.path.join(ROOT, "examples", "python", "export_model.py")
EXPORTED_FILES = ("model.pt", "model.pt2", "input.pt", "expected.pt")


def cache_dir(device="cpu"):
    """$TORCH_DP_EXPORTED_DIR ($TORCH_DP_EXPORTED_CUDA_DIR for CUDA), as scripts/lib/ensure_exported.sh sets them,
    else the same default folder."""
    variable, suffix = ("TORCH_DP_EXPORTED_DIR", "") if device == "cpu" else ("TORCH_DP_EXPORTED_CUDA_DIR", "-cuda")
    default = os.path.join(os.path.expanduser("~"), ".cache", "torch_dp", f"exported-{torch.__version__}{suffix}")
    return os.environ.get(variable) or default


def export_script():
    """examples/python/export_model.py as a module (its Model class and export_package)."""
    spec = importlib.util.spec_from_file_location("export_model", EXPORT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported_files(directory, *extra):
    """`directory`, after export_model.py wrote its files there unless they are all present already."""
    if not all(os.path.exists(os.path.join(directory, name)) for name in EXPORTED_FILES):
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        staging = tempfile.mkdtemp(prefix="exported-", dir=os.path.dirname(os.path.abspath(directory)))
        subprocess.run([sys.executable, EXPORT_SCRIPT, staging, *extra], check=True, stdout=subprocess.DEVNULL)
        os.makedirs(directory, exist_ok=True)
        for name in EXPORTED_FILES:  # the package last: its presence says the rest is there
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def eager_model(directory):
    """export_model.py's model with the weights of the files in `directory`, in eval mode."""
    model = export_script().Model().eval()
    with warnings.catch_warnings():  # torch.jit's deprecation warnings: the weights are all this reads
        warnings.simplefilter("ignore", DeprecationWarning)
        model.load_state_dict(torch.jit.load(os.path.join(directory, "model.pt")).state_dict())
    return model


def compile_package(exported, package_path):
    """torch._inductor.aoti_compile_and_package, for the tests that write their own package into this cache once
    per torch version. On the way torch's compiler warns of its own deprecations (torch 2.13: pytree's LeafSpec
    check as fx deep-copies a graph with pytree inputs, torch.jit.script_method). They are torch's, and show only
    when the cache is cold, so here they are reported rather than made errors by the suite's
    filterwarnings = error; what the tests then check runs under that filter."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return torch._inductor.aoti_compile_and_package(exported, package_path=package_path)
