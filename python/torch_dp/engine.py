"""The forward pipeline of the Python front-ends, written once (Note [One engine]): torch_dp.DataParallel's
forward and forward_scattered and the functional torch_dp.data_parallel run every forward through
_Engine.replica_outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from torch_dp import _C
from torch_dp.parallel_apply import _parallel_apply
from torch_dp.replicate import _Replicas
from torch_dp.scatter_gather import _scatter_tensors


class _Engine:
    """The forward pipeline, written once for every Python front-end: DataParallel's forward and
    forward_scattered, and the functional form (Note [One engine]). It keeps what a caller keeps between
    forwards, its replicas and its worker threads: not part of a module's state, so dropped by pickling and
    deepcopy and rebuilt on the next forward."""

    def __init__(self, trust_version_counters: bool = False) -> None:
        self.replicas = _Replicas(trust_version_counters)
        self.pool = _C.WorkerPool()

    # Note [One engine]
    # ~~~~~~~~~~~~~~~~~
    # Every forward is the same five steps under the replicas' lock: the module tree watched and synced, the
    # module's device checked, the inputs split, the replicas made current, the replicas run. replica_outputs
    # is the one place they are strung together; the front-ends differ only in how the inputs are split
    # (tensors alone, a pytree with keyword arguments, or a subclass's scatter) and in whether a subclass
    # replaced replicate or parallel_apply, which they pass in. How replicas run (threads or serial, the rules
    # for SyncBatchNorm and compiled modules) is _parallel_apply's, called from run() only. The C++ front-ends
    # (the C++ module and the TorchScript and AOTInductor wrappers) share one C++ engine the same way.
    def replica_outputs(
        self,
        module: torch.nn.Module,
        devices: list[torch.device],
        split: Callable[..., tuple[Sequence[Any], Sequence[dict[str, Any]] | None]],
        split_arguments: tuple[Any, ...],
        issuing: str,
        reproducible: bool,
        replicate: Callable[[int], Sequence[torch.nn.Module]] | None = None,
        apply: Callable[[Sequence[torch.nn.Module], Sequence[Any], Any], list[Any]] | None = None,
    ) -> list[Any]:
        """The outputs of the replicas that ran, in order. ``devices`` are those that run a replica, the first
        holding the module, which is that device's replica. ``split(*split_arguments)`` gives each replica's
        positional arguments and keyword arguments (None: none). ``replicate(count)`` and ``apply(modules,
        inputs, kwargs)`` replace the engine's own steps where a subclass overrides them. With one device the
        module itself runs on the calling thread."""
        replicas = self.replicas
        with replicas.lock:
            replicas.sync(module, devices)
            replicas.check_device(devices[0])
            inputs, kwargs = split(*split_arguments)
            if not inputs and not kwargs:  # a forward without arguments: one call per device, of nothing
                inputs, kwargs = ((),), ({},)
            if len(devices) == 1:
                return [module(*inputs[0]) if kwargs is None else module(*inputs[0], **kwargs[0])]
            count = len(inputs)
            if kwargs is None:
                kwargs = ({},) * count
            if replicate is None:
                modules = replicas.get(count, differentiable=torch.is_grad_enabled())
            else:
                modules = replicate(count)
            if apply is not None:
                return apply(modules, inputs, kwargs)
            return self.run(
                modules, inputs, kwargs, devices[:count] if count < len(devices) else devices, issuing, reproducible
            )

    def run(
        self,
        modules: Sequence[torch.nn.Module],
        inputs: Sequence[Any],
        kwargs: Any,
        devices: list[torch.device],
        issuing: str,
        reproducible: bool,
    ) -> list[Any]:
        """The replicas run on this engine's pool, which serves one forward at a time (the replicas' lock), so
        that SyncBatchNorm layers can meet across replicas."""
        replicas = self.replicas
        return _parallel_apply(
            modules,
            inputs,
            kwargs,
            devices,
            self.pool,
            synchronize=replicas.has_sync_batchnorm,
            issuing=issuing,
            compiled=replicas.has_compiled,
            reproducible=reproducible,
            compiled_sync_batchnorm=replicas.compiled_sync_batchnorm,
        )


def _split_tensors(inputs: tuple[torch.Tensor, ...], devices: list[torch.device], dim: int) -> tuple[Any, None]:
    """The split of positional arguments that are all tensors, without keyword arguments (Note [Tensor-only
    forwards] in data_parallel.py)."""
    return _scatter_tensors(inputs, devices, dim), None
