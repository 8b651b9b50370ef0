"""The contract every torch_dp front-end keeps, checked over all of them from one table (the way a table-driven
test runs one check over every variant): torch_dp.DataParallel over the eager model and over its TorchScript
module, torch_dp.PackageDataParallel over its AOTInductor package, and the functional torch_dp.data_parallel.
All four serve one model with one set of weights (examples/python/export_model.py's), so one reference, the
eager model on the whole batch, checks them all. Where the front-ends differ by design, the difference is a
column of the table (which options a front-end takes, whether its first chunk may be empty, whether it sees
weights edited between calls), not another test."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Any, Callable

import pytest
import torch

import torch_dp
from exported import cache_dir, eager_model, exported_files
from helpers import cpus, run_in_threads


@dataclasses.dataclass(frozen=True)
class FrontEnd:
    name: str
    # (files, device_ids, **options) -> (call, the module whose weights a user edits, or None)
    make: Callable[..., tuple[Callable[[torch.Tensor], Any], Any | None]]
    options: frozenset[str]  # the keyword options it takes besides device_ids
    first_chunk_may_be_empty: bool  # no replica is the module itself (Note [Empty chunks])
    holds_weights: bool = True  # its weights are the module's, which a user may edit between calls


@dataclasses.dataclass
class Files:
    directory: str
    model: torch.nn.Module

    @property
    def script(self) -> str:
        return os.path.join(self.directory, "model.pt")

    @property
    def package(self) -> str:
        return os.path.join(self.directory, "model.pt2")


def _eager(files, device_ids, **options):
    model = copy.deepcopy(files.model)
    dp = torch_dp.DataParallel(model, device_ids, **options)
    return dp, model


def _script(files, device_ids, **options):
    with warnings.catch_warnings():  # torch.jit's deprecation of itself
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(files.script)
    dp = torch_dp.DataParallel(module, device_ids, **options)
    return dp, module


def _package(files, device_ids, **options):
    return torch_dp.PackageDataParallel(files.package, device_ids, **options), None


def _functional(files, device_ids, **options):
    model = copy.deepcopy(files.model)
    return (lambda x: torch_dp.data_parallel(model, x, device_ids, **options)), model


MODULE_OPTIONS = frozenset({"output_device", "dim", "chunk_sizes", "issuing"})
FRONT_ENDS = [
    FrontEnd("eager", _eager, MODULE_OPTIONS, first_chunk_may_be_empty=False),
    FrontEnd("script", _script, MODULE_OPTIONS, first_chunk_may_be_empty=False),
    FrontEnd("package", _package, MODULE_OPTIONS, first_chunk_may_be_empty=True, holds_weights=False),
    FrontEnd("functional", _functional, frozenset({"output_device", "dim"}), first_chunk_may_be_empty=False),
]


def front_ends(option=None):
    """The table's rows (as pytest parameters), those that take `option` when one is named."""
    return [pytest.param(f, id=f.name) for f in FRONT_ENDS if option is None or option in f.options]


@pytest.fixture(scope="module")
def files():
    directory = exported_files(cache_dir())
    return Files(directory, eager_model(directory))


def reference(files, x):
    with torch.no_grad():
        return files.model(x)


def batch(rows, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, generator=generator)  # export_model.py's IN_FEATURES


@pytest.mark.parametrize("front_end", front_ends())
@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 7, 10])
def test_output_is_the_module_on_the_whole_batch(files, front_end, replicas, rows):
    call, _ = front_end.make(files, cpus(replicas))
    x = batch(rows, seed=rows)
    with torch.no_grad():
        output = call(x)
    assert output.shape == (rows, 4)
    torch.testing.assert_close(output, reference(files, x))


