"""torch_dp.parallel_apply: ordering, argument forms, exceptions, and thread-local state reaching the replicas."""

import threading

import pytest
import torch
from torch import nn

import torch_dp
from helpers import cpus


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x, shift=0.0):
        return x * self.factor + shift


class Fails(nn.Module):
    def __init__(self, error=None):
        super().__init__()
        self.error = error
        self.ran = False

    def forward(self, x):
        self.ran = True
        if self.error is not None:
            raise self.error
        return x + 1


class Probe(nn.Module):
    """Reports the thread-local state its forward runs under."""

    def forward(self, x):
        return {
            "grad": torch.is_grad_enabled(),
            "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "dtype": torch.get_autocast_dtype("cpu"),
            "matmul_dtype": (x @ x.t()).dtype,
        }


def probe(n=3):
    return torch_dp.parallel_apply([Probe()] * n, [(torch.randn(2, 2),) for _ in range(n)], None, cpus(n))


# ---- results and arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_results_in_order(n):
    modules = [Scale(i + 1) for i in range(n)]
    inputs = [(torch.randn(3),) for _ in range(n)]
    results = torch_dp.parallel_apply(modules, inputs, None, cpus(n))
    assert isinstance(results, list) and len(results) == n
    for i, (result, (x,)) in enumerate(zip(results, inputs)):
        torch.testing.assert_close(result, x * (i + 1), rtol=0, atol=0)


def test_kwargs_and_lone_tensors():
    x = torch.randn(4, 3)  # a lone tensor is one argument, not a sequence to unpack
    results = torch_dp.parallel_apply([Scale(2), Scale(3)], [x, x], [{"shift": 1.0}, {}])
    torch.testing.assert_close(results[0], x * 2 + 1, rtol=0, atol=0)
    torch.testing.assert_close(results[1], x * 3, rtol=0, atol=0)


def test_devices_default_to_the_inputs_device():
    results = torch_dp.parallel_apply([Scale(1), Scale(1)], [(torch.ones(1),), (torch.ones(2),)])
    assert [r.device for r in results] == [torch.device("cpu")] * 2


def test_no_modules():
    assert torch_dp.parallel_apply([], []) == []


def test_length_mismatches_raise():
    with pytest.raises(ValueError, match="number of modules 2 is not equal to the number of inputs 1"):
        torch_dp.parallel_apply([Scale(1), Scale(1)], [(torch.ones(1),)])
    with pytest.raises(ValueError, match="number of kwargs_tup 1"):
        torch_dp.parallel_apply([Scale(1), Scale(1)], [(torch.ones(1),)] * 2, [{}])
    with pytest.raises(ValueError, match="number of devices 3"):
        torch_dp.parallel_apply([Scale(1), Scale(1)], [(torch.ones(1),)] * 2, None, cpus(3))


def test_replicas_run_concurrently():
    # Every replica waits for all the others: this only finishes if they run at the same time.
    n = 4
    barrier = threading.Barrier(n, timeout=30)

    class Meet(nn.Module):
        def forward(self, x):
            barrier.wait()
            return threading.get_ident()

    idents = torch_dp.parallel_apply([Meet()] * n, [(torch.ones(1),)] * n, None, cpus(n))
    assert len(set(idents)) == n
    assert not barrier.broken


# ---- exceptions ----------------------------------------------------------------------------------------------


def test_exception_is_reraised_with_replica_and_traceback():
    modules = [Fails(), Fails(KeyError("wonderful")), Fails()]
    expected = r"Caught KeyError in replica 1 on device cpu\.\nOriginal Traceback[\s\S]+wonderful"
    with pytest.raises(KeyError, match=expected):
        torch_dp.parallel_apply(modules, [(torch.randn(2),)] * 3, None, cpus(3))
    assert all(m.ran for m in modules)  # every replica ran to the end before the re-raise


def test_the_first_failing_replica_wins():
    modules = [Fails(), Fails(ValueError("second")), Fails(), Fails(KeyError("fourth"))]
    expected = r"Caught ValueError in replica 1 on device cpu\.\nOriginal Traceback[\s\S]+second"
    with pytest.raises(ValueError, match=expected):
        torch_dp.parallel_apply(modules, [(torch.randn(2),)] * 4, None, cpus(4))
    modules = [Fails(), Fails(), Fails(TypeError("third")), Fails(KeyError("fourth"))]
    with pytest.raises(TypeError, match=r"replica 2 on device cpu\.[\s\S]+third"):
        torch_dp.parallel_apply(modules, [(torch.randn(2),)] * 4, None, cpus(4))


