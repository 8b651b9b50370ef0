"""The state-change contract on distinct devices: whatever changes on `dp.module` between two forwards is seen by
every replica of the next one, including those whose copies live on devices 1..n (coalesced copies on other
devices, refreshed before every forward: Note [Stale copies] in src/coalesced_copies.cpp); and forwards of one
DataParallel from several threads at once, which take turns on its replicas (`_Replicas.lock` in replicate.py), and
a ParallelCriterion on its worker pool meanwhile.

The reference is a deep-copied twin of the module on the CPU, edited in lockstep and run through
tests/python/reference.py's ChunkedReference (torch.nn.DataParallel's semantics by hand: chunk i through the
module, replica 0 updating the buffers). Several of the edits move neither a version counter nor a data pointer
(a fused optimizer, `.data`, the batch-norm op's running statistics), which `trust_version_counters=True` misses,
as documented: the trust_version_counters tests show that, so the contract tests have something to catch.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import torch_dp
from distinct import cpu, sims
from helpers import StatefulNet as Net, run_in_threads
from reference import ChunkedReference

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
COUNTS = [2, 3, 4]
ROWS = 11  # uneven chunks over 2, 3 and 4 devices


def make_net() -> Net:
    net = Net().to(DT)
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def setup(count: int, **options) -> tuple[Net, Net, torch_dp.DataParallel]:
    """The module on sim:0 wrapped over `count` distinct devices, and its twin on the CPU."""
    twin = make_net()
    net = copy.deepcopy(twin).to(sims(1)[0])
    return net, twin, torch_dp.DataParallel(net, sims(count), **options)


def device_of(module: nn.Module) -> torch.device:
    return module.fc.weight.device


def assert_matches(dp: torch_dp.DataParallel, twin: nn.Module, x: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """dp(x) against the chunked reference on the twin: outputs, parameter gradients, buffers afterwards."""
    net = dp.module
    with torch.set_grad_enabled(grad):
        out = dp(x.to(device_of(net)))
        expected = ChunkedReference(twin, len(dp.device_ids))(x)
    assert out.device == device_of(net)
    torch.testing.assert_close(cpu(out), expected, **TOL)
    if grad:
        weights = torch.randn(expected.shape, dtype=DT)
        (out * weights.to(out.device)).sum().backward()
        (expected * weights).sum().backward()
        for (name, p), q in zip(net.named_parameters(), twin.parameters()):
            torch.testing.assert_close(cpu(p.grad), q.grad, msg=lambda m, name=name: f"{name}.grad: {m}", **TOL)
        net.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    for (name, b), c in zip(net.named_buffers(), twin.buffers()):
        torch.testing.assert_close(cpu(b), c, msg=lambda m, name=name: f"buffer {name}: {m}", **TOL)
    return cpu(out.detach())


# ---- edits, applied identically to the module on sim:0 and to its twin on the CPU --------------------------------


def _data_in_place(net):
    # `.data` has a version counter of its own: the tensor's does not move.
    net.bn.running_mean.data.add_(5.0)
    net.fc.weight.data.mul_(2.0)
    net.offset.data.sub_(1.0)


def _fused_adamw_step(net):
    # A fused kernel writes the parameters without moving their version counters. Eval mode: the statistics stay.
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, dtype=DT, generator=generator).to(device_of(net))
    weights = torch.randn(6, 3, dtype=DT, generator=generator).to(device_of(net))
    with torch.enable_grad():
        (net(x) * weights).sum().backward()
    torch.optim.AdamW(net.parameters(), lr=0.1, fused=True).step()
    net.zero_grad(set_to_none=True)


def _load_state_dict(net):
    net.load_state_dict({k: v * 1.5 + 0.25 if v.is_floating_point() else v + 3 for k, v in net.state_dict().items()})


def _replace_submodule(net):
    torch.manual_seed(3)
    net.head = nn.Linear(6, 3).to(DT).to(device_of(net))


def _change_attribute(net):
    net.scale = -2.0


def _train_mode(net):
    net.train()  # BatchNorm then normalizes each chunk with its own statistics, replica 0 updating the module's


def _recalibrate_batchnorm(net):
    # Test-time adaptation: the module itself run in training mode. The batch-norm op moves no version counter.
    generator = torch.Generator().manual_seed(5)
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 5, dtype=DT, generator=generator).to(device_of(net)) * 2 + 1)
    net.eval()


def _swap_data(net):
    generator = torch.Generator().manual_seed(9)
    net.head.weight.data = torch.randn(net.head.weight.shape, dtype=DT, generator=generator).to(device_of(net))
    net.fc.bias.data = torch.randn(net.fc.bias.shape, dtype=DT, generator=generator).to(device_of(net))


EDITS = [
    _data_in_place,
    _fused_adamw_step,
    _load_state_dict,
    _replace_submodule,
    _change_attribute,
    _train_mode,
    _recalibrate_batchnorm,
    _swap_data,
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("count", COUNTS)
def test_an_edit_between_forwards_reaches_every_device(count, edit):
    """One edit after a forward has cached every device's copies: the next forward (and its gradients) is the
    edited twin's, on every device."""
    net, twin, dp = setup(count)
    x = torch.randn(ROWS, 5, dtype=DT)
    before = assert_matches(dp, twin, x)
    edit(net)
    edit(twin)
    after = assert_matches(dp, twin, x)
    assert not torch.allclose(after, before)  # the edit changed what every forward computes


