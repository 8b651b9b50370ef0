"""pytest setup of the tests on distinct simulated devices.

The simulated accelerator (tests/simulated_devices, README.md there) gives this process TORCH_DP_SIM_DEVICES
devices (4 by default) of type "sim", with CPU memory and asynchronous streams, so that torch_dp's paths between
distinct devices run without a GPU. Loading it makes "sim" the accelerator torch reports for the whole process,
which would change what the tests in tests/python see: these tests run in a pytest process of their own
(scripts/test.sh runs `pytest tests/simulated_devices/python`), and refuse to be collected beside others.
"""

import faulthandler
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # simulated_devices.py
sys.path.insert(0, str(HERE.parents[1] / "python"))  # tests/python: helpers.py, reference.py

import simulated_devices  # noqa: E402

sim = simulated_devices.load()


def pytest_collection_modifyitems(config, items):
    outside = sorted({str(item.path) for item in items if HERE not in item.path.parents})
    if outside:
        raise pytest.UsageError(
            "the tests on simulated devices load an accelerator for the whole pytest process, which changes what "
            f"other tests see: run them in a process of their own (pytest {HERE}), not with {outside[0]}"
        )
    accelerator = torch._utils._get_available_device_type()
    if accelerator != simulated_devices.NAME:
        # torch (and so torch.nn.DataParallel and torch_dp) resolves device indices to CUDA first where it exists.
        skip = pytest.mark.skip(reason=f"{accelerator} is the accelerator torch reports here, not the simulated one")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh, reproducible random inputs in every test (never all-zeros); every device's generator too."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _bounded():
    """A test that waits for good (a stream waiting for work that never comes) ends the run after 10 minutes,
    with every thread's traceback, instead of holding it until CI's limit."""
    faulthandler.dump_traceback_later(600, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _settled():
    """Every device's streams have run what a test queued before the next test starts, so that an error of
    queued work is reported by the test that queued it."""
    yield
    for index in range(sim.device_count()):
        sim.synchronize(index)
