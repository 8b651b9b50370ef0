"""The simulated accelerator as PyTorch's Python API sees it: the accelerator torch reports, its device module
(torch.sim), generators per device, pinned memory, autocast, and its refusal of ops mixing devices. Its stream,
copy and memory rules are tested in C++ (tests/simulated_devices/cpp/test_streams.cpp)."""

import copy

import pytest
import torch
import torch.nn as nn
from torch._utils import _get_all_device_indices, _get_available_device_type

import simulated_devices


def test_it_is_the_accelerator_torch_reports():
    assert _get_available_device_type() == simulated_devices.NAME
    assert torch.accelerator.current_accelerator() == torch.device(simulated_devices.NAME)
    assert _get_all_device_indices() == list(range(torch.sim.device_count()))
    assert torch.sim.device_count() == 4  # TORCH_DP_SIM_DEVICES' default


def test_current_device_per_thread_and_as_a_context():
    assert torch.sim.current_device() == 0
    with torch.sim.device(2):
        assert torch.empty(1, device="sim").device == torch.device("sim", 2)
    assert torch.sim.current_device() == 0
    with pytest.raises(RuntimeError, match="device index 7 is out of range: there are 4 devices"):
        torch.ones(1, device="sim:7")


def test_generators_per_device():
    torch.manual_seed(3)  # seeds every device's generator too, as it does CUDA's
    on_1 = torch.randn(5, device="sim:1").cpu()
    torch.manual_seed(3)
    on_0 = torch.randn(5, device="sim:0").cpu()
    assert torch.equal(on_0, on_1)  # same seed, same sequence
    assert torch.equal(torch.randn(5, device="sim:1").cpu(), on_1)  # device 0's draw left device 1 where it was
    state = torch.sim.get_rng_state(2)
    first = torch.rand(4, device="sim:2").cpu()
    torch.sim.set_rng_state(state, 2)
    assert torch.equal(torch.rand(4, device="sim:2").cpu(), first)
    generator = torch.Generator(device="sim:3").manual_seed(11)
    again = torch.Generator(device="sim:3").manual_seed(11)
    assert torch.equal(
        torch.randn(3, device="sim:3", generator=generator).cpu(), torch.randn(3, device="sim:3", generator=again).cpu()
    )
    with pytest.raises(RuntimeError, match="was given a generator of device sim:3"):
        torch.randn(3, device="sim:1", generator=generator)


def test_pinned_memory_and_non_blocking_copies():
    host = torch.randn(6).pin_memory()
    assert host.is_pinned()
    device = host.to("sim:1", non_blocking=True)
    back = torch.empty(6).pin_memory()
    back.copy_(device, non_blocking=True)
    torch.sim.synchronize(1)
    assert torch.equal(back, host)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_matrix_products_in_lower_precision(dtype):
    assert dtype in torch.sim.get_amp_supported_dtype()
    lin = nn.Linear(4, 3).to("sim:1")
    x = torch.randn(2, 4, device="sim:1")
    with torch.autocast("sim", dtype=dtype):
        out = lin(x)
        assert torch.is_autocast_enabled("sim")
    assert out.dtype == dtype
    expected = nn.functional.linear(x.cpu().to(dtype), lin.weight.cpu().to(dtype), lin.bias.cpu().to(dtype))
    torch.testing.assert_close(out.cpu(), expected)


def test_ops_mixing_devices_are_refused():
    a, b = torch.ones(2, 2, device="sim:0"), torch.ones(2, 2, device="sim:1")
    with pytest.raises(RuntimeError, match="'self' is on sim:0 and 'mat2' is on sim:1"):
        a @ b
    with pytest.raises(RuntimeError, match="on sim:0 and 'tensors' is on sim:1"):
        torch.cat([a, b])
    with pytest.raises(RuntimeError, match="index_select expects every tensor on one device"):
        a.index_select(0, torch.tensor([0, 1], device="sim:1"))


def test_an_error_of_queued_work_is_raised_by_the_next_synchronization():
    x = torch.arange(4.0, device="sim:1")
    x.index_select(0, torch.tensor([0, 9], device="sim:1"))  # the index is checked by the kernel, on the stream
    with pytest.raises(IndexError, match="out of range"):  # the kernel's own error, raised on the host
        torch.sim.synchronize(1)
    torch.sim.synchronize(1)  # reported once


def test_module_on_a_device_matches_the_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.double)
    model(x)  # materializes the lazy layer
    on_device = copy.deepcopy(model).to("sim:2")
    out, expected = on_device(x.to("sim:2")), model(x)
    torch.testing.assert_close(out.cpu(), expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for p, q in zip(on_device.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad)
    for p, q in zip(on_device.buffers(), model.buffers()):
        torch.testing.assert_close(p.cpu(), q)
