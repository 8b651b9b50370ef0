"""The simulated accelerator from Python: ``load()`` makes ``torch.device("sim", i)`` a device of N CPU-backed
devices with asynchronous streams (README.md in this folder), and ``torch.sim`` its device module, as
``torch.cuda`` is CUDA's. Test-only: never installed, not in the wheel.

Loading it makes "sim" the accelerator torch reports (``torch.accelerator``,
``torch._utils._get_available_device_type``) for the whole process, so the tests that use it run in a pytest
process of their own.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

NAME = "sim"
_ROOT = Path(__file__).resolve().parents[2]

__all__ = ["NAME", "load", "library_path"]


def library_path() -> Path:
    """libtorch_dp_sim.so: $TORCH_DP_SIM_LIBRARY, else where scripts/build.sh puts it."""
    explicit = os.environ.get("TORCH_DP_SIM_LIBRARY")
    path = Path(explicit) if explicit else _ROOT / "build" / "tests" / "simulated_devices" / "libtorch_dp_sim.so"
    if not path.is_file():
        raise FileNotFoundError(
            f"the simulated accelerator's library is not at {path}: build it with scripts/build.sh "
            "(or set TORCH_DP_SIM_LIBRARY)"
        )
    return path


def _ops():
    return torch.ops.torch_dp_sim


def _index(device: int | str | torch.device | None) -> int:
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != NAME:
        raise ValueError(f"expected a {NAME} device, but got {device}")
    return device.index if device.index is not None else current_device()


# ---- the device module (torch.sim) ---------------------------------------------------------------------------


def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return True


def _lazy_init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return _ops().device_count()


def current_device() -> int:
    return _ops().current_device()


def set_device(device: int | str | torch.device) -> None:
    _ops().set_device(_index(device))


@contextlib.contextmanager
def device(device: int | str | torch.device):
    previous = current_device()
    set_device(device)
    try:
        yield
    finally:
        set_device(previous)


def synchronize(device: int | str | torch.device | None = None) -> None:
    """Waits for every stream of the device (the current one by default)."""
    _ops().synchronize(_index(device))


def current_stream(device: int | str | torch.device | None = None) -> torch.Stream:
    return torch.accelerator.current_stream(torch.device(NAME, _index(device)))


Stream = torch.Stream
Event = torch.Event


def manual_seed(seed: int) -> None:
    _ops().manual_seed(current_device(), int(seed))


def manual_seed_all(seed: int) -> None:
    for index in range(device_count()):
        _ops().manual_seed(index, int(seed))


def initial_seed() -> int:
    return _ops().initial_seed(current_device())


def get_rng_state(device: int | str | torch.device | None = None) -> torch.Tensor:
    return _ops().get_rng_state(_index(device))


def set_rng_state(state: torch.Tensor, device: int | str | torch.device | None = None) -> None:
    _ops().set_rng_state(_index(device), state)


def get_amp_supported_dtype() -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16]


def set_slowdown(device: int | str | torch.device, factor: float) -> None:
    """Makes every op on the device take `factor` times as long: a slower device beside faster ones."""
    _ops().set_slowdown(_index(device), float(factor))


def memory_allocated(device: int | str | torch.device | None = None) -> int:
    return _ops().allocated_bytes(_index(device))


def quarantined_blocks() -> int:
    """Freed blocks that wait for a stream that used them (Note [Quarantine] in backend/runtime.cpp)."""
    return _ops().quarantined_blocks()


# ---- loading -------------------------------------------------------------------------------------------------

_loaded = False


def load(devices: int | None = None):
    """Loads the backend once per process with `devices` devices (TORCH_DP_SIM_DEVICES, default 4) and returns
    its device module, torch.sim."""
    global _loaded
    if _loaded:
        if devices is not None and devices != device_count():
            raise RuntimeError(f"the simulated accelerator is loaded with {device_count()} devices, not {devices}")
        return torch.sim
    if devices is not None:
        os.environ["TORCH_DP_SIM_DEVICES"] = str(devices)
    torch.ops.load_library(str(library_path()))
    torch.utils.rename_privateuse1_backend(NAME)
    torch._register_device_module(NAME, sys.modules[__name__])
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
    _loaded = True
    return torch.sim
