"""torch_dp.DataParallel and torch_dp.data_parallel on 2, 3 and 4 distinct simulated devices, against references
that use none of torch_dp's code: the unwrapped module on the CPU (the whole batch at once for models without
BatchNorm, whose rows are independent) or torch.nn.DataParallel's semantics by hand (ChunkedReference: chunk 0
through the module, which keeps its BatchNorm updates, the other chunks through copies of its buffers). Float64,
tight tolerances.

What tests/simulated_devices/python/test_distinct_parity.py (test_parity's cases, SGD only, inputs and outputs on
the first device) leaves out: fused and foreach optimizers, chunk_sizes with zeros, output_device elsewhere, inputs
on other devices, dim=1, the functional form, forwards under inference_mode, errors raised before anything ran,
torch.nn.DataParallel itself on these devices, and TorchScript modules."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import torch_dp
from distinct import cpu, sims
from reference import ChunkedReference

SIM = sims(1)[0].type
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _sim(index: int) -> torch.device:
    return torch.device(SIM, index)


# ---- models -------------------------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    """Rows independent of each other: the whole batch at once is the reference."""
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


class ConvBN(nn.Module):
    """BatchNorm in training mode: outputs depend on the chunk, replica 0's running statistics are kept."""

    def __init__(self) -> None:
        super().__init__()
        # No bias before BatchNorm, which removes it: its gradient would be rounding noise only, which Adam's
        # step (g / sqrt(v)) turns into updates of either sign.
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def _conv_bn() -> nn.Module:
    return ConvBN().double()


MODELS = {"mlp": (_mlp, (6,)), "convbn": (_conv_bn, (3, 5, 5))}


class Nested(nn.Module):
    """Nested positional and keyword inputs, a float and None among them, and nested outputs. Rows along the
    split dim are independent, those along `mix_dim` are mixed: a split along any other dim than the one asked
    for gives other values than the whole batch."""

    def __init__(self, mix_dim: int) -> None:
        super().__init__()
        self.mix_dim = mix_dim
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, pair, scale, *, extra=None, offsets=(), unused=None):
        assert unused is None
        x, (y,) = pair
        h = self.a(x) * scale + self.b(y)
        if extra is not None:
            h = h + extra["shift"]
        for offset in offsets:
            h = h + offset
        h = h + h.mean(self.mix_dim, keepdim=True).tanh()
        return {"sum": h, "parts": (h.tanh(), [h * 2, None])}


# ---- harness ------------------------------------------------------------------------------------------------


def _assert_close(actual: Any, expected: Any, what: str) -> None:
    """Same structure, dtypes and shapes, values equal to TOL (actual copied to the CPU first)."""
    a_leaves, a_spec = pytree.tree_flatten(cpu(actual))
    e_leaves, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"{what}: structure {a_spec} != {e_spec}"
    for a, e in zip(a_leaves, e_leaves):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, msg=lambda m: f"{what}: {m}", **TOL)
        else:
            assert a == e, what


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


