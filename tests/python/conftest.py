"""Shared pytest setup for torch_dp's Python tests.

Every test runs on the CPU: torch_dp accepts CPU device lists such as ``["cpu"] * 4``, which run four replicas
on four worker threads, so the multi-replica paths (scatter, replicate, parallel_apply, gather and their
gradients) are exercised without a GPU. Tests that need GPUs carry ``@pytest.mark.cuda`` (one device) or
``@pytest.mark.cuda(2)`` (that many), the one way to gate a test on GPUs, and are skipped where fewer are present.
Markers are registered in pyproject.toml only.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # A test marked `cuda(n)` is skipped where fewer than n CUDA devices are present, so `-m cuda` is safe
    # everywhere.
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is None:
            continue
        needed = marker.args[0] if marker.args else marker.kwargs.get("devices", 1)
        if present < needed:
            reason = "needs a CUDA device" if needed == 1 else f"needs {needed} CUDA devices"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    """Fresh, reproducible random inputs in every test (never all-zeros)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(params=[1, 2, 3, 4], ids=lambda n: f"{n}cpu")
def cpu_ids(request):
    """CPU device lists of 1 to 4 replicas."""
    return ["cpu"] * request.param


@pytest.fixture
def no_accelerator(monkeypatch):
    """Makes torch report no CUDA device, so that the rows about machines without one hold on a GPU machine too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Makes torch report two CUDA devices, for the device checks that only run with an accelerator. Nothing
    may touch CUDA under it: the tests use it only for errors raised before any tensor moves."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
