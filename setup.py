"""pip front end for torch_dp: it drives the one CMake build (CMakeLists.txt); there is no second list of
sources here. Build against the installed torch with

    pip install --no-build-isolation .
    pip wheel --no-build-isolation .
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        package_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        package_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DTORCH_DP_BUILD_PYTHON=ON",
            "-DTORCH_DP_PYTHON_PACKAGE=ON",
            f"-DTORCH_DP_PYTHON_OUTPUT_DIR={package_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.check_call(configure)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])
        # libtorch_dp beside _C, and the C++ package: headers and TorchDPConfig.cmake (Note [C++ package in the
        # wheel] in CMakeLists.txt).
        install = ["cmake", "--install", str(build_dir), "--component", "python_package", "--prefix", str(package_dir)]
        subprocess.check_call(install)


def torch_requirement() -> list:
    try:
        import torch
    except ImportError:
        return ["torch"]
    return [f"torch=={torch.__version__}"]


setup(
    packages=["torch_dp"],
    package_dir={"": "python"},
    package_data={"torch_dp": ["_C.pyi", "py.typed"]},
    ext_modules=[CMakeExtension("torch_dp._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=torch_requirement(),
    # Keep setuptools' build tree out of build/, which is the CMake build of scripts/build.sh.
    options={"build": {"build_base": "build-setuptools"}},
    zip_safe=False,
)
