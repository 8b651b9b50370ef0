"""DataParallel.forward_scattered and ParallelCriterion on distinct devices: the outputs stay on the devices that
computed them (ScatteredOutputs.devices are the replicas' devices), the targets are split onto those devices, the
loss runs there, with the class weights held on the first device copied to each, and is reduced on the output
device. Loss, input and parameter gradients over SGD steps equal the unwrapped module's with torch's
CrossEntropyLoss on the whole batch, on the CPU, in float64; lean (torch_dp's cross-entropy keeping only the
logits) and not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_dp
from distinct import assert_gradients_match, cpu
from simulated_devices import NAME

DT = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
CLASSES = 5
ROWS = 11  # uneven chunks over 2, 3 and 4 devices


def sim(index: int) -> torch.device:
    return torch.device(NAME, index)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES)).to(DT)


def class_weights() -> torch.Tensor:
    # Far from uniform, so that a chunk weighted with another device's (or no) weights shows.
    return torch.tensor([0.1, 3.0, 0.5, 2.0, 1.2], dtype=DT)


def targets(rows: int) -> torch.Tensor:
    t = torch.randint(0, CLASSES, (rows,))
    t[torch.rand(rows) < 0.3] = -1  # ignored
    t[1] = 2
    return t


def expected_rows(rows: int, device_ids, chunk_sizes=None) -> list[int]:
    if chunk_sizes is not None:
        return [n for n in chunk_sizes if n > 0]
    return [len(c) for c in torch.chunk(torch.empty(rows), len(device_ids))]


def train_side_by_side(device_ids, reduction, lean, chunk_sizes=None, output_device=None, steps=2):
    """`steps` SGD steps of the module through forward_scattered and a ParallelCriterion, and of its twin on the
    CPU with the whole batch's loss: ScatteredOutputs, loss, gradients and parameters compared at every step."""
    torch.manual_seed(0)
    reference = net()
    source = sim(device_ids[0])
    model = copy.deepcopy(reference).to(source)
    dp = torch_dp.DataParallel(model, device_ids, output_device, chunk_sizes=chunk_sizes)
    weight = class_weights()
    loss = nn.CrossEntropyLoss(weight=weight.to(source), ignore_index=-1, reduction=reduction)
    criterion = torch_dp.ParallelCriterion(loss, lean=lean)
    reference_loss = nn.CrossEntropyLoss(weight=weight, ignore_index=-1, reduction=reduction)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.2)
    rows = sum(chunk_sizes) if chunk_sizes is not None else ROWS
    out_device = source if output_device is None else sim(output_device)
    replica_devices = [sim(i) for i, n in zip(device_ids, chunk_sizes or [1] * len(device_ids)) if n > 0]
    for step in range(steps):
        x_ref = torch.randn(rows, 6, dtype=DT, requires_grad=True)
        x, labels = x_ref.detach().to(source).requires_grad_(), targets(rows)

        outputs = dp.forward_scattered(x)
        assert isinstance(outputs, torch_dp.ScatteredOutputs)
        assert list(outputs.devices) == replica_devices
        assert [o.device for o in outputs] == replica_devices
        assert list(outputs.chunk_sizes) == expected_rows(rows, device_ids, chunk_sizes)
        assert outputs.output_device == out_device
        value = criterion(outputs, labels.to(source))
        assert value.device == out_device

        expected = reference_loss(reference(x_ref), labels)
        torch.testing.assert_close(cpu(value), expected, msg=lambda m, step=step: f"step {step} loss: {m}", **TOL)
        value.backward()
        expected.backward()
        assert_gradients_match(x, x_ref, model, reference, source, step, TOL)
        for o in (optimizer, reference_optimizer):
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(cpu(p), q, **TOL)
    # The loss's weights stay where they were, as they were.
    assert loss.weight.device == source and torch.equal(cpu(loss.weight), weight)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("count", [2, 3, 4])
def test_cross_entropy_on_the_replicas_is_the_whole_batch_loss(count, reduction, lean):
    """Class weights, ignored targets, uneven chunks over 2, 3 and 4 distinct devices."""
    train_side_by_side(list(range(count)), reduction, lean)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "torch"])
def test_module_and_output_on_other_devices(lean):
    """The module (and the loss's weights) on sim:2, the loss reduced on sim:1."""
    train_side_by_side([2, 0, 1, 3], "mean", lean, output_device=1)


def test_a_device_given_no_rows():
    """A device given no rows runs neither a replica nor the loss; the devices of the outputs skip it."""
    train_side_by_side([0, 1, 2, 3], "mean", True, chunk_sizes=[4, 0, 5, 2])


def test_gather_is_the_forward():
    """ScatteredOutputs.gather() is what dp(x) returns, on the output device, bitwise."""
    model = net().to(sim(0))
    dp = torch_dp.DataParallel(model, [0, 1, 2], output_device=2)
    x = torch.randn(ROWS, 6, dtype=DT).to(sim(0))
    scattered = dp.forward_scattered(x)
    gathered, forward = scattered.gather(), dp(x)
    assert gathered.device == forward.device == sim(2)
    assert torch.equal(cpu(gathered), cpu(forward))
    torch.testing.assert_close(cpu(forward), model.cpu()(cpu(x)), **TOL)


def test_the_weights_matter():
    """What a criterion that dropped or misplaced the class weights would give differs from the whole batch's
    weighted loss the tests above compare with, so they would catch it."""
    torch.manual_seed(0)
    reference = net()
    x, labels = torch.randn(ROWS, 6, dtype=DT), targets(ROWS)
    weighted = nn.CrossEntropyLoss(weight=class_weights(), ignore_index=-1)(reference(x), labels)
    unweighted = nn.CrossEntropyLoss(ignore_index=-1)(reference(x), labels)
    assert not torch.allclose(weighted, unweighted, **TOL)