@pytest.mark.parametrize("count", COUNTS)
def test_a_forward_hook_added_then_removed(count):
    """A hook registered on a submodule of dp.module runs in every replica of the next forward, and no longer
    once removed."""
    net, twin, dp = setup(count)
    x = torch.randn(ROWS, 5, dtype=DT)
    plain = assert_matches(dp, twin, x)
    handles = [m.fc.register_forward_hook(lambda module, args, out: out * -3.0) for m in (net, twin)]
    hooked = assert_matches(dp, twin, x)
    assert not torch.allclose(hooked, plain)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(assert_matches(dp, twin, x), plain, **TOL)


def test_every_edit_in_a_row_on_four_devices():
    """All the edits one after another, with forwards with and without grad between them, back to eval mode."""
    net, twin, dp = setup(4)
    for i, edit in enumerate(EDITS + [lambda m: m.eval()]):
        edit(net)
        edit(twin)
        assert_matches(dp, twin, torch.randn(ROWS, 5, dtype=DT), grad=i % 2 == 0)
        assert_matches(dp, twin, torch.randn(ROWS - 2, 5, dtype=DT), grad=i % 2 == 1)


# ---- trust_version_counters=True: documented to miss writes that move no counter --------------------------------

MISSED = [_fused_adamw_step, _data_in_place, _recalibrate_batchnorm]


@pytest.mark.parametrize("edit", MISSED, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("count", [2, 4])
def test_trust_version_counters_misses_writes_that_move_no_counter(count, edit):
    """With the opt-in, copies on devices 1..n keep their old values after such a write: replica 0 (the module
    itself) sees it, the others compute what they computed before. A write that moves the counters is seen."""
    net, twin, dp = setup(count, trust_version_counters=True)
    x = torch.randn(ROWS, 5, dtype=DT)
    with torch.no_grad():
        before = cpu(dp(x.to(device_of(net))))
        edit(net)
        edit(twin)
        after = cpu(dp(x.to(device_of(net))))
        rows = len(x.chunk(count)[0])
        expected = twin(x)  # eval mode: the whole batch's result is the chunks'
        torch.testing.assert_close(after[:rows], expected[:rows], **TOL)
        torch.testing.assert_close(after[rows:], before[rows:], rtol=0, atol=0)  # stale copies
        assert not torch.allclose(after[rows:], expected[rows:])
        for tensor in [*net.parameters(), *net.buffers()]:
            tensor.add_(0)  # moves every counter
        torch.testing.assert_close(cpu(dp(x.to(device_of(net)))), expected, **TOL)


@pytest.mark.parametrize("edit", MISSED, ids=lambda f: f.__name__.strip("_"))
def test_the_same_writes_are_seen_by_default(edit):
    """The twin of the test above without the opt-in: the same forwards see the write on every device."""
    net, twin, dp = setup(4)
    x = torch.randn(ROWS, 5, dtype=DT)
    with torch.no_grad():
        dp(x.to(device_of(net)))
        edit(net)
        edit(twin)
        torch.testing.assert_close(cpu(dp(x.to(device_of(net)))), twin(x), **TOL)


# ---- several threads at once on one DataParallel -----------------------------------------------------------------

THREADS, ITERATIONS = 4, 4


@pytest.mark.parametrize("count", COUNTS)
def test_forwards_from_several_threads_at_once(count):
    """Threads calling one DataParallel at once (one forward at a time on its replicas; the loss's tasks sharing
    its worker pool meanwhile) each get their own batch's outputs and gradients: each thread's batch has another
    size, so a chunk handed to the wrong forward would show. Thread 0 runs forward_scattered and a
    ParallelCriterion instead of the forward."""
    net, twin, dp = setup(count)
    params = list(net.parameters())
    batches = [torch.randn(ROWS + t, 5, dtype=DT) for t in range(THREADS)]
    labels = torch.randint(0, 3, (ROWS,))
    criterion = torch_dp.ParallelCriterion(nn.CrossEntropyLoss())
    results: dict[int, list] = {t: [] for t in range(THREADS)}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t):
        try:
            x = batches[t].to(device_of(net))
            start.wait()
            for _ in range(ITERATIONS):
                if t == 0:
                    scattered = dp.forward_scattered(x)
                    out, loss = scattered.gather(), criterion(scattered, labels.to(device_of(net)))
                else:
                    out = dp(x)
                    loss = out.square().sum()
                results[t].append(cpu((out.detach(), torch.autograd.grad(loss, params))))
        except BaseException as error:  # noqa: B902 - reported below
            errors.append(error)

    run_in_threads(work, THREADS)
    assert errors == []
    for t, x in enumerate(batches):
        expected = twin(x)  # eval mode: the whole batch's result is the chunks'
        loss = nn.functional.cross_entropy(expected, labels) if t == 0 else expected.square().sum()
        expected_grads = torch.autograd.grad(loss, list(twin.parameters()))
        assert len(results[t]) == ITERATIONS
        for out, grads in results[t]:
            torch.testing.assert_close(out, expected.detach(), **TOL)
            for grad, expected_grad in zip(grads, expected_grads):
                torch.testing.assert_close(grad, expected_grad, **TOL)