@pytest.mark.parametrize("front_end", front_ends("chunk_sizes"))
@pytest.mark.parametrize("sizes", [[3, 7], [4, 0, 6], [10, 0, 0], [1, 1, 8]])
def test_chunk_sizes_give_the_same_output(files, front_end, sizes):
    call, _ = front_end.make(files, cpus(len(sizes)), chunk_sizes=sizes)
    x = batch(10, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(call(x), reference(files, x))
    with pytest.raises(Exception, match="chunk"), torch.no_grad():  # a batch of another size does not fit the sizes
        call(batch(9))


@pytest.mark.parametrize("front_end", front_ends("chunk_sizes"))
def test_an_empty_first_chunk(files, front_end):
    sizes = [0, 4, 6]
    if not front_end.first_chunk_may_be_empty:
        with pytest.raises(ValueError, match=r"chunk_sizes\[0\] must not be 0"):
            front_end.make(files, cpus(3), chunk_sizes=sizes)
        return
    call, _ = front_end.make(files, cpus(3), chunk_sizes=sizes)
    x = batch(10, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(call(x), reference(files, x))


@pytest.mark.parametrize("front_end", front_ends("issuing"))
@pytest.mark.parametrize("issuing", ["threads", "serial", "auto"])
def test_every_issuing_gives_the_same_output(files, front_end, issuing):
    call, _ = front_end.make(files, cpus(3), issuing=issuing)
    for seed in range(3):  # "auto" times both ways over its first calls
        x = batch(11, seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(call(x), reference(files, x))


@pytest.mark.parametrize("front_end", front_ends())
def test_calls_from_several_threads(files, front_end):
    call, _ = front_end.make(files, cpus(2))
    inputs = [batch(5 + i, seed=10 + i) for i in range(4)]
    outputs = [None] * len(inputs)

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                outputs[i] = call(inputs[i])

    run_in_threads(run, len(inputs))
    for x, output in zip(inputs, outputs):
        torch.testing.assert_close(output, reference(files, x))


@pytest.mark.parametrize("front_end", [pytest.param(f, id=f.name) for f in FRONT_ENDS if f.holds_weights])
def test_weights_edited_between_calls_are_seen(files, front_end):
    call, module = front_end.make(files, cpus(3))
    x = batch(9, seed=3)
    with torch.no_grad():
        call(x)
        module.fc2.bias.add_(1.0)  # in place: the replicas share it or copy it again
        torch.testing.assert_close(call(x), reference(files, x) + 1.0)
        module.fc2.bias = torch.nn.Parameter(module.fc2.bias + 1.0)  # replaced: the replicas must take the new one
        torch.testing.assert_close(call(x), reference(files, x) + 2.0)


# One mistake per row, and the error every front-end gives for it, before anything runs: the argument checks
# have one home (torch_dp/arguments.py), so the front-ends cannot drift apart.
MISTAKES = [
    ("issuing", dict(issuing="sometimes"), ValueError, "issuing must be one of"),
    ("chunk_sizes", dict(chunk_sizes=[1, 2, 3]), ValueError, "one size per device: 2 devices, but got 3"),
    ("chunk_sizes", dict(chunk_sizes="55"), TypeError, "chunk_sizes must be a sequence of ints"),
    ("chunk_sizes", dict(chunk_sizes=[5, -1]), ValueError, "non-negative"),
    ("dim", dict(dim="0"), TypeError, "dim must be an int"),
    ("output_device", dict(output_device="nowhere"), ValueError, "invalid device 'nowhere'"),
]


@pytest.mark.parametrize(
    "front_end, arguments, error, message",
    [
        pytest.param(f, arguments, error, message, id=f"{f.name}-{message}")
        for f in FRONT_ENDS
        for option, arguments, error, message in MISTAKES
        if option in f.options
    ],
)
def test_the_same_error_for_the_same_mistake(files, front_end, arguments, error, message):
    x = batch(10, seed=4)
    with pytest.raises(error, match=message):
        call, _ = front_end.make(files, cpus(2), **arguments)
        call(x)


@pytest.mark.parametrize("front_end", front_ends())
@pytest.mark.parametrize(
    "device_ids, error, message",
    [
        ("cpu", TypeError, "must be a sequence of devices"),
        (["cpu", 1.5], TypeError, "a device must be an int index"),
        (["cpu", "cpu:x"], ValueError, "invalid device 'cpu:x'"),
    ],
)
def test_the_same_error_for_the_same_device_list(files, front_end, device_ids, error, message):
    # (An empty list is not among them: without an accelerator, DataParallel calls the module directly whatever
    # device_ids says, as torch.nn.DataParallel does.)
    with pytest.raises(error, match=message):
        call, _ = front_end.make(files, device_ids)
        call(batch(4))
