"""torch_dp.DataParallel, a drop-in for torch.nn.DataParallel on torch_dp's C++ engine, and its functional form
torch_dp.data_parallel (torch.nn.parallel.data_parallel's signature): front-ends of one engine (engine.py)."""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch.nn.parallel.data_parallel import _check_balance

from torch_dp.arguments import (
    _MINUS_ONE_DEPRECATED,
    DeviceLike,
    _accelerator_type,
    _as_device,
    _checked_arguments,
    _checked_chunk_sizes,
    _checked_flag,
    _checked_issuing,
    _is_minus_one,
    _public_id,
)
from torch_dp.engine import _Engine, _split_tensors
from torch_dp.parallel_apply import _default_pool, _device_of
from torch_dp.replicate import replicate
from torch_dp.scatter_gather import (
    _all_tensors,
    _checked_kwargs,
    _devices_that_run,
    _gather,
    _scatter_kwargs,
    gather,
)
from torch_dp.scattered_outputs import ScatteredOutputs

__all__ = ["DataParallel", "data_parallel"]

T = TypeVar("T", bound=torch.nn.Module)

# The same profiler event as torch.autograd.profiler.record_function, at a twentieth of its cost per forward
# (measured on a CPU: 0.25 us against 6.7 us); record_function where torch lacks it.
_record_function = getattr(torch._C._profiler, "_RecordFunctionFast", torch.autograd.profiler.record_function)


