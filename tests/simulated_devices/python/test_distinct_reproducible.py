"""DataParallel(reproducible=True) with random ops (dropout, randn_like) on distinct devices, each with its own
random generator. What torch_dp promises (Note [Reproducible replicas] in src/parallel_apply.cpp, docs/python.md's
"Reproducible runs"): replicas sharing a device run one after another in index order, replicas on distinct devices
at once, one thread per device; so replica i draws from its own device's generator, in the order in which that
device's chunks come in the batch, and two runs with the same seed are bitwise equal.

The reference runs the chunks in index order through the unwrapped module, each on a copy on its replica's device,
after the same seeds. Every device gets a seed of its own, so a replica drawing from another device's generator
would not match it. The models sleep before their random ops for a time read from their chunk, so that on threads
a later replica would draw first (test_without_the_option_thread_timing_changes_the_draws shows it does)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import torch_dp
from distinct import cpu
from helpers import run_with_timeout
from simulated_devices import NAME

DT = torch.float64
ROWS = 3  # per replica
FORWARDS = 2
SLEEP_MS = 10.0  # per replica index, reversed in the "last first" runs


class SleepInBackward(torch.autograd.Function):
    """The identity; its backward sleeps `delay[0]` milliseconds: the replicas' gradients then reach what they share
    (the module's parameters, SyncBatchNorm's combined statistics) in the order the delays give."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, delay: torch.Tensor) -> torch.Tensor:
        ctx.pause = float(delay[0]) / 1000
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.pause)
        return grad, None


class DropNet(nn.Module):
    """Linear, dropout, Linear, dropout, plus noise from randn_like; forward(x, delay) first sleeps delay[0]
    milliseconds, and again before the second dropout, and so does its backward. With `sync`, a SyncBatchNorm
    between the Linears."""

    def __init__(self, sync: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = torch_dp.SyncBatchNorm(16) if sync else nn.Identity()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, delay: torch.Tensor) -> torch.Tensor:
        pause = float(delay[0]) / 1000
        time.sleep(pause)
        h = self.bn(nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, self.training))
        h = SleepInBackward.apply(h, delay)
        time.sleep(pause)
        y = self.fc2(nn.functional.dropout(h, 0.3, self.training))
        return y + 0.1 * torch.randn_like(y)


def sim(index: int) -> torch.device:
    return torch.device(NAME, index)


def seed_every_device(changed: int | None = None) -> None:
    """The CPU's and every device's generator, each device with a seed of its own (device `changed` another)."""
    torch.manual_seed(1)
    for index in range(torch.sim.device_count()):
        with torch.sim.device(index):
            torch.sim.manual_seed(100 + index + (1000 if index == changed else 0))


def batch(count: int) -> torch.Tensor:
    return torch.randn(count * ROWS, 6, dtype=DT, generator=torch.Generator().manual_seed(7))


def delays(count: int, last_first: bool) -> torch.Tensor:
    replica = torch.arange(count, dtype=DT).repeat_interleave(ROWS)
    return SLEEP_MS * ((count - 1) - replica if last_first else replica)


def fresh_net(sync: bool = False) -> DropNet:
    torch.manual_seed(0)
    return DropNet(sync).to(DT)


def run_dp(device_ids, last_first, sync=False, changed=None, **options):
    """FORWARDS forwards and backwards through a DataParallel over `device_ids`: outputs and parameter gradients
    (on the CPU), and the DataParallel."""
    net = fresh_net(sync).to(sim(device_ids[0]))
    dp = torch_dp.DataParallel(net, device_ids, **options)
    x, delay = batch(len(device_ids)).to(sim(device_ids[0])), delays(len(device_ids), last_first).to(sim(device_ids[0]))
    seed_every_device(changed)
    outputs, grads = [], []
    for _ in range(FORWARDS):
        out = run_with_timeout(lambda: dp(x, delay))
        out.pow(2).sum().backward()
        outputs.append(cpu(out.detach()))
        grads.append(cpu([p.grad for p in net.parameters()]))
        net.zero_grad(set_to_none=True)
    return outputs, grads, dp


def run_reference(device_ids):
    """The chunks in index order through the unwrapped module, chunk i on a copy on its replica's device; the
    gradients summed over the copies."""
    net = fresh_net()
    copies = {index: copy.deepcopy(net).to(sim(index)) for index in dict.fromkeys(device_ids)}
    x, no_delay = batch(len(device_ids)), torch.zeros(1, dtype=DT)
    seed_every_device()
    outputs, grads = [], []
    for _ in range(FORWARDS):
        parts = [
            copies[index](chunk.to(sim(index)), no_delay.to(sim(index)))
            for index, chunk in zip(device_ids, x.chunk(len(device_ids)))
        ]
        loss = sum(part.pow(2).sum().cpu() for part in parts)
        loss.backward()
        outputs.append(torch.cat(cpu([part.detach() for part in parts])))
        grads.append(
            [sum(cpu(m.get_parameter(name).grad) for m in copies.values()) for name, _ in net.named_parameters()]
        )
        for m in copies.values():
            m.zero_grad(set_to_none=True)
    return outputs, grads


