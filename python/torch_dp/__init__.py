"""torch_dp: a faster drop-in for torch.nn.DataParallel, built on a C++ engine.

model = torch_dp.DataParallel(model)              # instead of torch.nn.DataParallel(model)
model = torch_dp.DataParallel(model, ["cpu"] * 4) # four CPU replicas, no GPU needed
"""

import os as _os

import torch

# For C++ programs, like torch.utils.cmake_prefix_path: the CMake package TorchDP (find_package(TorchDP)) that
# pip installed with this package, its headers and libtorch_dp (README.md, C++ usage).
cmake_prefix_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")

try:
    from torch_dp._build_info import (
        TORCH_DP_VERSION as __version__,  # noqa: F401 - the package version
        TORCH_VERSION as _BUILT_AGAINST,
    )
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "torch_dp's compiled part is missing: install it with `pip install --no-build-isolation .` "
        "or build it in place with `bash scripts/test.sh` (see README.md)"
    ) from error

# A C++ extension only works with the torch it was compiled against: fail with a clear message, not with an
# undefined-symbol error from the dynamic loader.
if torch.__version__ != _BUILT_AGAINST:
    raise ImportError(
        f"torch_dp was built against torch {_BUILT_AGAINST}, but torch {torch.__version__} is installed. "
        "Rebuild torch_dp against the installed torch: `pip install --no-build-isolation --no-deps "
        "--force-reinstall .` in the torch_dp source tree (or `bash scripts/test.sh` for an in-place build)."
    )

from torch_dp import _C  # noqa: E402, F401 - loads the compiled part at import, after the version check
from torch_dp.criterion import ParallelCriterion, SumAndCount  # noqa: E402
from torch_dp.data_parallel import DataParallel, data_parallel  # noqa: E402
from torch_dp.package_data_parallel import PackageDataParallel  # noqa: E402
from torch_dp.parallel_apply import parallel_apply  # noqa: E402
from torch_dp.patch import is_patched, patch, unpatch  # noqa: E402
from torch_dp.replicate import replicate  # noqa: E402
from torch_dp.scatter_gather import gather, scatter, scatter_kwargs  # noqa: E402
from torch_dp.scattered_outputs import ScatteredOutputs  # noqa: E402
from torch_dp.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402

__all__ = [
    "DataParallel",
    "PackageDataParallel",
    "ParallelCriterion",
    "ScatteredOutputs",
    "SumAndCount",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "data_parallel",
    "gather",
    "is_patched",
    "parallel_apply",
    "patch",
    "replicate",
    "scatter",
    "scatter_kwargs",
    "unpatch",
]
