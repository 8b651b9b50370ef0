"""ScatteredOutputs: the outputs of a DataParallel forward left on the devices that computed them
(DataParallel.forward_scattered), with their devices and chunk sizes, and how later work on them (a
ParallelCriterion's loss) runs on the forward's worker pool."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from torch_dp import _C
from torch_dp.arguments import DeviceLike, _as_output_device, _checked_dim, _checked_issuing
from torch_dp.parallel_apply import _ISSUING, _default_pool, _parallel_apply
from torch_dp.scatter_gather import _gather

__all__ = ["ScatteredOutputs"]


def _rows(output: Any, dim: int) -> int | None:
    """The size along dim of output's first tensor (in pytree order); None without one that has dim."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf.size(dim) if leaf.dim() > 0 and -leaf.dim() <= dim < leaf.dim() else None
    return None


class ScatteredOutputs(Sequence):
    """The outputs of a DataParallel forward left where the replicas computed them, with what a later step
    needs: ``outputs[i]`` (any structure the module returns) was computed on ``devices[i]`` from a chunk of the
    batch, and ``chunk_sizes[i]`` is its first tensor's size along ``dim`` (None where that tensor has no such
    dimension). ``pool``, ``issuing`` and ``reproducible`` say how a ParallelCriterion runs its tasks: on the
    DataParallel's worker pool, as its forward did (default: the shared pool, ``"auto"``). Indexing, ``len``
    and iteration go over ``outputs``; ``gather()`` gives what the DataParallel's forward would have returned
    (concatenated on ``output_device``).

    Built by :meth:`torch_dp.DataParallel.forward_scattered`; may also be built by hand from outputs of
    :func:`torch_dp.parallel_apply`, for :class:`ParallelCriterion`."""

    def __init__(
        self,
        outputs: Sequence[Any],
        devices: Sequence[DeviceLike],
        dim: int = 0,
        output_device: DeviceLike | None = None,
        *,
        pool: Any | None = None,
        issuing: str = "auto",
        reproducible: bool = False,
    ) -> None:
        self.outputs = list(outputs)
        self.devices = tuple(torch.device(d) if not isinstance(d, torch.device) else d for d in devices)
        if len(self.outputs) != len(self.devices):
            raise ValueError(
                f"ScatteredOutputs needs one device per output, but got {len(self.outputs)} outputs and "
                f"{len(self.devices)} devices"
            )
        if not self.outputs:
            raise ValueError("ScatteredOutputs needs the output of at least one replica, but got none")
        self.dim = _checked_dim(dim)
        self.output_device = self.devices[0] if output_device is None else _as_output_device(output_device)
        self.chunk_sizes = tuple(_rows(out, self.dim) for out in self.outputs)
        self._pool = pool
        self._issuing = _checked_issuing(issuing)
        self._reproducible = reproducible

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, index: Any) -> Any:
        return self.outputs[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.outputs)

    def __repr__(self) -> str:
        devices = ", ".join(str(d) for d in self.devices)
        return (
            f"ScatteredOutputs({len(self.outputs)} replicas on [{devices}], chunk_sizes={list(self.chunk_sizes)}, "
            f"dim={self.dim}, output_device={self.output_device})"
        )

    def gather(self, output_device: DeviceLike | None = None) -> Any:
        """The outputs concatenated along ``dim`` on ``output_device`` (default: the DataParallel's), keeping
        their structure, exactly as the DataParallel's forward gathers them (differentiable)."""
        target = self.output_device if output_device is None else _as_output_device(output_device)
        return _gather(self.outputs, target, self.dim)

    def _run(self, tasks: list[Callable[[], Any]], devices: list[torch.device]) -> list[Any]:
        """tasks[i]() on devices[i], on the forward's worker pool (same thread-local state and streams)."""
        pool = self._pool if self._pool is not None else _default_pool()
        issuing = _C.issuing_after_forward(_ISSUING[self._issuing], pool, devices).name
        extra = {"reproducible": True} if self._reproducible else {}  # as the forward ran
        return _parallel_apply(tasks, [()] * len(tasks), [{}] * len(tasks), devices, pool, issuing=issuing, **extra)