def _split_reference(module: nn.Module, sizes: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch.nn.DataParallel's semantics for given rows per device, by hand: the non-empty chunks in order, the
    first through `module` (keeping its buffer updates), the others through copies of its buffers."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for i, chunk in enumerate(c for c in torch.split(x, sizes) if c.size(0) > 0):
            if i == 0:
                outputs.append(module(chunk))
            else:
                buffers = {name: b.clone() for name, b in module.named_buffers()}
                outputs.append(torch.func.functional_call(module, buffers, (chunk,)))
        return torch.cat(outputs)

    return forward


def _train_side_by_side(
    ours: Callable[[torch.Tensor], torch.Tensor],
    ours_module: nn.Module,
    reference: Callable[[torch.Tensor], torch.Tensor],
    ref_module: nn.Module,
    shape: tuple[int, ...],
    *,
    input_device: torch.device,
    output_device: torch.device,
    make_optimizer: Callable[..., torch.optim.Optimizer] = lambda p, **_: torch.optim.SGD(p, lr=0.1),
    steps: int = 3,
) -> None:
    """`steps` training steps of both sides on the same fresh batches (a sum loss); after each, the outputs (and
    where ours are), the input gradients (and where they are: the input's device), the parameter gradients
    and the buffers; at the end the parameters. ours_module's optimizer is the one under test; the reference's
    is torch's plain for-loop implementation of the same algorithm."""
    ours_opt = make_optimizer(ours_module.parameters())
    ref_opt = make_optimizer(ref_module.parameters(), plain=True)
    for step in range(steps):
        x = torch.randn(*shape, dtype=torch.double)
        x_ours = x.to(input_device, copy=True).requires_grad_()
        x_ref = x.requires_grad_()
        out, expected = ours(x_ours), reference(x_ref)
        assert out.device == output_device, f"step {step}: output on {out.device}, expected {output_device}"
        _assert_close(out, expected, f"step {step} outputs")
        ours_opt.zero_grad()
        ref_opt.zero_grad()
        out.pow(2).sum().backward()
        expected.pow(2).sum().backward()
        assert x_ours.grad.device == input_device, f"step {step}: input gradient on {x_ours.grad.device}"
        _assert_close(x_ours.grad, x_ref.grad, f"step {step} input gradient")
        _assert_close(_grads(ours_module), _grads(ref_module), f"step {step} parameter gradients")
        ours_opt.step()
        ref_opt.step()
        _assert_close(list(ours_module.buffers()), list(ref_module.buffers()), f"step {step} buffers")
    _assert_close(list(ours_module.parameters()), list(ref_module.parameters()), "parameters after the steps")


def _make_model(kind: str, device: torch.device) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(the model on `device`, its twin on the CPU, one row's shape)."""
    make, row = MODELS[kind]
    twin = make()
    return copy.deepcopy(twin).to(device), twin, row


def _whole_or_chunked(kind: str, twin: nn.Module, replicas: int) -> Callable:
    """The reference for `replicas` even chunks: the whole batch for the MLP, ChunkedReference with BatchNorm."""
    return twin if kind == "mlp" else ChunkedReference(twin, replicas)


# ---- 1. optimizers ------------------------------------------------------------------------------------------


def _sgd_foreach(params, plain: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=not plain)


def _adamw_fused(params, plain: bool = False) -> torch.optim.Optimizer:
    return (
        torch.optim.AdamW(params, lr=0.01, foreach=False) if plain else torch.optim.AdamW(params, lr=0.01, fused=True)
    )


def _adamw_foreach(params, plain: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, foreach=not plain)


OPTIMIZERS = {"sgd_foreach": _sgd_foreach, "adamw_fused": _adamw_fused, "adamw_foreach": _adamw_foreach}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("n", [2, 3, 4])
def test_training_with_optimizers_matches_the_unwrapped_model(n, kind, optimizer):
    """Three steps of SGD(foreach), AdamW(fused) and AdamW(foreach) on the module on sim:0: outputs, gradients,
    BatchNorm statistics and parameters equal the unwrapped twin's on the CPU. Fused steps move no version
    counter, so this also proves the copies on devices 1..n-1 are refreshed from what the optimizer wrote."""
    module, twin, row = _make_model(kind, _sim(0))
    dp = torch_dp.DataParallel(module, sims(n))
    _train_side_by_side(
        dp,
        module,
        _whole_or_chunked(kind, twin, n),
        twin,
        (4 * n + 1, *row),  # uneven chunks
        input_device=_sim(0),
        output_device=_sim(0),
        make_optimizer=OPTIMIZERS[optimizer],
    )


# ---- 2. chunk_sizes with zeros, batches smaller than the device count ------------------------------------


@pytest.mark.parametrize(
    "n,chunk_sizes,rows,input_device",
    [
        (4, [3, 0, 5, 2], 10, 0),
        (4, [3, 0, 5, 2], 10, 1),  # the input on a device that runs no replica
        (2, [4, 0], 4, 0),
        (2, [4, 0], 4, 1),
        (3, [2, 3, 0], 5, 0),
        (4, [1, 0, 0, 3], 4, 2),
        (4, None, 2, 0),  # 2 chunks of 1 row: devices 2 and 3 run nothing
        (4, None, 2, 3),
        (3, None, 2, 0),
        (2, None, 1, 0),
    ],
    ids=[
        "4dev_3-0-5-2",
        "4dev_3-0-5-2_input_on_1",
        "2dev_4-0",
        "2dev_4-0_input_on_1",
        "3dev_2-3-0",
        "4dev_1-0-0-3_input_on_2",
        "4dev_2rows",
        "4dev_2rows_input_on_3",
        "3dev_2rows",
        "2dev_1row",
    ],
)
def test_empty_chunks_and_small_batches(n, chunk_sizes, rows, input_device):
    """A device given no rows (a chunk_sizes entry of 0, or a batch smaller than the device count) runs no
    replica, even when the input is on it: outputs, gradients and BatchNorm statistics are those of the
    non-empty chunks, replica 0's statistics kept."""
    module, twin, row = _make_model("convbn", _sim(0))
    dp = torch_dp.DataParallel(module, sims(n), chunk_sizes=chunk_sizes)
    sizes = chunk_sizes or [len(c) for c in torch.chunk(torch.empty(rows), n)]
    _train_side_by_side(
        dp,
        module,
        _split_reference(twin, sizes),
        twin,
        (rows, *row),
        input_device=_sim(input_device),
        output_device=_sim(0),
    )


# ---- 3. output_device -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,output_device,expected",
    [(3, 2, _sim(2)), (2, 1, _sim(1)), (4, _sim(3), _sim(3)), (4, 1, _sim(1)), (2, "cpu", torch.device("cpu"))]
    + [(3, "cpu", torch.device("cpu")), (4, torch.device("cpu"), torch.device("cpu")), (2, 3, _sim(3))],
    ids=["3dev_out2", "2dev_out1", "4dev_out3", "4dev_out1", "2dev_cpu", "3dev_cpu", "4dev_cpu_device", "2dev_out3"],
)
def test_output_device_other_than_the_first(n, output_device, expected):
    """output_device on another device than the module's (listed or not, as upstream allows), or the CPU: the
    result is there, with the unwrapped model's values, and its gradient flows back to the input and the
    parameters on sim:0."""
    module, twin, row = _make_model("convbn", _sim(0))
    dp = torch_dp.DataParallel(module, sims(n), output_device=output_device)
    _train_side_by_side(
        dp,
        module,
        ChunkedReference(twin, n),
        twin,
        (3 * n, *row),
        input_device=_sim(0),
        output_device=expected,
    )
    assert all(p.grad.device == _sim(0) for p in module.parameters())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("n", [2, 4])
def test_forwards_without_autograd_then_training(n, mode):
    """Forwards under no_grad or inference_mode (inputs from the CPU, the result on the last device), then a
    training step: the same outputs and BatchNorm statistics as the twin, and the training step is unaffected.
    (Copies to and between devices inside inference_mode once failed on the simulated device's stream threads.)"""
    module, twin, row = _make_model("convbn", _sim(0))
    dp = torch_dp.DataParallel(module, sims(n), output_device=n - 1)
    reference = ChunkedReference(twin, n)
    for _ in range(2):
        x = torch.randn(2 * n + 1, *row, dtype=torch.double)
        with getattr(torch, mode)():
            out, expected = dp(x), reference(x)
        assert out.device == _sim(n - 1) and not out.requires_grad
        _assert_close(out, expected, f"{mode} outputs")
        _assert_close(list(module.buffers()), list(twin.buffers()), f"buffers after {mode}")
    _train_side_by_side(
        dp, module, reference, twin, (3 * n, *row), input_device=_sim(0), output_device=_sim(n - 1), steps=1
    )


# ---- 4. where the inputs are ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,input_device",
    [(3, "cpu"), (3, _sim(0)), (3, _sim(1)), (3, _sim(3)), (2, _sim(2)), (4, "cpu"), (4, _sim(2))],
    ids=["3dev_cpu", "3dev_first", "3dev_second", "3dev_unlisted3", "2dev_unlisted2", "4dev_cpu", "4dev_third"],
)
def test_inputs_on_any_device(n, input_device):
    """Inputs on the CPU, on the first device, on another listed device, or on a device not in device_ids are
    scattered from where they are (as torch.nn.DataParallel's Scatter copies from the input's device): correct
    outputs on output_device, and the input gradient back on the input's own device."""
    input_device = torch.device(input_device)
    module, twin, row = _make_model("convbn", _sim(0))
    dp = torch_dp.DataParallel(module, sims(n))
    _train_side_by_side(
        dp,
        module,
        ChunkedReference(twin, n),
        twin,
        (2 * n + 1, *row),
        input_device=input_device,
        output_device=_sim(0),
    )