def bitwise_equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


def assert_same_gradients(first, second) -> None:
    """Every forward's parameter gradients bitwise equal between two runs; else the largest differences."""
    for step, (got, again) in enumerate(zip(first, second)):
        assert bitwise_equal(got, again), f"forward {step}: {[(g - a).abs().max().item() for g, a in zip(got, again)]}"


DEVICE_LISTS = {
    "sim01": [0, 1],
    "sim012": [0, 1, 2],
    "sim0123": [0, 1, 2, 3],
    "sim2013": [2, 0, 1, 3],
    "sim0112": [0, 1, 1, 2],
    "sim0101": [0, 1, 0, 1],
    "sim0011": [0, 0, 1, 1],
}


CASES = [pytest.param(ids, "auto", id=f"{name}-auto") for name, ids in DEVICE_LISTS.items()] + [
    pytest.param(DEVICE_LISTS[name], issuing, id=f"{name}-{issuing}")
    for name, issuing in [("sim0101", "threads"), ("sim0011", "threads"), ("sim0101", "serial"), ("sim2013", "serial")]
]


@pytest.mark.parametrize("device_ids, issuing", CASES)
def test_two_runs_are_bitwise_equal_and_equal_the_chunks_on_their_devices(device_ids, issuing):
    """Two runs (the replicas' sleeps reversed between them, in forward and backward) give bitwise equal outputs
    and gradients; the outputs are bitwise those of the chunks run in index order on their devices, the gradients
    the sums of theirs (added in another order)."""
    first = run_dp(device_ids, True, issuing=issuing, reproducible=True)
    second = run_dp(device_ids, False, issuing=issuing, reproducible=True)
    reference = run_reference(device_ids)
    assert bitwise_equal(first[0], second[0])
    assert bitwise_equal(first[0], reference[0])
    # Lists with replicas sharing the module's device and others copying it: Note [Gradients summed in slot order]
    # in src/replicate.cpp.
    assert_same_gradients(first[1], second[1])
    for got, want in zip(first[1], reference[1]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device_ids", [[0, 1, 2], [0, 1, 0, 1]], ids=["sim012", "sim0101"])
def test_each_replica_draws_from_its_own_device_generator(device_ids):
    """Reseeding device 1 alone changes the chunks that run there and no other (bitwise)."""
    base = run_dp(device_ids, False, reproducible=True)[0]
    changed = run_dp(device_ids, False, reproducible=True, changed=1)[0]
    on_one = torch.tensor(device_ids).repeat_interleave(ROWS) == 1
    for a, b in zip(base, changed):
        assert torch.equal(a[~on_one], b[~on_one])
        assert not torch.equal(a[on_one], b[on_one])


def test_one_thread_per_device_and_nothing_to_measure():
    """Replicas on distinct devices still run at once, one thread per device (the first device's on the calling
    thread); "auto" has nothing to measure."""
    _, _, dp = run_dp([0, 1, 0, 1, 2], False, issuing="threads", reproducible=True)
    assert dp._engine.pool.num_threads == 2
    _, _, dp = run_dp([0, 1, 0, 1, 2], False, reproducible=True)
    assert dp._engine.pool.settled_auto_issuing == torch_dp._C.Issuing.auto


def test_without_the_option_thread_timing_changes_the_draws():
    """What the tests above would see with the mechanism broken: two replicas on one device, on threads, draw from
    its generator in the order they run."""
    first = run_dp([0, 1, 0, 1], True, issuing="threads")[0]
    second = run_dp([0, 1, 0, 1], False, issuing="threads")[0]
    assert not bitwise_equal(first, second)


@pytest.mark.parametrize("device_ids", [[0, 1, 2], [0, 1, 0, 1]], ids=["sim012", "sim0101"])
def test_sync_batchnorm_runs_are_bitwise_equal(device_ids):
    """With SyncBatchNorm the replicas run on threads and those sharing a device take turns between the layers:
    outputs and gradients bitwise equal from run to run."""
    first = run_dp(device_ids, True, sync=True, reproducible=True)
    second = run_dp(device_ids, False, sync=True, reproducible=True)
    assert bitwise_equal(first[0], second[0])
    # Note [Summing the replicas' gradients in index order] in sync_group.py.
    assert_same_gradients(first[1], second[1])