def test_exception_from_replica_zero_and_from_a_single_replica():
    with pytest.raises(RuntimeError, match=r"Caught RuntimeError in replica 0 on device cpu\.[\s\S]+first"):
        torch_dp.parallel_apply([Fails(RuntimeError("first")), Fails()], [(torch.randn(2),)] * 2)
    with pytest.raises(RuntimeError, match=r"Caught RuntimeError in replica 0 on device cpu\.[\s\S]+alone"):
        torch_dp.parallel_apply([Fails(RuntimeError("alone"))], [(torch.randn(2),)])


def test_exception_that_cannot_be_rebuilt_from_a_message_becomes_runtime_error():
    class NeedsTwo(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    with pytest.raises(RuntimeError, match=r"Caught NeedsTwo in replica 1 on device cpu\.[\s\S]+left and right"):
        torch_dp.parallel_apply([Fails(), Fails(NeedsTwo("left", "right"))], [(torch.randn(2),)] * 2)


def test_workers_keep_working_after_an_exception():
    x = torch.randn(3)
    for _ in range(3):
        with pytest.raises(ZeroDivisionError, match="replica 2"):
            torch_dp.parallel_apply([Fails(), Fails(), Fails(ZeroDivisionError("zero"))], [(x,)] * 3)
        results = torch_dp.parallel_apply([Fails(), Fails(), Fails()], [(x,)] * 3)
        for result in results:
            torch.testing.assert_close(result, x + 1, rtol=0, atol=0)


# ---- thread-local state --------------------------------------------------------------------------------------


def test_default_state_reaches_replicas():
    for state in probe():
        assert state["grad"] is True and state["inference"] is False and state["autocast"] is False
        assert state["matmul_dtype"] == torch.float32


def test_no_grad_reaches_replicas():
    with torch.no_grad():
        states = probe()
    assert [s["grad"] for s in states] == [False] * 3
    assert [s["grad"] for s in probe()] == [True] * 3  # and does not stick to the workers


def test_inference_mode_reaches_replicas():
    with torch.inference_mode():
        states = probe()
    assert [(s["inference"], s["grad"]) for s in states] == [(True, False)] * 3
    assert [s["inference"] for s in probe()] == [False] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_its_dtype_reach_replicas(dtype):
    with torch.autocast("cpu", dtype=dtype):
        states = probe()
    for state in states:
        assert state["autocast"] is True
        assert state["dtype"] == dtype
        assert state["matmul_dtype"] == dtype
    assert [s["autocast"] for s in probe()] == [False] * 3


@pytest.mark.parametrize("n", [1, 3])
def test_state_changed_inside_a_replica_does_not_leak(n):
    # Replica 0 runs on the calling thread: what its forward changes must not stick to the caller.
    class ChangesState(nn.Module):
        def forward(self, x):
            torch.set_grad_enabled(False)
            torch.set_autocast_enabled("cpu", True)
            return x

    torch_dp.parallel_apply([ChangesState()] * n, [(torch.randn(1),)] * n)
    assert torch.is_grad_enabled()
    assert not torch.is_autocast_enabled("cpu")
    assert [(s["grad"], s["autocast"]) for s in probe()] == [(True, False)] * 3


@pytest.mark.cuda
def test_replicas_run_on_the_callers_current_stream_and_their_device():
    seen = []
    lock = threading.Lock()

    class Probe(nn.Module):
        def forward(self, x):
            with lock:
                seen.append((torch.cuda.current_stream(), torch.cuda.current_device(), x.device))
            return x * 2

    stream = torch.cuda.Stream()
    dp = torch_dp.DataParallel(Probe(), device_ids=[0, 0])
    x = torch.randn(8, 3, device="cuda")
    with torch.cuda.stream(stream):
        out = dp(x)
    torch.cuda.synchronize()
    assert len(seen) == 2
    for replica_stream, device, input_device in seen:
        assert replica_stream == stream
        assert device == 0 and input_device == torch.device("cuda", 0)
    torch.testing.assert_close(out, x * 2)
    # Outside the `with`, the default stream again.
    seen.clear()
    dp(x)
    assert all(s == torch.cuda.default_stream(0) for s, _, _ in seen)


@pytest.mark.cuda
def test_cpu_input_scattered_to_the_gpu_replicas():
    model = nn.Linear(4, 3).cuda()
    dp = torch_dp.DataParallel(model, device_ids=[0, 0])
    x = torch.randn(6, 4)
    out = dp(x)
    assert out.device == torch.device("cuda", 0)
    torch.testing.assert_close(out, model(x.cuda()))