# ---- 5. dim=1, nested and keyword inputs ------------------------------------------------------------------


def _nested_inputs(batch: int, dim: int, devices: list[torch.device]) -> tuple[tuple, dict]:
    """Nested positional and keyword inputs of `batch` rows along `dim`, each leaf on the next of `devices`."""
    where = iter(devices * 3)

    def leaf(features: int) -> torch.Tensor:
        shape = [2, 2]
        shape[dim] = batch
        return torch.randn(*shape, features, dtype=torch.double, device=next(where)).requires_grad_()

    pair = (leaf(6), [leaf(3)])
    return (pair, 0.5), {"extra": {"shift": leaf(4)}, "offsets": [leaf(4), leaf(4)], "unused": None}


def _nested_side_by_side(dp: Callable, module: nn.Module, twin: nn.Module, args: tuple, kwargs: dict) -> Any:
    """dp(*args, **kwargs) against the twin on CPU copies of the inputs: outputs, the gradients of every input
    leaf (on its own device) and of the parameters, for a sum-of-squares loss over the output leaves."""
    ref_args, ref_kwargs = pytree.tree_map(
        lambda x: x.detach().cpu().requires_grad_() if isinstance(x, torch.Tensor) else x, (args, kwargs)
    )
    out = dp(*args, **kwargs)
    expected = twin(*ref_args, **ref_kwargs)
    _assert_close(out, expected, "outputs")
    for tree in (out, expected):
        sum(t.pow(2).sum() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)).backward()
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    ref_leaves = [x for x in pytree.tree_leaves((ref_args, ref_kwargs)) if isinstance(x, torch.Tensor)]
    assert all(x.grad.device == x.device for x in leaves)
    _assert_close([x.grad for x in leaves], [x.grad for x in ref_leaves], "input gradients")
    _assert_close(_grads(module), _grads(twin), "parameter gradients")
    return out


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_nested_keyword_inputs_along_dim(n, dim):
    """Tuples, lists, dicts, a float and None as positional and keyword arguments, split along dim (uneven
    chunks), the leaves on different devices: the output keeps its dict/tuple/list/None structure, is gathered
    along dim on output_device, and equals the whole batch through the unwrapped model; every input leaf gets
    its gradient on its own device."""
    module = Nested(mix_dim=1 - dim).double()
    twin = copy.deepcopy(module)
    dp = torch_dp.DataParallel(module.to(_sim(0)), sims(n), output_device=n - 1, dim=dim)
    args, kwargs = _nested_inputs(2 * n + 1, dim, [_sim(0), torch.device("cpu"), _sim(n - 1)])
    out = _nested_side_by_side(dp, module, twin, args, kwargs)
    assert isinstance(out, dict) and isinstance(out["parts"], tuple) and isinstance(out["parts"][1], list)
    assert out["parts"][1][1] is None
    assert all(t.device == _sim(n - 1) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


@pytest.mark.parametrize(
    "n,chunk_sizes", [(4, [3, 0, 5, 1]), (3, [1, 0, 8]), (2, [9, 0])], ids=["4dev_3-0-5-1", "3dev_1-0-8", "2dev_9-0"]
)
def test_chunk_sizes_with_nested_keyword_inputs_along_dim_1(n, chunk_sizes):
    """chunk_sizes with zeros split every nested positional and keyword tensor along dim 1 into those rows:
    the structure and values of the whole batch through the unwrapped model, gathered on the CPU, gradients to
    every input leaf."""
    module = Nested(mix_dim=0).double()
    twin = copy.deepcopy(module)
    dp = torch_dp.DataParallel(module.to(_sim(0)), sims(n), output_device="cpu", dim=1, chunk_sizes=chunk_sizes)
    args, kwargs = _nested_inputs(sum(chunk_sizes), 1, [_sim(n - 1), _sim(0)])
    out = _nested_side_by_side(dp, module, twin, args, kwargs)
    assert all(t.device.type == "cpu" for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


# ---- 6. the functional form -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,output_device,expected",
    [(2, None, _sim(0)), (3, 2, _sim(2)), (4, None, _sim(0)), (4, "cpu", torch.device("cpu"))],
    ids=["2dev", "3dev_out2", "4dev", "4dev_cpu"],
)
def test_functional_data_parallel(n, output_device, expected):
    """torch_dp.data_parallel(module, x, device_ids, output_device) over several training steps: the
    torch.nn.DataParallel semantics by hand (BatchNorm statistics of chunk 0 kept), the result on output_device."""
    module, twin, row = _make_model("convbn", _sim(0))

    def ours(x: torch.Tensor) -> torch.Tensor:
        return torch_dp.data_parallel(module, x, device_ids=list(range(n)), output_device=output_device)

    _train_side_by_side(
        ours,
        module,
        ChunkedReference(twin, n),
        twin,
        (3 * n - 1, *row),
        input_device=_sim(0),
        output_device=expected,
    )


@pytest.mark.parametrize("n", [2, 4])
def test_functional_data_parallel_with_module_kwargs_along_dim_1(n):
    """The functional form's inputs tuple, module_kwargs and dim: the nested result and gradients of the
    unwrapped model, gathered on the CPU."""
    module = Nested(mix_dim=0).double()
    twin = copy.deepcopy(module)
    module.to(_sim(0))
    args, kwargs = _nested_inputs(n + 1, 1, [_sim(0), _sim(n - 1)])

    def ours(*args: Any, **kwargs: Any) -> Any:
        return torch_dp.data_parallel(module, args, sims(n), output_device="cpu", dim=1, module_kwargs=kwargs)

    out = _nested_side_by_side(ours, module, twin, args, kwargs)
    assert all(t.device.type == "cpu" for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


# ---- 7. errors before anything runs -----------------------------------------------------------------------


def _bn_module(device: torch.device) -> nn.Module:
    module = _conv_bn().to(device)
    module.bn.running_mean.uniform_()  # not BatchNorm's initial values: a reset would show
    return module


def _assert_unchanged(module: nn.Module, before: list[torch.Tensor]) -> None:
    """Every parameter and buffer bitwise as `before`, and no gradient: nothing ran."""
    after = _state(module)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(after, before)), "the module's tensors changed"
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("functional", [False, True], ids=["DataParallel", "data_parallel"])
@pytest.mark.parametrize("module_device,device_ids", [(1, [0, 2]), (3, [0, 1, 2]), (0, [1, 0])])
def test_module_off_the_first_device_is_refused_before_anything_ran(module_device, device_ids, functional):
    """A module on a device other than device_ids[0]: PyTorch's RuntimeError naming both devices; the module
    is neither moved nor run (BatchNorm statistics bitwise unchanged), and works once moved there."""
    module = _bn_module(_sim(module_device))
    before = _state(module)
    x = torch.randn(6, 3, 5, 5, dtype=torch.double, device=_sim(device_ids[0]))
    expected = (
        f"module must have its parameters and buffers on device {SIM}:{device_ids[0]} (device_ids[0]) but found "
        f"one of them on device: {SIM}:{module_device}"
    )

    def call() -> torch.Tensor:
        if functional:
            return torch_dp.data_parallel(module, x, device_ids)
        return torch_dp.DataParallel(module, device_ids)(x)

    with pytest.raises(RuntimeError) as error:
        call()
    assert str(error.value) == expected
    assert all(t.device == _sim(module_device) for t in _state(module))
    _assert_unchanged(module, before)
    module.to(_sim(device_ids[0]))
    twin = copy.deepcopy(module).cpu()
    out = call()
    _assert_close(out, ChunkedReference(twin, len(device_ids))(x.cpu()), "outputs once the module was moved")
    _assert_close(list(module.buffers()), list(twin.buffers()), "buffers once the module was moved")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"device_ids": [0, 9]}, f"device {SIM}:9 does not exist: this machine has 4 {SIM} device(s), indices 0 to 3"),
        (
            {"device_ids": [0, 1, 4]},
            f"device {SIM}:4 does not exist: this machine has 4 {SIM} device(s), indices 0 to 3",
        ),
        (
            {"device_ids": [0, 1], "output_device": 7},
            f"device {SIM}:7 does not exist: this machine has 4 {SIM} device(s), indices 0 to 3",
        ),
        (
            {"device_ids": [0, -1]},
            "invalid device index -1: device indices must be non-negative (use 'cpu' for the CPU)",
        ),
    ],
    ids=["index9", "index4", "output7", "negative"],
)
@pytest.mark.parametrize("functional", [False, True], ids=["DataParallel", "data_parallel"])
def test_device_that_does_not_exist_is_refused_before_anything_ran(kwargs, message, functional):
    """device_ids or output_device naming a device past the 4 there are: a ValueError saying so, from the
    constructor or before data_parallel runs the module (its BatchNorm statistics bitwise unchanged)."""
    assert torch.sim.device_count() == 4
    module = _bn_module(_sim(0))
    before = _state(module)
    x = torch.randn(6, 3, 5, 5, dtype=torch.double, device=_sim(0))
    with pytest.raises(ValueError) as error:
        if functional:
            torch_dp.data_parallel(module, x, **kwargs)
        else:
            torch_dp.DataParallel(module, **kwargs)
    assert str(error.value) == message
    _assert_unchanged(module, before)


