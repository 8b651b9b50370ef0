"""Small helpers shared by the test modules (imported as `from helpers import ...`; pytest puts this folder on
sys.path)."""

import os
import threading

import torch
from torch import nn


def cpus(n):
    """A device list of n CPU replicas: how torch_dp runs several replicas without a GPU."""
    return ["cpu"] * n


def os_threads():
    """This process's OS threads (torch_dp's workers are C++ threads, invisible to the threading module)."""
    return len(os.listdir("/proc/self/task"))


def run_in_threads(target, count, timeout=60):
    """Runs target(i) for i in range(count) on that many Python threads at once and waits for them; fails
    if one has not finished within `timeout` seconds (a hang) instead of blocking the suite."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), f"a thread did not finish within {timeout} s"


def run_with_timeout(call, seconds=60):
    """call() on a thread; fails the test instead of hanging it when the call does not return (replicas left
    waiting for each other)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: B902 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no return within {seconds} s: replicas left waiting"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class MLP(nn.Module):
    """A small MLP; the errors about a meta buffer name its layers ('fc1.scale')."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class StatefulNet(nn.Module):
    """Parameters, BatchNorm statistics, a plain buffer and a plain attribute: every kind of state a forward reads
    (the state-change tests, on CPU lists and on distinct simulated devices)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)
        self.register_buffer("offset", torch.randn(3))
        self.scale = 1.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x)))) * self.scale + self.offset


def conv_bn_net(**bn_options) -> nn.Module:
    """A float64 conv net with a BatchNorm2d and a BatchNorm1d (`bn_options` for both), for the SyncBatchNorm
    tests; inputs (N, 3, 6, 6)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, **bn_options),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5, **bn_options),
        nn.Tanh(),
        nn.Linear(5, 2),
    ).double()
