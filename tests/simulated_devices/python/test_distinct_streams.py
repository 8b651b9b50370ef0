"""A forward and its backward under the caller's own current streams, on distinct simulated devices.

A user who runs a model under `with torch.cuda.stream(s)` (or sets another current stream per device) has every
op of the forward queued on those streams, and the autograd engine runs each node's backward on the stream its
forward ran on. A node that spans devices (scatter, gather, the broadcast of copies, SyncBatchNorm's combined
statistics) runs on one device's stream only, so unless it restores its forward's streams on the other devices,
its copies from them run on their default streams, racing the streams that computed the gradients: NaN (the
backend's poisoned memory) or stale values. The references are the unwrapped module on the CPU and torch_dp on
the default streams. One device is slowed down, so that a missing wait shows every time.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import torch_dp
from distinct import sims

TOL = {"rtol": 1e-10, "atol": 1e-12}


@contextlib.contextmanager
def side_streams(devices, slow=None):
    """Every device's current stream a new one (not its default), and device `slow` 8 times slower, for the
    duration; then the default streams again, with everything queued run."""
    previous = [torch.accelerator.current_stream(d) for d in devices]
    if slow is not None:
        torch.sim.set_slowdown(slow, 8.0)
    try:
        for d in devices:
            torch.accelerator.set_stream(torch.Stream(device=d))
        yield
    finally:
        for d in devices:
            torch.accelerator.synchronize(d)
        for stream in previous:
            torch.accelerator.set_stream(stream)
        if slow is not None:
            torch.sim.set_slowdown(slow, 1.0)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 3)).double()


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("slow", [0, "last"])
def test_training_under_other_streams_matches_the_whole_batch(n, slow):
    devices = sims(n)
    torch.manual_seed(0)
    reference = _mlp()
    model = copy.deepcopy(reference).to(devices[0])
    dp = torch_dp.DataParallel(model, devices, output_device=devices[-1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    with side_streams(devices, slow=n - 1 if slow == "last" else slow):
        for _ in range(3):
            x = torch.randn(40 * n, 6, dtype=torch.double)
            xd = x.to(devices[0]).requires_grad_()
            xr = x.clone().requires_grad_()
            out = dp(xd)
            out.square().sum().backward()
            reference(xr).square().sum().backward()
            torch.testing.assert_close(out.cpu(), reference(x.clone()).detach(), **TOL)
            torch.testing.assert_close(xd.grad.cpu(), xr.grad, **TOL)
            for p, q in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad.cpu(), q.grad, **TOL)
            optimizer.step()
            reference_optimizer.step()
            optimizer.zero_grad()
            reference_optimizer.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.cpu(), q, **TOL)


class ConvSyncBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


@pytest.mark.parametrize("n", [2, 4])
def test_sync_batchnorm_under_other_streams_matches_batchnorm_on_the_whole_batch(n):
    """The combined statistics are computed on a replica's worker thread from every device's chunk: that thread
    must use the caller's streams on every device, not only its own."""
    devices = sims(n)
    torch.manual_seed(0)
    reference = ConvSyncBN().double()
    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference)).to(devices[0])
    dp = torch_dp.DataParallel(model, devices)
    x = torch.randn(6 * n, 3, 5, 5, dtype=torch.double)
    with side_streams(devices, slow=n - 1):
        xd = x.to(devices[0]).requires_grad_()
        out = dp(xd)
        out.square().sum().backward()
        xr = x.clone().requires_grad_()
        expected = reference(xr)
        expected.square().sum().backward()
        torch.testing.assert_close(out.cpu(), expected.detach(), **TOL)
        torch.testing.assert_close(xd.grad.cpu(), xr.grad, **TOL)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.cpu(), q.grad, **TOL)
        torch.testing.assert_close(model.bn.running_mean.cpu(), reference.bn.running_mean, **TOL)


@pytest.mark.parametrize("lean", [True, False])
def test_parallel_criterion_under_other_streams_matches_the_whole_batch(lean):
    devices = sims(3)
    torch.manual_seed(0)
    reference = _mlp()
    model = copy.deepcopy(reference).to(devices[0])
    dp = torch_dp.DataParallel(model, devices)
    weight = torch.rand(3, dtype=torch.double) + 0.5
    criterion = torch_dp.ParallelCriterion(nn.CrossEntropyLoss(weight=weight.to(devices[0])), lean=lean)
    x = torch.randn(90, 6, dtype=torch.double)
    target = torch.randint(0, 3, (90,))
    with side_streams(devices, slow=2):
        loss = criterion(dp.forward_scattered(x.to(devices[0])), target.to(devices[0]))
        loss.backward()
        expected = nn.CrossEntropyLoss(weight=weight)(reference(x), target)
        expected.backward()
        torch.testing.assert_close(loss.cpu(), expected.detach(), **TOL)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.cpu(), q.grad, **TOL)
