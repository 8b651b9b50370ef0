"""replicate, with torch.nn.parallel's signature, and the persistent replicas behind it (_Replicas): replica
modules built once and kept between forwards, their tensors refreshed by the C++ Replicator, torch.compile
wrappers replicated so that every replica runs the compiled graph (Note [Compiled replicas])."""

from __future__ import annotations

import functools
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from torch_dp import _C
from torch_dp.arguments import DeviceLike, _as_devices
from torch_dp.sync_batchnorm import SyncBatchNorm

__all__ = ["replicate"]


class _ReplicaZeroGrad:
    """A replica's zero_grad: upstream's warning, and no effect. Replicas share the module's parameters, so
    Module.zero_grad would clear the module's gradients, where upstream's replicas (whose parameters are
    copies) leave them alone."""

    def __call__(self, set_to_none: bool = True) -> None:
        warnings.warn(
            "Calling .zero_grad() from a module created with nn.DataParallel() has no effect. "
            "The parameters are copied (in a differentiable manner) from the original module. "
            "This means they are not leaf nodes in autograd and so don't accumulate gradients. "
            "If you need gradients in your forward method, consider using autograd.grad instead.",
            stacklevel=2,
        )


class _ReplicaFlattenParameters:
    """An RNN replica's flatten_parameters: nothing to do. A replica on the module's device uses the module's own
    weights, which RNNBase already flattened when the module was moved to the device; re-flattening them from
    several replica threads at once would rewrite the module's storage concurrently. (Upstream's replicas fail
    here with "set_storage is not allowed", pytorch#21108.) Replicas on other devices hold coalesced copies,
    which cuDNN uses as they are."""

    def __call__(self) -> None:
        return None


def _replica_of(module: torch.nn.Module) -> torch.nn.Module:
    """A replica module, without tensors of its own yet (_Replicas._build installs its children and tensors)."""
    if not _is_compile_wrapper(module):
        replica = module._replicate_for_data_parallel()
        if replica.__dict__.get("_compiled_call_impl") is not None:
            # module.compile() compiled the module in place: its compiled call is bound to the module itself, so
            # a replica would run the original (on the original's device, updating the original's buffers).
            # The replica runs uncompiled; _Replicas._build warns.
            replica.__dict__["_compiled_call_impl"] = None
        return replica
    # Module._replicate_for_data_parallel assigns _parameters, _buffers and _modules through setattr, which
    # torch.compile's wrapper forwards to the module it wraps: it would empty the user's module's parameters
    # and make it its own child (upstream's replicate does exactly that). Build the replica's dict directly.
    replica = type(module).__new__(type(module))
    object.__setattr__(replica, "__dict__", dict(module.__dict__))
    replica.__dict__.update(
        _parameters={}, _buffers=dict(module._buffers), _modules=dict(module._modules), _is_replica=True
    )
    return replica


def _call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