# ---- 8. torch.nn.DataParallel itself on these devices -----------------------------------------------------


def _upstream_calls(n: int) -> dict[str, Callable[[], Any]]:
    module = _mlp().to(_sim(0))
    x = torch.randn(4 * n, 6, dtype=torch.double, device=_sim(0))
    parts = [torch.randn(2, 3, dtype=torch.double, device=_sim(i)) for i in range(n)]
    return {
        "DataParallel": lambda: nn.DataParallel(module, list(range(n)))(x),
        "data_parallel": lambda: nn.parallel.data_parallel(module, x, list(range(n))),
        "replicate": lambda: nn.parallel.replicate(module, list(range(n))),
        "gather": lambda: nn.parallel.gather(parts, 0),
    }


# What each of upstream's steps calls in torch/nn/parallel/comm.py: CUDA's bindings, absent from a CPU build of
# torch (and for CUDA tensors only where they exist).
UPSTREAM_BINDINGS = {
    "DataParallel": "_scatter",
    "data_parallel": "_scatter",
    "replicate": "_broadcast_coalesced",
    "gather": "_gather",
}


@pytest.mark.parametrize("call", list(UPSTREAM_BINDINGS))
@pytest.mark.parametrize("n", [2, 4])
def test_torch_nn_data_parallel_cannot_run_on_these_devices(n, call):
    """torch.nn.DataParallel (and its functional form, replicate and gather) on the same distinct devices fails
    inside torch/nn/parallel/comm.py, whose scatter, broadcast and gather call CUDA-only bindings of torch._C;
    torch_dp runs the same forward."""
    binding = UPSTREAM_BINDINGS[call]
    with pytest.raises((AttributeError, RuntimeError)) as error:
        _upstream_calls(n)[call]()
    innermost = error.traceback[-1]
    assert os.path.join("torch", "nn", "parallel", "comm.py") in str(innermost.path)
    assert f"torch._C.{binding}" in str(innermost.statement)
    if not hasattr(torch._C, binding):  # a CPU build of torch
        assert error.type is AttributeError
        assert str(error.value) == f"module 'torch._C' has no attribute '{binding}'"
    module = _mlp().to(_sim(0))
    twin = copy.deepcopy(module).cpu()
    x = torch.randn(4 * n, 6, dtype=torch.double, device=_sim(0))
    _assert_close(torch_dp.DataParallel(module, list(range(n)))(x), twin(x.cpu()), "torch_dp's forward")