class DataParallel(torch.nn.DataParallel):
    r"""Implements data parallelism at the module level, like :class:`torch.nn.DataParallel`, whose
    signature, attributes, ``state_dict`` keys and results it keeps (``isinstance(dp, torch.nn.DataParallel)``
    holds).

    The input is split along ``dim`` into one chunk per device (``torch.chunk`` rule), the module runs on each
    chunk in a replica, and the outputs are concatenated on ``output_device``. Unlike PyTorch's version,
    replicas and worker threads persist between forwards: a replica's parameters are the module's own where
    they live on the same device, and copies elsewhere are refreshed before every forward. Anything changed on
    ``dp.module`` between forwards (weights, also through ``.data``, fused optimizers or BatchNorm's running
    statistics, submodules, attributes, train/eval, hooks, dtype) is seen by the next forward.

    TorchScript modules (``torch.jit.script``, ``torch.jit.trace``, ``torch.jit.load``), and scripted submodules
    of an eager model, are replicated by the C++ engine (Note [TorchScript replicas] in script_data_parallel.cpp)
    under the same contract; their replicas run their compiled code without the GIL.

    ``device_ids`` entries may be ints, strings or ``torch.device`` objects, including ``"cpu"``: with
    ``device_ids=["cpu"] * 4`` four replicas run on CPU threads. Repeated ids run several replicas on one
    device. Without an accelerator and without ``"cpu"`` entries the module is called directly, as upstream.

    ``chunk_sizes`` (keyword only, not in PyTorch's signature) gives the rows of each device's chunk instead of
    the even split, for devices of unequal memory or speed: ``chunk_sizes=[16, 24, 24]`` over three GPUs takes
    batches of exactly 64 rows along ``dim``. A size other than the first may be 0: that device then runs no
    replica (Note [Empty chunks]).

    ``issuing`` (keyword only) says how the replicas run: ``"threads"`` runs them at once on persistent worker
    threads (upstream's behaviour), ``"serial"`` one after another on the calling thread. ``"auto"`` (the
    default) uses threads across distinct devices; for replicas sharing one device, which share its stream and
    so differ only in host time, it times both ways over the first forwards and keeps the faster (serial wins
    for small models, threads for heavy ones). Results are the same either way. SyncBatchNorm layers need
    their replicas running at once, so with them ``"auto"`` uses the threads and ``"serial"`` is an error;
    ``torch.compile``'d modules are run serially by ``"auto"`` on one device, dynamo not being thread-safe.

    ``trust_version_counters`` (keyword only, default ``False``) is an opt-in for inference on several
    devices: replicas' copies of the module's tensors are refreshed only when a tensor's version counter or data
    pointer moved. Writes that move neither are then missed: fused optimizers (``fused=True``), in-place edits
    through ``.data``, BatchNorm statistics updated by running ``dp.module`` itself, writes through
    ``data_ptr()`` from extensions. Leave it off when training.

    ``reproducible`` (keyword only, default ``False``) makes two runs with the same seed bitwise equal where
    random ops in the forward (dropout, ``randn_like``) would otherwise depend on thread timing: replicas that
    share a device (``["cpu"] * 4``, ``[0, 0]``) share its random generator, and run one after another in index
    order, drawing from it as the chunks run one after another through the module would. Replicas on distinct
    devices still run at once; ``"auto"`` then measures nothing. With SyncBatchNorm layers the replicas of a
    device take turns between the layers instead (Note [Reproducible replicas] in parallel_apply.cpp).
    """

    def __init__(
        self,
        module: T,
        device_ids: Sequence[DeviceLike] | None = None,
        output_device: DeviceLike | None = None,
        dim: int = 0,
        *,
        chunk_sizes: Sequence[int] | None = None,
        issuing: str = "auto",
        trust_version_counters: bool = False,
        reproducible: bool = False,
    ) -> None:
        torch.nn.Module.__init__(self)  # nn.DataParallel.__init__ would reject CPU devices
        torch._C._log_api_usage_once("torch_dp.DataParallel")
        self._engine: _Engine | None = None
        self.chunk_sizes: tuple[int, ...] | None = None
        self.issuing = _checked_issuing(issuing)
        self.trust_version_counters = _checked_flag(trust_version_counters, "trust_version_counters")
        self.reproducible = _checked_flag(reproducible, "reproducible")
        accelerator = _accelerator_type()
        if accelerator is None and not _names_cpu(device_ids):
            # No accelerator: call the module directly, as torch.nn.DataParallel does.
            self.module = module
            self.device_ids = []
            return
        # The same checks, and errors, as torch_dp.data_parallel's.
        devices, output_device, self._output_device_obj = _checked_arguments(
            device_ids, output_device, dim, accelerator
        )
        self.chunk_sizes = _checked_chunk_sizes(chunk_sizes, len(devices))
        self.dim = dim
        self.module = module
        self.device_ids = [_public_id(d) for d in devices]
        self.output_device = output_device if isinstance(output_device, int) else _public_id(self._output_device_obj)
        self.src_device_obj = devices[0]
        self._devices = devices
        self._set_replica_devices()
        if accelerator == "cuda" and all(d.type == "cuda" for d in devices):
            _check_balance(self.device_ids)
        if len(devices) == 1:
            _check_movable(module, self.src_device_obj)
            self.module.to(self.src_device_obj)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        with _record_function("DataParallel.forward"):
            if not self.device_ids:
                return self.module(*inputs, **kwargs)
            if not _own_steps(self):
                outputs = self._replica_outputs(inputs, kwargs)
                return outputs[0] if len(self.device_ids) == 1 else self.gather(outputs, self.output_device)
            # Note [Tensor-only forwards]
            module = self._modules.get("module")
            if module is None:
                module = self.module  # nn.Module's error for a deleted submodule
            engine = self._engine
            if engine is None:
                engine = self._get_engine()
            if (
                not kwargs
                and self.chunk_sizes is None
                and (isinstance(inputs[0], torch.Tensor) if len(inputs) == 1 else inputs and _all_tensors(inputs))
            ):
                split, arguments = _split_tensors, (inputs, self._devices, self.dim)
            else:
                split, arguments = _scatter_kwargs, (inputs, kwargs, self._devices, self.dim, self.chunk_sizes)
            outputs = engine.replica_outputs(
                module, self._replica_devices, split, arguments, self.issuing, self.reproducible
            )
            if len(self.device_ids) == 1:
                return outputs[0]
            if _is_minus_one(self.output_device):
                return gather(outputs, -1, dim=self.dim)  # warns, as upstream
            return _gather(outputs, self._output_device_obj, self.dim)  # checked and resolved in __init__

    def forward_scattered(self, *inputs: Any, **kwargs: Any) -> ScatteredOutputs:
        """The forward without its gather: the replicas' outputs stay on the devices that computed them, in a
        :class:`torch_dp.ScatteredOutputs` with their devices and chunk sizes along ``dim``, for a
        :class:`torch_dp.ParallelCriterion` (the loss computed on the replicas, so that ``output_device`` never
        holds the whole output and its gradient). ``.gather()`` on it gives what ``forward`` returns. Hooks
        registered on this wrapper itself do not run (those on ``self.module`` do)."""
        with _record_function("DataParallel.forward_scattered"):
            dim = getattr(self, "dim", 0)  # not set without devices, as upstream
            if not self.device_ids:
                output = self.module(*inputs, **kwargs)
                device = _device_of(output)
                return ScatteredOutputs([output], [device], dim, device, pool=_default_pool(), issuing=self.issuing)
            outputs = self._replica_outputs(inputs, kwargs)
            return ScatteredOutputs(
                outputs,
                self._replica_devices[: len(outputs)],
                dim,
                self._output_device_obj,
                pool=self._get_engine().pool,
                issuing=self.issuing,
                reproducible=getattr(self, "reproducible", False),
            )

    # Note [Tensor-only forwards]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # Most forwards pass tensors as positional arguments only, to a DataParallel whose four steps are its own (not
    # overridden by a subclass or on the instance). For those, forward hands the engine the split without a pytree
    # walk (_scatter_tensors), the module from _modules without nn.Module.__getattr__'s failed attribute lookup,
    # and gathers directly; the module tree is checked once per forward (no user code runs between scatter and
    # replicate that could change the tree). What every forward checks stays: the module tree (DictWatch) and the
    # replicas' tensors refreshed from the module's (the Replicator), the device of the module's tensors, the
    # chunk counts. With one device the module is called on the scattered input, as torch.nn.DataParallel does.
    # Per-forward figures: BENCHMARKS.md, per-forward overhead.
    def _replica_outputs(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The engine's outputs for the steps of this DataParallel's class and instance: a subclass's own scatter,
        replicate or parallel_apply runs in place of the engine's step."""
        module = self.module

        def replicate(count: int) -> Any:
            # replicate checks the module tree again (an overridden scatter may have changed it); with nothing
            # changed that check reads no dict entry (Note [Watching a module tree]).
            return self.replicate(module, self._replica_ids[:count])

        return self._get_engine().replica_outputs(
            module,
            self._replica_devices,
            self.scatter,
            (inputs, kwargs, self.device_ids),
            self.issuing,
            self.reproducible,
            replicate,
            self.parallel_apply,
        )

    # The four steps are methods, as upstream, so subclasses can override any of them.

    def replicate(self, module: T, device_ids: Sequence[DeviceLike]) -> list[T]:
        if module is not self.module or not self._is_prefix(device_ids, self._replica_ids):
            return replicate(module, device_ids, not torch.is_grad_enabled())
        engine = self._get_engine()
        engine.replicas.sync(module, self._replica_devices)
        return engine.replicas.get(len(device_ids), differentiable=torch.is_grad_enabled())

    def scatter(self, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None, device_ids: Sequence[DeviceLike]) -> Any:
        devices = self._devices if self._is_prefix(device_ids) and len(device_ids) == len(self._devices) else None
        if devices is None:  # another device list: torch.chunk's split over it
            devices = [_as_device(d, _accelerator_type()) for d in device_ids]
            return _scatter_kwargs(tuple(inputs), kwargs or {}, devices, self.dim)
        return _scatter_kwargs(tuple(inputs), kwargs or {}, devices, self.dim, self.chunk_sizes)

    def parallel_apply(self, replicas: Sequence[T], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        return self._get_engine().run(
            replicas, inputs, kwargs, self._replica_devices[: len(replicas)], self.issuing, self.reproducible
        )

    def gather(self, outputs: Any, output_device: DeviceLike) -> Any:
        if output_device is self.output_device and not (isinstance(output_device, int) and output_device == -1):
            return _gather(outputs, self._output_device_obj, self.dim)  # checked and resolved in __init__
        return gather(outputs, output_device, dim=self.dim)

    # ---- internals ------------------------------------------------------------------------------------------

    def _get_engine(self) -> _Engine:
        if self._engine is None:
            self._engine = _Engine(self.trust_version_counters)
        return self._engine

    def _is_prefix(self, device_ids: Sequence[DeviceLike], ids: Sequence[DeviceLike] | None = None) -> bool:
        ids = self.device_ids if ids is None else ids
        if device_ids is ids:  # forward passes its own list
            return True
        return len(device_ids) <= len(ids) and all(a is b or a == b for a, b in zip(device_ids, ids))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None  # threads and caches are rebuilt on the next forward
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("issuing", "auto")  # pickled before `issuing` existed
        state.setdefault("trust_version_counters", False)
        state.setdefault("reproducible", False)
        super().__setstate__(state)
        self._engine = None
        if self.device_ids and "_replica_devices" not in state:  # pickled before empty chunks ran no replica
            self._set_replica_devices()

    def _set_replica_devices(self) -> None:
        """The devices that run a replica, in order: those whose chunk_sizes entry is not 0 (Note [Empty
        chunks]). The same list objects as _devices and device_ids without chunk_sizes."""
        if getattr(self, "chunk_sizes", None) is None:
            self._replica_devices, self._replica_ids = self._devices, self.device_ids
        else:
            runs = _devices_that_run(self.chunk_sizes)
            self._replica_devices = [self._devices[i] for i in runs]
            self._replica_ids = [self.device_ids[i] for i in runs]


# The four steps as DataParallel defines them (Note [Tensor-only forwards]).
_STEPS = {name: DataParallel.__dict__[name] for name in ("scatter", "replicate", "parallel_apply", "gather")}
_SCATTER, _REPLICATE, _PARALLEL_APPLY, _GATHER = _STEPS.values()


def _own_steps(dp: DataParallel) -> bool:
    """Whether dp runs DataParallel's own four steps: none overridden by its class or on the instance."""
    cls = type(dp)
    if (
        cls.scatter is not _SCATTER
        or cls.replicate is not _REPLICATE
        or cls.parallel_apply is not _PARALLEL_APPLY
        or cls.gather is not _GATHER
    ):
        return False
    attributes = dp.__dict__
    return not (
        "scatter" in attributes or "replicate" in attributes or "parallel_apply" in attributes or "gather" in attributes
    )


def _names_cpu(device_ids: Sequence[DeviceLike] | None) -> bool:
    def is_cpu(d: Any) -> bool:
        return (isinstance(d, str) and d.split(":")[0] == "cpu") or (isinstance(d, torch.device) and d.type == "cpu")

    if device_ids is None or isinstance(device_ids, int):
        return False
    if isinstance(device_ids, (str, torch.device)):
        # device_ids="cpu" asks for CPU replicas, in the wrong form: an error (as from data_parallel), not a
        # silent call of the module.
        return is_cpu(device_ids)
    # Anything else that is not a list of devices is ignored without an accelerator, as upstream does.
    return isinstance(device_ids, Sequence) and any(is_cpu(d) for d in device_ids)


def _check_movable(module: torch.nn.Module, device: torch.device) -> None:
    """With one device, DataParallel moves the module there, as upstream. A meta tensor cannot be moved (it has
    no data), and module.to would fail half-way, with some tensors moved: say so before anything changed."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta and device.type != "meta":
                raise RuntimeError(
                    f"module must have its parameters and buffers on device {device} (device_ids[0]) but {kind} "
                    f"'{name}' is on device meta, which holds no data to move there; materialize the module first "
                    "(module.to_empty(device=...) and load its weights)"
                )


# ---- data_parallel, the functional form -------------------------------------------------------------------

# The functional form's engines, one per module as the C++ data_parallel keeps one, dropped with the module.
_functional_engines: weakref.WeakKeyDictionary[torch.nn.Module, _Engine] = weakref.WeakKeyDictionary()
_functional_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A fresh lock for the functional form's cache (Note [After fork] in parallel_apply.py)."""
    global _functional_lock
    _functional_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def data_parallel(
    module: torch.nn.Module,
    inputs: Any,
    device_ids: Sequence[DeviceLike] | None = None,
    output_device: DeviceLike | None = None,
    dim: int = 0,
    module_kwargs: dict[str, Any] | None = None,
    *,
    reproducible: bool = False,
) -> Any:
    """Evaluates ``module(*inputs, **module_kwargs)`` in parallel across ``device_ids``, like
    ``torch.nn.parallel.data_parallel``. Replicas are cached per module between calls. ``reproducible`` (keyword
    only) as for :class:`DataParallel`."""
    _checked_flag(reproducible, "reproducible")
    if not isinstance(inputs, tuple):
        inputs = (inputs,) if inputs is not None else ()
    # Every check that does not need the replicas' outputs comes first, gather's included: a training-mode
    # module's BatchNorm statistics must not move for a call that fails.
    devices, output_device, target = _checked_arguments(device_ids, output_device, dim, _accelerator_type())
    module_kwargs = _checked_kwargs(module_kwargs, "module_kwargs")
    with _functional_lock:
        engine = _functional_engines.get(module)
        if engine is None:
            engine = _functional_engines[module] = _Engine()

    outputs = engine.replica_outputs(
        module, devices, _scatter_kwargs, (inputs, module_kwargs, devices, dim), "auto", reproducible
    )
    if len(devices) == 1:
        return outputs[0]
    if _is_minus_one(output_device):
        warnings.warn(_MINUS_ONE_DEPRECATED, FutureWarning, stacklevel=2)
    return _gather(outputs, target, dim)
