"""Shared pytest setup for torch_dp's Python tests.

Every test runs on the CPU: torch_dp accepts CPU device lists such as ``["cpu"] * 4``, which run four replicas
on four worker threads, so the multi-replica paths (scatter, replicate, parallel_apply, gather and their
gradients) are exercised without a GPU. Tests that need a GPU carry ``@pytest.mark.cuda`` and are skipped
without one.
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the test needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    # A test marked `cuda` is skipped where no CUDA device is available, so `-m cuda` is safe everywhere.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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
