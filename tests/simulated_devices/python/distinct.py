"""Helpers of the tests on distinct simulated devices (imported as `from distinct import ...`)."""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from simulated_devices import NAME


def sims(n: int, first: int = 0) -> list[torch.device]:
    """n distinct simulated devices, first, first + 1, ..."""
    return [torch.device(NAME, first + i) for i in range(n)]


def cpu(tree: Any) -> Any:
    """`tree` with every tensor copied to the CPU (a blocking copy: it waits for the stream that writes it)."""
    return pytree.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, tree)


def assert_gradients_match(
    x: torch.Tensor,
    x_ref: torch.Tensor,
    model: torch.nn.Module,
    reference: torch.nn.Module,
    source: torch.device,
    step: int,
    tol: dict[str, float],
) -> None:
    """After a backward through a DataParallel and through its reference: the input's gradient and every
    parameter's, the latter on the module's device `source`, equal to the reference's up to `tol`."""
    torch.testing.assert_close(cpu(x.grad), x_ref.grad, msg=lambda m: f"step {step} input grads: {m}", **tol)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.device == source
        torch.testing.assert_close(cpu(p.grad), q.grad, msg=lambda m, name=name: f"step {step} {name}.grad: {m}", **tol)


def device_list_tests(module: types.ModuleType) -> dict[str, Callable]:
    """The tests of a tests/python module that are parametrized over its device lists ("name,device_ids"): in
    this process the module's lists are the simulated accelerator's distinct devices, so importing these runs
    each of them there. The module's other tests (CPU only) stay in the main pytest process."""

    def over_device_lists(test: Callable) -> bool:
        return any(
            mark.name == "parametrize" and "device_ids" in str(mark.args[0]) for mark in getattr(test, "pytestmark", [])
        )

    return {
        name: test
        for name, test in vars(module).items()
        if name.startswith("test_") and callable(test) and over_device_lists(test)
    }
