"""DataParallel(reproducible=True) and data_parallel(..., reproducible=True): two runs with the same seed are
bitwise equal, random ops in the forward included, for replicas sharing a device (Note [Reproducible replicas]
in parallel_apply.cpp, Note [Reproducible synchronized batch norm] in sync_group.py).

Thread timing is what makes runs differ without the option, and on a quiet machine it may happen to repeat. So
the models sleep, before their random ops, for a time read from their chunk of a `delay` input: one run lets the
last replica draw first, the other the first replica. Without the option (or with the mechanism broken) that
reorders the draws and the runs differ, as test_without_the_option_thread_timing_changes_the_draws checks."""

import threading
import time

import pytest
import torch
from torch import nn

import torch_dp
from helpers import cpus, run_with_timeout

REPLICAS = 3
ROWS = 4  # per replica
FORWARDS = 8  # past issuing="auto"'s warm-up and into its alternation


class DropNet(nn.Module):
    """Linear, dropout, Linear, plus noise from randn_like; forward(x, delay) first sleeps delay[0] milliseconds.
    With `sync`, a SyncBatchNorm sits between the Linears, with a sleep and random ops on both sides of it."""

    def __init__(self, sync=False):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = torch_dp.SyncBatchNorm(16) if sync else nn.Identity()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x, delay):
        pause = float(delay[0]) / 1000
        time.sleep(pause)
        h = nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, self.training)
        h = self.bn(h)
        time.sleep(pause)
        y = self.fc2(nn.functional.dropout(h, 0.3, self.training))
        return y + 0.1 * torch.randn_like(y) if self.training else y


def delays(last_first):
    """Per row, the milliseconds its replica sleeps: 25 * r for replica r, or 25 * (REPLICAS - 1 - r) with
    `last_first` (the last replica then draws first when replicas run at once)."""
    replica = torch.arange(REPLICAS, dtype=torch.double).repeat_interleave(ROWS)
    return 25.0 * ((REPLICAS - 1) - replica if last_first else replica)


def inputs():
    return torch.randn(REPLICAS * ROWS, 6, dtype=torch.double, generator=torch.Generator().manual_seed(7))


def fresh_net(sync=False):
    torch.manual_seed(0)
    return DropNet(sync).double()


def record(net, out, outputs, grads):
    out.pow(2).sum().backward()
    outputs.append(out.detach().clone())
    for p in net.parameters():
        grads.append(p.grad.clone())
        p.grad = None


def run(forward_of, net, last_first, device="cpu"):
    """FORWARDS forwards and backwards after seed 1: every output and every parameter's gradient."""
    x, delay = inputs().to(device), delays(last_first).to(device)
    torch.manual_seed(1)
    outputs, grads = [], []
    for _ in range(FORWARDS):
        record(net, forward_of(x, delay), outputs, grads)
    return outputs, grads


def run_dp(last_first, sync=False, device_ids=None, **options):
    """run() through a DataParallel over `device_ids` (default: REPLICAS CPU replicas)."""
    device_ids = cpus(REPLICAS) if device_ids is None else device_ids
    device = torch.device("cpu") if device_ids[0] == "cpu" else torch.device("cuda", device_ids[0])
    net = fresh_net(sync).to(device)
    return run(torch_dp.DataParallel(net, device_ids, **options), net, last_first, device)


def run_functional(last_first, **options):
    net = fresh_net()
    return run(lambda x, d: torch_dp.data_parallel(net, (x, d), cpus(REPLICAS), **options), net, last_first)


def run_chunks():
    """The chunks one after another through the unwrapped module, after the same seed."""
    net = fresh_net()
    no_delay = torch.zeros(ROWS, dtype=torch.double)
    return run(lambda x, _: torch.cat([net(chunk, no_delay) for chunk in x.chunk(REPLICAS)]), net, False)


def bitwise_equal(a, b):
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("issuing", ["threads", "auto", "serial"])
def test_two_runs_are_bitwise_equal_and_equal_the_chunks_run_in_order(issuing):
    first = run_dp(True, issuing=issuing, reproducible=True)
    second = run_dp(False, issuing=issuing, reproducible=True)
    chunks = run_chunks()
    for got, want in [(first, second), (first, chunks)]:
        assert bitwise_equal(got[0], want[0])  # outputs
        assert bitwise_equal(got[1], want[1])  # gradients


@pytest.mark.cuda
@pytest.mark.parametrize("issuing", ["threads", "auto"])
def test_on_one_gpu(issuing):
    first = run_dp(True, device_ids=[0] * REPLICAS, issuing=issuing, reproducible=True)
    second = run_dp(False, device_ids=[0] * REPLICAS, issuing=issuing, reproducible=True)
    assert bitwise_equal(first[0], second[0])
    assert bitwise_equal(first[1], second[1])


def test_functional_form():
    first = run_functional(True, reproducible=True)
    second = run_functional(False, reproducible=True)
    chunks = run_chunks()
    assert bitwise_equal(first[0], second[0]) and bitwise_equal(first[1], second[1])
    assert bitwise_equal(first[0], chunks[0]) and bitwise_equal(first[1], chunks[1])


def test_without_the_option_thread_timing_changes_the_draws():
    # What the tests above would see with the mechanism broken: replicas on threads drawing in the order they run.
    assert not bitwise_equal(run_dp(True, issuing="threads")[0], run_dp(False, issuing="threads")[0])
    assert not bitwise_equal(run_dp(True, sync=True)[0], run_dp(False, sync=True)[0])