def test_torch_nn_data_parallel_accepts_these_devices_and_torch_dp_takes_its_defaults():
    """Upstream's constructor accepts the simulated devices (device_ids defaults to all 4, output_device to 0)
    and only its forward fails; torch_dp resolves the same defaults and its forward runs on all 4."""
    module = _mlp().to(_sim(0))
    twin = copy.deepcopy(module).cpu()
    upstream, ours = nn.DataParallel(module), torch_dp.DataParallel(module)
    assert upstream.device_ids == ours.device_ids == [0, 1, 2, 3]
    assert upstream.output_device == ours.output_device == 0
    assert upstream.src_device_obj == ours.src_device_obj == _sim(0)
    x = torch.randn(9, 6, dtype=torch.double, device=_sim(0))
    with pytest.raises((AttributeError, RuntimeError), match="_scatter"):
        upstream(x)
    out = ours(x)
    assert out.device == _sim(0)
    _assert_close(out, twin(x.cpu()), "torch_dp's forward")


# ---- 9. TorchScript ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", list(MODELS))
def test_torchscript_module_matches_the_eager_module(kind):
    """torch.jit.script of a model on sim:0 in torch_dp.DataParallel over [0, 1, 2]: three SGD(foreach) steps
    give the eager twin's outputs, gradients, BatchNorm statistics (chunk 0's) and parameters on the CPU."""
    module, twin, row = _make_model(kind, _sim(0))
    scripted = torch.jit.script(module)
    dp = torch_dp.DataParallel(scripted, [0, 1, 2])
    _train_side_by_side(
        dp,
        scripted,
        _whole_or_chunked(kind, twin, 3),
        twin,
        (10, *row),
        input_device=_sim(0),
        output_device=_sim(0),
        make_optimizer=_sgd_foreach,
    )
