"""parallel_apply, with torch.nn.parallel's signature, and _parallel_apply, which DataParallel and data_parallel
call: replicas run on persistent C++ worker threads (or the calling thread, as `issuing` says), each with the
caller's thread-local state, and the first failure is re-raised with the replica and device that raised it."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._utils import ExceptionWrapper

from torch_dp import _C
from torch_dp.arguments import ISSUING_MODES, DeviceLike, _accelerator_type, _as_device
from torch_dp.sync_group import PeerReplicaFailed, SyncGroup, in_replica, replica_context

__all__ = ["parallel_apply"]

_shared_pool: Any | None = None
_shared_pool_lock = threading.Lock()


def _default_pool() -> Any:
    global _shared_pool
    with _shared_pool_lock:
        if _shared_pool is None:
            _shared_pool = _C.WorkerPool()
        return _shared_pool


def _device_of(inputs: Any) -> torch.device:
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    accelerator = _accelerator_type()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator, getattr(torch, accelerator).current_device())


_ISSUING = {mode: getattr(_C.Issuing, mode) for mode in ISSUING_MODES}


def _parallel_apply(
    modules,
    inputs,
    kwargs_tup,
    devices: list[torch.device],
    pool,
    synchronize: bool = False,
    issuing: str = "threads",
    compiled: bool = False,
    reproducible: bool = False,
    compiled_sync_batchnorm: Sequence[str] = (),
) -> list[Any]:
    """Runs replica i on inputs[i] and kwargs_tup[i] on the pool, issued as `issuing` says (Note [Issuing
    replicas] in worker_pool.cpp). With `synchronize` (replicas holding SyncBatchNorm layers), those layers
    meet across replicas (Note [Synchronized batch norm]); only for a pool no other call can use at the same
    time, since replicas waiting for each other must all be running. `compiled` (replicas of a torch.compile
    wrapper) makes "auto" serial on one device (Note [Compiled replicas] in replicate.py). With `reproducible`,
    replicas sharing a device draw random numbers in index order (Note [Reproducible replicas] in
    parallel_apply.cpp). `compiled_sync_batchnorm` names the torch.compile wrappers that hold SyncBatchNorm layers:
    refused when the replicas would synchronize (Note [Compiled SyncBatchNorm])."""
    results: list[Any] = [None] * len(modules)
    group = None
    if synchronize and len(modules) > 1 and not in_replica():
        if compiled_sync_batchnorm:
            # Note [Compiled SyncBatchNorm]
            # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
            # Compiled replicas take turns on a call with new inputs (_CompiledReplicaCall's lock: dynamo is not
            # thread-safe), while SyncBatchNorm's replicas wait for each other inside the forward. With the
            # layers inside the compiled module, replica 0 would wait for replica 1 while holding the lock that
            # replica 1 waits for: a hang. Refused before any replica runs; compiled parts without SyncBatchNorm
            # take the lock only around themselves, and run.
            raise RuntimeError(
                "DataParallel: torch_dp.SyncBatchNorm layers inside a torch.compile'd module "
                f"({', '.join(compiled_sync_batchnorm)}) cannot run on several replicas: compiled replicas take "
                "turns compiling (dynamo is not thread-safe) while SyncBatchNorm's replicas wait for each other "
                "inside the forward, so they would wait forever. Compile only the parts without SyncBatchNorm "
                "(e.g. model.head = torch.compile(model.head)), use BatchNorm, or run on one device"
            )
        # Under `reproducible` the replicas run on threads all the same, and those sharing a device take turns
        # (Note [Reproducible synchronized batch norm]).
        group = SyncGroup(len(modules), turns=devices if reproducible else None)
    if group is not None:
        if issuing == "serial":
            raise RuntimeError(
                "issuing='serial' runs replicas one after another, but the module has SyncBatchNorm layers, whose "
                "replicas wait for each other inside a forward; use issuing='auto' or 'threads'"
            )
        issuing = "threads"
    elif issuing == "auto" and compiled and len(set(devices)) == 1:
        issuing = "serial"  # dynamo is not thread-safe (Note [Compiled replicas] in replicate.py)

    failed: list[int] = []  # the replicas that raised, in the order they finished

    def run_replica(i: int) -> None:
        if group is None:
            try:
                args = inputs[i]
                if not isinstance(args, (list, tuple)):
                    args = (args,)  # a lone tensor is one argument, not a sequence to unpack
                kwargs = kwargs_tup[i]
                results[i] = modules[i](*args) if type(kwargs) is dict and not kwargs else modules[i](*args, **kwargs)
            except BaseException:
                results[i] = ExceptionWrapper(where=_C.replica_location(i, devices[i]))
                failed.append(i)
            return
        failure = False
        try:
            args = inputs[i]
            if not isinstance(args, (list, tuple)):
                args = (args,)
            with replica_context(group, i):
                group.wait_turn(i)
                results[i] = modules[i](*args, **kwargs_tup[i])
        except BaseException:
            failure = True
            results[i] = ExceptionWrapper(where=_C.replica_location(i, devices[i]))
            failed.append(i)
        finally:
            group.finish(i, failure)

    if _rebuild_autograd_engine_first:
        _rebuild_autograd_engine()  # Note [After fork]
    # With a SyncGroup the replicas must run at once, and the group orders them where `reproducible` asks.
    _C.run_replicas(pool, devices, run_replica, _ISSUING[issuing], reproducible and group is None)
    if failed:
        failures = [results[i] for i in sorted(failed)]
        # A replica that waited for a failed one reports that; raise the failure itself.
        causes = [f for f in failures if f.exc_type is not PeerReplicaFailed]
        (causes or failures)[0].reraise()
    return results


def parallel_apply(
    modules: Sequence[torch.nn.Module],
    inputs: Sequence[Any],
    kwargs_tup: Sequence[dict[str, Any]] | None = None,
    devices: Sequence[DeviceLike | None] | None = None,
) -> list[Any]:
    """Runs ``modules[i](*inputs[i], **kwargs_tup[i])`` for every i on persistent worker threads, each with
    the caller's grad mode, inference mode and autocast state, on devices[i] and its current stream."""
    if len(modules) != len(inputs):
        raise ValueError(f"The number of modules {len(modules)} is not equal to the number of inputs {len(inputs)}")
    if kwargs_tup is None:
        kwargs_tup = ({},) * len(modules)
    elif len(kwargs_tup) != len(modules):
        raise ValueError(
            f"The number of modules {len(modules)} is not equal to the number of kwargs_tup {len(kwargs_tup)}"
        )
    if devices is None:
        targets = [_device_of(x) for x in inputs]
    else:
        if len(devices) != len(modules):
            raise ValueError(
                f"The number of modules {len(modules)} is not equal to the number of devices {len(devices)}"
            )
        accelerator = _accelerator_type()
        targets = [_device_of(x) if d is None else _as_device(d, accelerator) for d, x in zip(devices, inputs)]
    if not modules:
        return []
    return _parallel_apply(modules, inputs, kwargs_tup, targets, _default_pool())