def test_off_runs_as_before():
    # Serial issuing already runs replicas in index order; threads give the module's result without random ops.
    serial, chunks = run_dp(False, issuing="serial"), run_chunks()
    assert bitwise_equal(serial[0], chunks[0]) and bitwise_equal(serial[1], chunks[1])
    net = fresh_net().eval()
    dp = torch_dp.DataParallel(net, cpus(REPLICAS), issuing="threads")
    assert dp.reproducible is False
    x = inputs()
    torch.testing.assert_close(dp(x, torch.zeros(len(x))), net(x, torch.zeros(1)), rtol=0, atol=1e-12)
    assert dp._engine.pool.num_threads == REPLICAS - 1


def test_auto_on_one_device_neither_measures_nor_starts_workers():
    dp = torch_dp.DataParallel(fresh_net(), cpus(REPLICAS), reproducible=True)
    x, delay = inputs(), torch.zeros(REPLICAS * ROWS, dtype=torch.double)
    for _ in range(20):
        dp(x, delay)
    assert dp._engine.pool.settled_auto_issuing == torch_dp._C.Issuing.auto
    assert dp._engine.pool.num_threads == 0


def test_option_survives_pickling_and_is_checked():
    import pickle

    dp = torch_dp.DataParallel(fresh_net(), cpus(2), reproducible=True)
    assert pickle.loads(pickle.dumps(dp)).reproducible is True
    state = dp.__dict__.copy()
    del state["reproducible"]  # pickled before the option existed
    old = torch_dp.DataParallel.__new__(torch_dp.DataParallel)
    old.__setstate__(state)
    assert old.reproducible is False
    with pytest.raises(TypeError, match="reproducible must be a bool"):
        torch_dp.DataParallel(fresh_net(), cpus(2), reproducible=1)
    with pytest.raises(TypeError, match="reproducible must be a bool"):
        torch_dp.data_parallel(fresh_net(), (inputs(), torch.zeros(12)), cpus(2), reproducible="yes")


# ---- SyncBatchNorm: the replicas run on threads and take turns per device ----------------------------------


@pytest.mark.parametrize("issuing", ["threads", "auto"])
def test_sync_batchnorm_two_runs_are_bitwise_equal(issuing):
    first = run_with_timeout(lambda: run_dp(True, sync=True, issuing=issuing, reproducible=True))
    second = run_with_timeout(lambda: run_dp(False, sync=True, issuing=issuing, reproducible=True))
    assert bitwise_equal(first[0], second[0])
    assert bitwise_equal(first[1], second[1])


def test_sync_batchnorm_still_normalizes_over_the_whole_batch():
    net = fresh_net(sync=True)
    dp = torch_dp.DataParallel(net, cpus(REPLICAS), reproducible=True)
    x = inputs()
    h = torch.relu(net.fc1(x))
    # Dropout off, the rest as in training: batch statistics of all replicas' rows together.
    net.eval()
    net.bn.train()
    out = run_with_timeout(lambda: dp(x, torch.zeros(len(x), dtype=torch.double)))
    want = net.fc2(nn.functional.batch_norm(h, None, None, net.bn.weight, net.bn.bias, training=True))
    torch.testing.assert_close(out, want)


def test_sync_batchnorm_serial_is_still_an_error():
    dp = torch_dp.DataParallel(fresh_net(sync=True), cpus(REPLICAS), issuing="serial", reproducible=True)
    with pytest.raises(RuntimeError, match="issuing='serial'"):
        dp(inputs(), torch.zeros(REPLICAS * ROWS, dtype=torch.double))


class FailsIn(nn.Module):
    """SyncBatchNorm, then a failure in the replica whose rows start with `failing` (before or after the layer)."""

    def __init__(self, failing, before):
        super().__init__()
        self.bn = torch_dp.SyncBatchNorm(2)
        self.failing, self.before = failing, before

    def forward(self, x):
        mine = int(x[0, 0].item()) == self.failing
        if mine and self.before:
            raise KeyError("failed before the rendezvous")
        y = self.bn(x)
        if mine:
            raise KeyError("failed after the rendezvous")
        return y


@pytest.mark.parametrize("failing", [0, 1, 2])
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_sync_batchnorm_a_failing_replica_releases_the_others(failing, before):
    dp = torch_dp.DataParallel(FailsIn(failing, before), cpus(REPLICAS), reproducible=True)
    x = torch.randn(2 * REPLICAS, 2)
    x[:, 0] = torch.arange(REPLICAS).repeat_interleave(2).float()
    with pytest.raises(KeyError, match=f"Caught KeyError in replica {failing} on device cpu"):
        run_with_timeout(lambda: dp(x))


def test_sync_group_turns_follow_index_order_per_device():
    # Replicas 0, 2 on the CPU and 1, 3 on another device: each device's replicas run one at a time, in index
    # order between rendezvous, while the two devices proceed independently.
    from torch_dp.sync_group import SyncGroup

    devices = [torch.device("cpu"), torch.device("meta"), torch.device("cpu", 0), torch.device("meta")]
    group = SyncGroup(len(devices), turns=devices)
    log, lock = [], threading.Lock()

    def replica(i):
        try:
            group.wait_turn(i)
            for call in range(3):
                time.sleep(0.01 * (len(devices) - i))  # the later replicas would otherwise go first
                with lock:
                    log.append((i, call))
                group.exchange("layer", i, torch.zeros(1), 1, lambda stats: torch.zeros(1))
            with lock:
                log.append((i, "end"))
        finally:
            group.finish(i, False)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    cpu = [entry for entry in log if entry[0] in (0, 2)]
    meta = [entry for entry in log if entry[0] in (1, 3)]
    steps = [0, 1, 2, "end"]
    assert cpu == [(i, step) for step in steps for i in (0, 2)]
    assert meta == [(i, step) for step in steps for i in (1, 3)]
