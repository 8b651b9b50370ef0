"""An independent reference for torch_dp's results: torch.nn.DataParallel's semantics on one device, written
from its documented rules without any of torch_dp's code (imported as `from reference import ...`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import torch_dp


def _reference_split(args: tuple, kwargs: dict, count: int, dim: int) -> list[tuple[tuple, dict]]:
    """torch.nn.DataParallel's scatter, written independently of torch_dp: tensors chunked with torch.chunk."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    chunked = {i: torch.chunk(x, count, dim) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)}
    if not chunked:
        return [(args, kwargs)] * (count if (args or kwargs) else 1)
    replicas = min(len(c) for c in chunked.values())
    result = []
    for r in range(replicas):
        replica_leaves = [chunked[i][r] if i in chunked else x for i, x in enumerate(leaves)]
        result.append(pytree.tree_unflatten(replica_leaves, spec))
    return result


def _reference_gather(outputs: list, dim: int) -> Any:
    first, spec = pytree.tree_flatten(outputs[0])
    columns = [pytree.tree_flatten(out)[0] for out in outputs]
    gathered = []
    for position, leaf in enumerate(first):
        column = [c[position] for c in columns]
        if leaf is None:
            gathered.append(None)
        elif all(t.dim() == 0 for t in column) and dim == 0:
            gathered.append(torch.stack(column))
        else:
            gathered.append(torch.cat(column, dim))
    return pytree.tree_unflatten(gathered, spec)


class ChunkedReference(nn.Module):
    """torch.nn.DataParallel's semantics on one device, computed by hand: chunk i runs through the module with
    its own parameters; replica 0 uses (and updates) the module's buffers, replica i > 0 copies of them."""

    def __init__(self, module: nn.Module, count: int, dim: int = 0) -> None:
        super().__init__()
        self.module, self.count, self.dim = module, count, dim

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = []
        for i, (a, k) in enumerate(_reference_split(args, kwargs, self.count, self.dim)):
            if i == 0:
                outputs.append(self.module(*a, **k))
            else:
                buffers = {name: b.clone() for name, b in self.module.named_buffers()}
                outputs.append(torch.func.functional_call(self.module, buffers, a, k))
        if len(outputs) == 1 and self.count == 1:
            return outputs[0]
        return _reference_gather(outputs, self.dim)


class CopyingDevices(list):
    """A CPU device list whose replicas copy every tensor instead of sharing the module's, so the path of
    replicas on other devices (coalesced copies, broadcast gradients reduce-added onto the source) runs on a
    machine without accelerators."""


def copying(dp: torch_dp.DataParallel) -> torch_dp.DataParallel:
    """Makes `dp`'s replicas after the first copy every tensor, as replicas on other devices do (CopyingDevices)."""
    replicas = dp._get_engine().replicas
    replicas._replicator = torch_dp._C.Replicator(
        trust_version_counters=dp.trust_version_counters, copy_everything=True
    )
    replicas._copy_everything = True  # ScriptModules' replicas (made on the next forward)
    return dp