class _CompiledReplicaCall:
    """The replicas' forward for one torch.compile wrapper (Note [Compiled replicas]): _call_module compiled under
    the wrapper's context, on a code object of its own (dynamo keeps graphs and counts recompilations per code
    object, and one shared by every model in the process would soon reach the recompile limit).

    Dynamo compiles once per thread that misses its cache at the same time (a thread that waited for its compile
    lock does not look again), so replicas meeting a new input signature together would compile one graph each.
    The first call with a signature not seen before therefore runs alone, and the others wait for it and find
    its graph. Once a new signature compiles nothing (dynamic shapes cover it), calls stop waiting."""

    def __init__(self, dynamo_ctx: Callable) -> None:
        code = _call_module.__code__.replace()
        self._compiled = dynamo_ctx(types.FunctionType(code, _call_module.__globals__, "_call_module"))
        self._lock = threading.Lock()
        self._seen: set = set()
        self._settled = False

    def __call__(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self._settled:
            return self._compiled(module, *args, **kwargs)
        # Dynamo guards on the parameters' types too: replicas holding copies see tensors, not Parameters.
        key = (
            torch.is_grad_enabled(),
            module.training,
            type(next(module.parameters(), None)),
            tuple(
                (tuple(x.shape), x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor) else type(x)
                for x in pytree.tree_leaves((args, kwargs))
            ),
        )
        if key not in self._seen:
            with self._lock:
                if key not in self._seen:
                    from torch._dynamo.utils import counters

                    compiled_before = counters["frames"]["total"]
                    output = self._compiled(module, *args, **kwargs)
                    self._seen.add(key)
                    self._settled = counters["frames"]["total"] == compiled_before and len(self._seen) > 1
                    return output
        return self._compiled(module, *args, **kwargs)


def _is_compile_wrapper(module: torch.nn.Module) -> bool:
    """Whether module is torch.compile's OptimizedModule (without importing torch._dynamo, which costs an import
    of about a second: no OptimizedModule exists before it is imported)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


class _Replicas:
    """Persistent replicas of one module over a list of devices (Note [Persistent replicas] in replicate.cpp,
    Note [Watching a module tree] in dict_watch.cpp).

    Replica modules are built with ``Module._replicate_for_data_parallel`` (as PyTorch does, so modules that
    customise it, such as RNNs, keep working) once, and again only when the module tree changed. Their tensors
    come from the C++ Replicator on every call and are written into the replicas only when they are other
    tensor objects than last time."""

    def __init__(self, trust_version_counters: bool = False) -> None:
        self._trust_version_counters = trust_version_counters
        self._replicator = _C.Replicator(trust_version_counters)
        self._script: _ScriptReplicas | None = None  # for a ScriptModule
        self._copy_everything = False  # torch_dp's own tests: ScriptModules' later replicas copy every tensor
        # ScriptModules inside an eager module tree, each replicated by its own _ScriptReplicas, and where each
        # slot's replica goes: (slot, the parent replica's _modules dict, key, index into _script_leaves).
        self._script_leaves: list[tuple[torch.jit.ScriptModule, _ScriptReplicas]] = []
        self._script_targets: list[tuple[int, dict, str, int]] = []
        # Weak: torch_dp.data_parallel keeps a _Replicas per module in a WeakKeyDictionary, whose values must
        # not keep their key alive (that leaked every module ever passed to data_parallel).
        self._module: weakref.ref | None = None
        self._devices: list[torch.device] | None = None
        self._watch: Any | None = None
        self._slots: list[list[torch.nn.Module]] = []
        self._roots: list[torch.nn.Module] = []  # each slot's root replica
        self._targets: list[list[tuple[dict, str, int]]] = []  # per slot: (dict, key, source index)
        self._source_dicts: list[dict] = []  # the module tree's dicts, for DictWatch (not the modules)
        self.has_sync_batchnorm = False
        self.has_compiled = False  # torch.compile wrappers in the tree (Note [Compiled replicas])
        # Where torch.compile wrappers hold SyncBatchNorm layers (Note [Compiled SyncBatchNorm] in parallel_apply.py)
        self.compiled_sync_batchnorm: list[str] = []
        # One forward at a time: the replicas are shared state. threading.Lock releases the GIL while it
        # waits, so a waiting thread cannot starve the replicas' workers of the GIL.
        self.lock = threading.Lock()
        _live_replicas.add(self)

    def sync(self, module: torch.nn.Module, devices: list[torch.device]) -> None:
        """Rebuilds the replicas if the module, the devices or anything in the module tree changed."""
        if isinstance(module, torch.jit.ScriptModule):
            if self._script is None:
                self._script = _ScriptReplicas(self._trust_version_counters, self._copy_everything)
            self._script.sync(module, devices)
            self._module, self._devices, self._watch = weakref.ref(module), list(devices), None
            self.has_sync_batchnorm = self.has_compiled = False
            self.compiled_sync_batchnorm = []
            return
        self._script = None
        if (
            self._module is None
            or module is not self._module()
            or devices != self._devices
            or self._watch is None
            or not self._watch.unchanged()
        ):
            self._build(module, devices)
        for leaf, replicas in self._script_leaves:
            replicas.sync(leaf, devices)

    def check_device(self, expected: torch.device) -> None:
        (self._script or self._replicator).check_device(expected)
        for _, replicas in self._script_leaves:
            replicas.check_device(expected)

    def get(self, count: int, differentiable: bool) -> list[torch.nn.Module]:
        """The root replica of each of the first ``count`` slots, with up-to-date tensors."""
        if self._script is not None:
            return self._script.get(count, differentiable)
        slots = self._replicator.replicate(self._devices, count, differentiable)
        changed = False
        for j, tensors in enumerate(slots):
            if tensors is None:
                continue
            changed = True
            for target, key, index in self._targets[j]:
                target[key] = tensors[index]
            for replica in self._slots[j]:
                # RNNs cache their weights in a list; rebuild it from the tensors just installed.
                if hasattr(replica, "_flat_weights_names") and hasattr(replica, "_init_flat_weights"):
                    replica._init_flat_weights()
        if self._script_leaves:
            script_replicas = [replicas.get(count, differentiable) for _, replicas in self._script_leaves]
            for j, children, key, leaf in self._script_targets:
                if j < count and children[key] is not script_replicas[leaf][j]:
                    children[key] = script_replicas[leaf][j]
                    changed = True
        if changed or self._watch is None:
            self._watch_all()
        return self._roots[:count]

    def _build(self, module: torch.nn.Module, devices: list[torch.device]) -> None:
        modules = _eager_tree(module)
        position = {id(m): i for i, m in enumerate(modules)}
        eager = [m for m in modules if not isinstance(m, torch.jit.ScriptModule)]
        params = list({id(p): p for m in eager for p in m._parameters.values() if p is not None}.values())
        buffers = list({id(b): b for m in eager for b in m._buffers.values() if b is not None}.values())
        leaves = [m for m in modules if isinstance(m, torch.jit.ScriptModule)]
        self._script_leaves = [
            (leaf, _ScriptReplicas(self._trust_version_counters, self._copy_everything)) for leaf in leaves
        ]
        self._script_targets = []
        source = {id(p): i for i, p in enumerate(params)}
        source.update({id(b): len(params) + i for i, b in enumerate(buffers)})
        self._replicator.set_sources(params, buffers)
        compiled_in_place = [type(m).__name__ for m in modules if m.__dict__.get("_compiled_call_impl") is not None]
        if compiled_in_place and len(devices) > 1:
            warnings.warn(
                f"DataParallel: {', '.join(compiled_in_place)} compiled in place (module.compile()), which binds the "
                "compiled code to the module itself, so the replicas run uncompiled; wrap torch.compile(module) in "
                "DataParallel instead to run compiled replicas",
                stacklevel=3,
            )
        self._slots, self._targets = [], []
        callers: dict[int, Callable] = {}  # per torch.compile wrapper in the tree: its replicas' compiled call
        for _ in devices:
            # A ScriptModule stands for itself until get() installs its replica.
            copies = [m if isinstance(m, torch.jit.ScriptModule) else _replica_of(m) for m in modules]
            for replica in (c for c in copies if not isinstance(c, torch.jit.ScriptModule)):
                replica.__dict__["zero_grad"] = _ReplicaZeroGrad()
                if isinstance(replica, torch.nn.RNNBase):
                    replica.__dict__["flatten_parameters"] = _ReplicaFlattenParameters()
            targets = []
            for m, replica in zip(modules, copies):
                if isinstance(m, torch.jit.ScriptModule):
                    continue  # its replicas come from its own _ScriptReplicas, installed by get()
                replica.__dict__["_modules"] = {
                    name: None if child is None else copies[position[id(child)]] for name, child in m._modules.items()
                }
                for name, child in m._modules.items():
                    if isinstance(child, torch.jit.ScriptModule):
                        leaf = next(i for i, (s, _) in enumerate(self._script_leaves) if s is child)
                        self._script_targets.append((len(self._slots), replica.__dict__["_modules"], name, leaf))
                replica_params = dict(m._parameters)
                replica_buffers = dict(m._buffers)
                replica.__dict__["_parameters"] = replica_params
                replica.__dict__["_buffers"] = replica_buffers
                targets += [(replica_params, k, source[id(p)]) for k, p in m._parameters.items() if p is not None]
                targets += [(replica_buffers, k, source[id(b)]) for k, b in m._buffers.items() if b is not None]
                if _is_compile_wrapper(replica):
                    # Note [Compiled replicas]
                    # torch.compile's wrapper holds a forward bound to the module it wrapped. Each replica's
                    # forward must call the replica's own inner module instead, under the same compile context,
                    # and through one shared function that takes the module as an argument: dynamo then
                    # compiles one graph for every replica (a closure over each replica, as the wrapper builds,
                    # would recompile per replica and, beyond torch._dynamo's recompile limit, run uncompiled).
                    # _CompiledReplicaCall also keeps replicas from compiling the same graph side by side.
                    # Dynamo is not thread-safe beyond that (pytorch#118260): replicas checking their guards
                    # on several threads at once now and then fail them spuriously and compile again, and from
                    # torch 2.12 its config is per thread (pytorch#186537), so worker threads would not see the
                    # caller's. issuing="auto" therefore runs compiled replicas that share a device serially,
                    # on the caller's thread (_parallel_apply in parallel_apply.py).
                    if id(m) not in callers:
                        callers[id(m)] = _CompiledReplicaCall(m.dynamo_ctx)
                    replica.__dict__["forward"] = functools.partial(callers[id(m)], replica._modules["_orig_mod"])
            self._slots.append(copies)
            self._targets.append(targets)
        self._roots = [slot[0] for slot in self._slots]  # what get() returns (a fresh list of them)
        self._module, self._devices, self._watch = weakref.ref(module), list(devices), None
        self._source_dicts = [d for m in eager for d in (m.__dict__, m._parameters, m._buffers, m._modules)]
        self.has_sync_batchnorm = any(isinstance(m, SyncBatchNorm) for m in modules)
        self.has_compiled = bool(callers)
        self.compiled_sync_batchnorm = [
            name or "the module itself"
            for name, m in module.named_modules()
            if _is_compile_wrapper(m) and any(isinstance(s, SyncBatchNorm) for s in m.modules())
        ]
        # Watch at once: a DataParallel on one device never calls get(), and without a watch every sync()
        # rebuilt the replicas (on every forward). get() takes the watch again after it installs new tensors.
        self._watch_all()

    def _watch_all(self) -> None:
        dicts = list(self._source_dicts)
        for m in [r for slot in self._slots for r in slot if not isinstance(r, torch.jit.ScriptModule)]:
            dicts += [m.__dict__, m._parameters, m._buffers, m._modules]
        self._watch = _C.DictWatch(dicts)


def _eager_tree(module: torch.nn.Module) -> list[torch.nn.Module]:
    """module.modules() (pre-order, each module once), less what is inside a ScriptModule: a ScriptModule keeps its
    state in C++ objects, and a _ScriptReplicas replicates it whole."""
    tree: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(m: torch.nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        tree.append(m)
        if not isinstance(m, torch.jit.ScriptModule):
            for child in m._modules.values():
                if child is not None:
                    visit(child)

    visit(module)
    return tree


class _ScriptReplicas:
    """Persistent replicas of a ScriptModule, whose state lives in C++ objects rather than in Python dicts: the C++
    engine makes and refreshes them (Note [TorchScript replicas] in script_data_parallel.cpp), and each replica gets
    a Python wrapper, made once per build, whose forward runs the compiled code without the GIL."""

    def __init__(self, trust_version_counters: bool, copy_everything: bool = False) -> None:
        # copy_everything: torch_dp's own tests (later replicas copy every tensor, as on other devices).
        self._replicas = _C.ScriptReplicas(trust_version_counters, copy_everything)
        self._module: weakref.ref | None = None
        self._generation = -1
        self._wrappers: list[torch.nn.Module] = []

    def sync(self, module: torch.jit.ScriptModule, devices: list[torch.device]) -> None:
        self._replicas.sync(module._c, devices)
        self._module = weakref.ref(module)

    def check_device(self, expected: torch.device) -> None:
        self._replicas.check_device(expected)

    def get(self, count: int, differentiable: bool) -> list[torch.nn.Module]:
        replicas = self._replicas.get(count, differentiable)
        if self._replicas.generation != self._generation or len(self._wrappers) < count:
            module = self._module() if self._module is not None else None
            self._wrappers = [
                module if self._replicas.uses_module(j) and module is not None else _wrap_script_module(replica)
                for j, replica in enumerate(replicas)
            ]
            self._generation = self._replicas.generation
        return self._wrappers[:count]


def _wrap_script_module(module: Any) -> torch.nn.Module:
    from torch.jit._recursive import wrap_cpp_module

    return wrap_cpp_module(module)


def replicate(network: torch.nn.Module, devices: Sequence[DeviceLike], detach: bool = False) -> list[torch.nn.Module]:
    """One replica of ``network`` per device. Replicas on the network's own device share its parameters;
    elsewhere they hold copies whose gradients flow back to the network (unless ``detach``)."""
    if not devices:
        return []
    targets = _as_devices(devices, "devices")
    replicas = _Replicas()
    replicas.sync(network, targets)
    return replicas.get(len(targets), differentiable=not detach)


# Every _Replicas alive, for the reset in a forked child (Note [After fork] in parallel_apply.py).
_live_replicas: weakref.WeakSet[_Replicas] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A fresh lock for every _Replicas, and no watch, so that its next sync() rebuilds it: another thread may
    have been half-way through updating it at the fork (Note [After fork] in parallel_apply.py)."""
    for replicas in list(_live_replicas):
        replicas.lock = threading.Lock()
        replicas._watch = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