# Note [After fork]
# ~~~~~~~~~~~~~~~~~
# After fork() only the forking thread exists in the child. A lock that another thread held at that moment (a
# DataParallel in the middle of a forward on a background thread) would stay held there forever, and the
# child's first forward would hang. The child gets fresh locks, and every _Replicas drops its watch so that its
# next sync() rebuilds it (the other thread may have been half-way through updating it); the worker pools
# notice the new process on their own (Note [Worker pool] in worker_pool.cpp). Each module that keeps such
# state resets its own with os.register_at_fork: this one the default pool's lock, replicate.py every
# _Replicas, data_parallel.py the functional form's lock.
#
# torch's autograd engine also rebuilds itself in a forked child, on its first use there
# (PythonEngine::get_python_engine), and that rebuild is not thread-safe: two replicas recording their first
# autograd graph in the child at the same time both destroy and rebuild the engine (a double free, a crash;
# seen with two plain threads running a Linear in a child too). So the child's first _parallel_apply uses the
# engine once from the calling thread before any replica runs. Not at fork time: a child that never runs a
# replica (a DataLoader worker) keeps torch's own lazy behaviour.
_rebuild_autograd_engine_first = False


def _rebuild_autograd_engine() -> None:
    global _rebuild_autograd_engine_first
    _rebuild_autograd_engine_first = False
    torch.autograd.Variable._execution_engine.is_checkpoint_valid()  # calls get_python_engine()


def _after_fork_in_child() -> None:
    global _shared_pool_lock, _rebuild_autograd_engine_first
    _rebuild_autograd_engine_first = True
    _shared_pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
