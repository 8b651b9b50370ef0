"""Replicas never run on stale state: every change to ``dp.module`` between two forwards reaches every replica.

torch.nn.DataParallel rebuilds its replicas on every forward, so it cannot miss a change; torch_dp keeps them, so
each kind of change has a test here, on both replica paths: ``cpu3`` (replicas after the first share the
parameters and copy the buffers) and ``cpu3_copies`` (they copy everything, as replicas on other devices do).
Several of these changes move neither a tensor's version counter nor its data pointer (fused optimizers, ``.data``,
the batch-norm op's running statistics, raw pointers), which is why those cannot prove a copy current. The
reference is tests/python/reference.py's ChunkedReference over an independent twin of the model.
"""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
from torch import nn

import torch_dp
from helpers import StatefulNet as Net, cpus
from reference import ChunkedReference, copying

# name: (device_ids, whether every replica but the first copies every tensor)
DEVICE_LISTS = {"cpu3": (cpus(3), False), "cpu3_copies": (cpus(3), True)}
if torch.cuda.is_available():
    DEVICE_LISTS |= {"cuda000": ([0, 0, 0], False), "cuda000_copies": ([0, 0, 0], True)}
SETUPS = list(DEVICE_LISTS)


def device_of(setup: str) -> torch.device:
    return torch.device("cuda", 0) if setup.startswith("cuda") else torch.device("cpu")


def make_net(setup: str = "cpu3") -> Net:
    net = Net().double().to(device_of(setup))
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def wrap(module: nn.Module, setup: str, **options) -> torch_dp.DataParallel:
    device_ids, copies = DEVICE_LISTS[setup]
    dp = torch_dp.DataParallel(module, device_ids, **options)
    return copying(dp) if copies else dp


def randn(setup: str, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.double, device=device_of(setup))


def assert_matches(dp: torch_dp.DataParallel, twin: nn.Module, x: torch.Tensor) -> None:
    torch.testing.assert_close(dp(x), ChunkedReference(twin, 3)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD"])
def test_fused_optimizer_steps_train_like_the_whole_batch(setup, optimizer):
    # torch's fused optimizers update parameters without moving their version counters (Hugging Face Trainer's
    # default optimizer is fused AdamW). BatchNorm in eval mode: whole-batch results equal chunk-wise ones.
    net = make_net(setup).eval()
    reference = copy.deepcopy(net)
    dp = wrap(net, setup)
    options = {"lr": 0.05, "fused": True} | ({"momentum": 0.9} if optimizer == "SGD" else {})
    opt = getattr(torch.optim, optimizer)(net.parameters(), **options)
    reference_opt = getattr(torch.optim, optimizer)(reference.parameters(), **options)
    for _ in range(5):
        x, target = randn(setup, 9, 5), randn(setup, 9, 3)
        for model, o in ((dp, opt), (reference, reference_opt)):
            o.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            o.step()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    x = randn(setup, 9, 5)
    torch.testing.assert_close(dp(x), reference(x), rtol=1e-12, atol=1e-12)


def _data_in_place(net):
    net.bn.running_mean.data.add_(5.0)
    net.fc.weight.data.mul_(2.0)


def _no_grad_in_place(net):
    with torch.no_grad():
        net.head.weight.mul_(-1.0)
        net.offset.add_(1.0)


def _load_state_dict(net):
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    net.load_state_dict(state)


def _copy_from_another_module(net):
    torch.manual_seed(7)
    other = make_net().to(net.fc.weight.device)
    with torch.no_grad():
        for p, q in zip(net.parameters(), other.parameters()):
            p.copy_(q)
        net.bn.running_var.copy_(other.bn.running_var)


def _raw_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over `tensor`'s memory built from its data_ptr() alone, as an extension sees it: no shared version
    counter, no autograd."""
    if tensor.is_cuda:

        class Memory:
            __cuda_array_interface__ = {
                "shape": tuple(tensor.shape),
                "typestr": "<f8",
                "data": (tensor.data_ptr(), False),
                "version": 3,
                "strides": None,
            }

        return torch.as_tensor(Memory(), device=tensor.device)
    memory = (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    return torch.frombuffer(memory, dtype=tensor.dtype).view(tensor.shape)


def _write_through_data_ptr(net):
    # As a CUDA extension's optimizer writes: into the memory, past every counter.
    for tensor in (net.fc.weight, net.bn.running_mean):
        torch.manual_seed(tensor.numel())
        _raw_alias(tensor).copy_(torch.randn_like(tensor))


def _set_(net):
    with torch.no_grad():
        net.fc.bias.set_(torch.full_like(net.fc.bias, 0.25))
        net.bn.running_mean.set_(torch.full_like(net.bn.running_mean, -0.5))


def _swap_data(net):
    net.head.weight.data = torch.full_like(net.head.weight, 0.125)


def _replace_submodule(net):
    torch.manual_seed(3)
    net.head = nn.Linear(6, 3).double().to(net.fc.weight.device)


def _replace_attribute(net):
    net.scale = -2.0


def _recalibrate_batchnorm(net):
    # Test-time adaptation / BatchNorm recalibration: the module itself run in training mode. The batch-norm op
    # updates the running statistics without moving their version counters.
    net.train()
    with torch.no_grad():
        torch.manual_seed(5)
        net(torch.randn(16, 5, dtype=torch.double, device=net.fc.weight.device) * 2 + 1)
    net.eval()


EDITS = [
    _data_in_place,
    _no_grad_in_place,
    _load_state_dict,
    _copy_from_another_module,
    _write_through_data_ptr,
    _set_,
    _swap_data,
    _replace_submodule,
    _replace_attribute,
    _recalibrate_batchnorm,
]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_an_edit_between_forwards_reaches_every_replica(setup, edit, grad):
    net = make_net(setup).eval()
    twin = copy.deepcopy(net)
    dp = wrap(net, setup)
    x = randn(setup, 9, 5)
    with torch.set_grad_enabled(grad):
        assert_matches(dp, twin, x)
        edit(net)
        edit(twin)
        assert_matches(dp, twin, x)


@pytest.mark.parametrize("setup", SETUPS)
def test_two_forwards_then_one_backward(setup):
    # Siamese and contrastive losses: the first forward's graph must survive the second forward's refresh.
    net = make_net(setup).eval()
    twin = copy.deepcopy(net)
    dp = wrap(net, setup)
    x1, x2 = randn(setup, 9, 5), randn(setup, 9, 5)
    (dp(x1) * dp(x2)).sum().backward()
    (twin(x1) * twin(x2)).sum().backward()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("setup", SETUPS)
def test_trust_version_counters_misses_what_moves_no_counter(setup):
    # The opt-in fast path assumes every write moves a version counter; this is the write it misses.
    net = make_net(setup).eval()
    dp = wrap(net, setup, trust_version_counters=True)
    assert dp.trust_version_counters is True
    x = randn(setup, 9, 5)
    with torch.no_grad():
        before = dp(x)
        net.bn.running_mean.data.add_(5.0)
        after = dp(x)
        torch.testing.assert_close(after[:3], net(x[:3]))  # replica 0 is the module itself
        torch.testing.assert_close(after[3:], before[3:])  # the others kept their copies
        assert not torch.allclose(after[3:], net(x[3:]))
        net.bn.running_mean.add_(0.0)  # a write that moves the counter is seen
        torch.testing.assert_close(dp(x), net(x))


def test_trust_version_counters_must_be_a_bool():
    with pytest.raises(TypeError, match="trust_version_counters must be a bool, but got 'yes'"):
        torch_dp.DataParallel(make_net(), cpus(2), trust_version_counters="yes")
