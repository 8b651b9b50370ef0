"""The functional forms, with torch.nn.parallel's signatures: scatter, scatter_kwargs, gather, replicate,
parallel_apply and data_parallel. The work happens in torch_dp._C; this module maps Python structures onto
tensor lists with torch.utils._pytree and keeps replicas and worker threads alive between calls."""

from __future__ import annotations

import functools
import os
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.utils._pytree as pytree
from torch._utils import ExceptionWrapper, _get_all_device_indices, _get_available_device_type

from torch_dp import _C
from torch_dp.sync_batchnorm import PeerReplicaFailed, SyncBatchNorm, SyncGroup, in_replica, replica_context

__all__ = ["scatter", "scatter_kwargs", "gather", "replicate", "parallel_apply", "data_parallel"]

DeviceLike = Union[int, str, torch.device]


# ---- devices -----------------------------------------------------------------------------------------------

def _accelerator_type() -> Optional[str]:
    """The accelerator PyTorch's DataParallel would use (None without one; MPS is not supported, as upstream)."""
    device_type = _get_available_device_type()
    return None if device_type == "mps" else device_type


def _as_device(device: DeviceLike, accelerator: Optional[str]) -> torch.device:
    """One entry of device_ids as a torch.device with an index (CPU has none), or a clear error."""
    if isinstance(device, torch.device):
        result = device
    elif isinstance(device, str):
        try:
            result = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"invalid device {device!r}: {error}") from None
    elif isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(
                f"invalid device index {device}: device indices must be non-negative (use 'cpu' for the CPU)"
            )
        if accelerator is None:
            raise ValueError(
                f"device index {device} was given, but no accelerator is available; use 'cpu' entries "
                "(for example device_ids=['cpu', 'cpu']) to run replicas on the CPU"
            )
        result = torch.device(accelerator, device)
    else:
        raise TypeError(
            "a device must be an int index, a string such as 'cuda:0' or 'cpu', or a torch.device, "
            f"but got {type(device).__name__}: {device!r}"
        )
    if result.type == "cpu":
        return torch.device("cpu")
    backend = getattr(torch, result.type, None)
    if backend is None or not hasattr(backend, "device_count") or not backend.is_available():
        raise ValueError(f"device {result} is not available on this machine: expected {_usable_devices(accelerator)}")
    index = result.index if result.index is not None else backend.current_device()
    count = backend.device_count()
    if index >= count:
        raise ValueError(
            f"device {result.type}:{index} does not exist: this machine has {count} {result.type} device(s), "
            f"indices 0 to {count - 1}"
        )
    return torch.device(result.type, index)


def _usable_devices(accelerator: Optional[str]) -> str:
    """What a device argument may name on this machine, for error messages."""
    if accelerator is None:
        return "'cpu' (no accelerator is available)"
    count = getattr(torch, accelerator).device_count()
    return f"'cpu' or a {accelerator} device, index 0 to {count - 1}"


def _as_devices(
    devices: Sequence[DeviceLike], name: str = "target_gpus", accelerator: Optional[str] = None
) -> list[torch.device]:
    """A list of devices (``name`` is the argument's name, for the error messages), each checked."""
    if isinstance(devices, (str, int, torch.device)):
        # A string is a sequence too, and would be read character by character ("invalid device 'c'").
        raise TypeError(f"{name} must be a sequence of devices, but got a single device {devices!r}")
    try:
        entries = list(devices)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of devices, but got {type(devices).__name__}: {devices!r}"
        ) from None
    accelerator = accelerator if accelerator is not None else _accelerator_type()
    return [_as_device(d, accelerator) for d in entries]


def _checked_dim(dim: int) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, but got {type(dim).__name__}: {dim!r}")
    return dim


def _is_minus_one(device: Optional[DeviceLike]) -> bool:
    """Whether device is upstream's -1, its deprecated way of saying the CPU."""
    return isinstance(device, int) and not isinstance(device, bool) and device == -1


_MINUS_ONE_DEPRECATED = (
    'Using -1 to represent CPU tensor is deprecated. Please use a device object or string instead, e.g., "cpu".'
)


def _as_output_device(device: Optional[DeviceLike]) -> torch.device:
    """gather's target: an index, -1 (the CPU, deprecated upstream), a string or a torch.device."""
    if device is None:
        accelerator = _accelerator_type()
        if accelerator is None:
            return torch.device("cpu")
        return torch.device(accelerator, getattr(torch, accelerator).current_device())
    if _is_minus_one(device):
        warnings.warn(_MINUS_ONE_DEPRECATED, FutureWarning, stacklevel=3)
        return torch.device("cpu")
    return _as_device(device, _accelerator_type())


def _checked_arguments(
    device_ids: Optional[Sequence[DeviceLike]],
    output_device: Optional[DeviceLike],
    dim: int,
    accelerator: Optional[str],
) -> tuple[list[torch.device], DeviceLike, torch.device]:
    """The argument checks DataParallel and data_parallel share, so that a mistake gets the same error from
    both, before anything runs: the devices of ``device_ids`` (every accelerator device for None),
    ``output_device`` as given (``device_ids[0]`` for None) with the device it names, and ``dim``."""
    if device_ids is None:
        if accelerator is None:
            raise RuntimeError("device type could not be determined")  # upstream's text
        device_ids = _get_all_device_indices()
    devices = _as_devices(device_ids, "device_ids", accelerator)
    if not devices:
        raise ValueError("device_ids is empty: give at least one device, e.g. device_ids=[0] or ['cpu']")
    _checked_dim(dim)
    if output_device is None:
        output_device = _public_id(devices[0])
    # -1 is checked here but warned about where it is used, at every gather, as upstream.
    target = torch.device("cpu") if _is_minus_one(output_device) else _as_device(output_device, accelerator)
    return devices, output_device, target


def _label(device: torch.device) -> str:
    """How PyTorch names a replica's device in 'Caught X in replica i on device d.': the index, or cpu."""
    return "cpu" if device.type == "cpu" else str(device.index)


def _public_id(device: torch.device) -> Union[int, torch.device]:
    """device_ids entries as nn.DataParallel stores them: int indices; CPU entries stay torch.device('cpu')."""
    return device if device.type == "cpu" else device.index


# ---- scatter -----------------------------------------------------------------------------------------------

def _leaf_name(path: tuple, roots: Optional[tuple[str, ...]]) -> str:
    """How error messages name the leaf at `path`: "args[0]", "kwargs['mask'][1]", or "input"."""
    if roots is not None and path:
        # (args, kwargs) from scatter_kwargs: name the argument, not its position in that pair.
        return roots[path[0].idx] + pytree.keystr(path[1:])
    return pytree.keystr(path) or "input"


def _describe_counts(obj: Any, devices: list[torch.device], dim: int, roots: Optional[tuple[str, ...]] = None) -> str:
    parts = []
    for path, leaf in pytree.tree_flatten_with_path(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            where = _leaf_name(path, roots)
            size = leaf.size(dim) if leaf.dim() > 0 else "a scalar"
            chunks = len(_C.chunk_sizes(leaf.size(dim), len(devices))) if leaf.dim() > 0 else "-"
            parts.append(f"{where}: {size} along dim {dim} -> {chunks} chunks")
    return "; ".join(parts)


def _check_sizes_fit(obj: Any, sizes: Sequence[int], dim: int, roots: Optional[tuple[str, ...]] = None) -> None:
    """With explicit chunk sizes every tensor must have exactly their sum along dim (or hold one value per
    replica, Note [Which tensors set the batch]): say which one does not."""
    total = sum(sizes)
    for path, leaf in pytree.tree_flatten_with_path(obj)[0]:
        if not isinstance(leaf, torch.Tensor) or (leaf.dim() > 0 and leaf.size(dim) == total):
            continue
        if leaf.dim() > 0 and _is_per_replica(leaf, dim, len(sizes)):
            continue
        size = f"{leaf.size(dim)} along dim {dim}" if leaf.dim() > 0 else "a 0-dim tensor"
        raise ValueError(
            f"DataParallel was given chunk_sizes={list(sizes)}, which split exactly {total} rows along dim {dim}, "
            f"but {_leaf_name(path, roots)} has {size}; give every batch {total} rows (for a DataLoader, "
            "drop_last=True) or leave chunk_sizes=None for torch.chunk's even split"
        )


# Note [Which tensors set the batch]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch.nn.DataParallel chunks every tensor argument and zips the chunk lists without strict=True, so the replica
# count is the smallest chunk count of any tensor, and the chunks beyond it are dropped silently: a batch of 8
# rows with a mask of 3 rows over 4 devices runs 3 replicas on 6 of the 8 rows. Programs also rely on that drop:
# Hugging Face's Trainer passes num_items_in_batch as one equal row per device (expand(n_gpu, -1), then divided,
# which makes it dense again), so a last batch of 1 row on 2 replicas, or 9 rows on 4 (3 chunks), meets a tensor
# of 2 or 4 chunks. torch_dp keeps upstream's result where nothing real is dropped, and raises where it would be:
#  - The batch is set by the tensors that are not expanded along dim (stride 0 with more than one row): the
#    replica count is the smallest chunk count among them (among all tensors when every one is expanded).
#  - A tensor with more chunks than that is cut to the replicas that run, as upstream, only when it holds one
#    value per replica: expanded along dim, no rows at all, or one row per device with every row equal (the
#    value check, a device sync, runs only for such a tensor and only when the counts differ). Rows of any other
#    tensor would be lost, and that, or a tensor with fewer chunks than the batch, is the ValueError that names
#    every tensor and its chunk count.
# With chunk_sizes the batch has sum(chunk_sizes) rows; a tensor of another size that holds one value per replica
# is split as without chunk_sizes (torch.chunk over every device), and each replica that runs gets its device's
# chunk. Replicas whose chunk_sizes entry is 0 do not run (Note [Empty chunks]). data_parallel.cpp applies the
# same rule to the C++ module's arguments.
def _is_expanded(tensor: torch.Tensor, dim: int) -> bool:
    """Whether tensor's rows along dim are one row repeated by construction (expand, broadcast_to)."""
    return tensor.layout == torch.strided and tensor.size(dim) > 1 and tensor.stride(dim) == 0


def _is_per_replica(tensor: torch.Tensor, dim: int, num_devices: int) -> bool:
    """Whether dropping some of tensor's chunks loses nothing (Note [Which tensors set the batch])."""
    size = tensor.size(dim)
    if size == 0 or _is_expanded(tensor, dim):
        return True
    if size != num_devices or tensor.layout != torch.strided:
        return False
    values = tensor.detach()
    return torch.equal(values, values.narrow(dim, 0, 1).expand_as(values))


def _cut_to_batch(
    obj: Any,
    tensors: list[torch.Tensor],
    chunked: list[list[torch.Tensor]],
    devices: list[torch.device],
    dim: int,
    roots: Optional[tuple[str, ...]],
) -> list[list[torch.Tensor]]:
    """Chunk lists of different lengths cut to the replica count, or the error (Note [Which tensors set the
    batch])."""
    counts = [len(chunks) for tensor, chunks in zip(tensors, chunked) if not _is_expanded(tensor, dim)]
    count = min(counts or [len(chunks) for chunks in chunked])
    for tensor, chunks in zip(tensors, chunked):
        if len(chunks) < count or (len(chunks) > count and not _is_per_replica(tensor, dim, len(devices))):
            # nn.DataParallel silently drops the extra chunks here; a wrong batch is worse than an error.
            raise ValueError(
                "DataParallel scatters every tensor argument along dim "
                f"{dim}, and these give different numbers of chunks over {len(devices)} devices: "
                f"{_describe_counts(obj, devices, dim, roots)}. Give all tensor arguments the same size along dim "
                f"{dim} (only a tensor that holds one value per replica, expanded along dim {dim} or with one equal "
                "row per device, may give more chunks than the batch: it is cut to the replicas that run)."
            )
    return [chunks[:count] for chunks in chunked]


def _devices_that_run(sizes: Sequence[int]) -> list[int]:
    """The indices of the devices that run a replica: those whose chunk size is not 0 (Note [Empty chunks])."""
    return [i for i, n in enumerate(sizes) if n > 0]


def _split_tensors(
    obj: Any,
    tensors: list[torch.Tensor],
    devices: list[torch.device],
    dim: int,
    roots: Optional[tuple[str, ...]],
    sizes: Optional[Sequence[int]],
) -> list[list[torch.Tensor]]:
    """The chunks of each of obj's tensors (given in tree order), one per replica that runs."""
    if sizes is None:
        chunked = [_C.scatter(tensor, devices, None, dim) for tensor in tensors]
        if any(len(chunks) != len(chunked[0]) for chunks in chunked):
            chunked = _cut_to_batch(obj, tensors, chunked, devices, dim, roots)
        return chunked
    _check_sizes_fit(obj, sizes, dim, roots)
    runs = _devices_that_run(sizes)  # the others get no chunk
    run_devices, run_sizes, total = [devices[i] for i in runs], [sizes[i] for i in runs], sum(sizes)
    chunked = []
    for tensor in tensors:
        if tensor.size(dim) == total:
            chunked.append(_C.scatter(tensor, run_devices, run_sizes, dim))
            continue
        chunks = _C.scatter(tensor, devices, None, dim)  # one value per replica: split as without chunk_sizes
        if runs[-1] >= len(chunks):
            raise ValueError(
                f"DataParallel was given chunk_sizes={list(sizes)}, and a tensor of {tensor.size(dim)} rows along dim "
                f"{dim} that holds one value per replica gives {len(chunks)} chunks over {len(devices)} devices, "
                f"but device {runs[-1]} runs a replica; give it one row per device"
            )
        chunked.append([chunks[i] for i in runs])
    return chunked


def _split_tree(
    obj: Any,
    devices: list[torch.device],
    dim: int,
    roots: Optional[tuple[str, ...]] = None,
    sizes: Optional[Sequence[int]] = None,
) -> Optional[list[Any]]:
    """obj once per replica, its tensors chunked (torch.chunk's split, or `sizes`); None when obj holds no
    tensor."""
    leaves, spec = pytree.tree_flatten(obj)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not positions:
        return None
    chunked = _split_tensors(obj, [leaves[i] for i in positions], devices, dim, roots, sizes)
    replicas = []
    for r in range(len(chunked[0])):
        replica_leaves = list(leaves)
        for i, chunks in zip(positions, chunked):
            replica_leaves[i] = chunks[r]
        replicas.append(pytree.tree_unflatten(replica_leaves, spec))
    return replicas


_ARGS_KWARGS = ("args", "kwargs")


def _scatter_kwargs(
    inputs: tuple, kwargs: dict, devices: list[torch.device], dim: int, sizes: Optional[Sequence[int]] = None
) -> tuple[tuple, tuple]:
    if sizes is None and not kwargs and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        chunked = [_C.scatter(x, devices, None, dim) for x in inputs]
        if any(len(chunks) != len(chunked[0]) for chunks in chunked):
            chunked = _cut_to_batch((inputs, kwargs), list(inputs), chunked, devices, dim, _ARGS_KWARGS)
        return tuple(zip(*chunked)), tuple({} for _ in range(len(chunked[0])))
    split = _split_tree((inputs, kwargs), devices, dim, _ARGS_KWARGS, sizes)
    if split is None:
        # No tensors: every replica gets the same objects (one replica for a call without arguments).
        replicas = len(devices) if sizes is None else sum(1 for n in sizes if n > 0)
        split = [(inputs, kwargs)] * (replicas if (inputs or kwargs) else 0)
    return tuple(tuple(args) for args, _ in split), tuple(kw for _, kw in split)


def scatter_kwargs(
    inputs: tuple[Any, ...],
    kwargs: Optional[dict[str, Any]],
    target_gpus: Sequence[DeviceLike],
    dim: int = 0,
) -> tuple[tuple[Any, ...], tuple[dict[str, Any], ...]]:
    """Splits positional and keyword arguments into one (args, kwargs) pair per replica.

    Tensors anywhere in the nested structure (tuple, list, dict, namedtuple and any pytree-registered type)
    are chunked along ``dim`` like ``torch.chunk``; other values are passed to every replica as they are."""
    devices = _as_devices(target_gpus)
    kwargs = _checked_kwargs(kwargs, "kwargs")
    inputs = tuple(inputs) if inputs is not None else ()
    return _scatter_kwargs(inputs, kwargs, devices, _checked_dim(dim))


def _checked_kwargs(kwargs: Optional[dict[str, Any]], name: str) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        # Found here, before anything runs, rather than by ** in every replica's call.
        raise TypeError(f"{name} must be a dict of keyword arguments, but got {type(kwargs).__name__}: {kwargs!r}")
    return kwargs


def scatter(inputs: Any, target_gpus: Sequence[DeviceLike], dim: int = 0) -> Any:
    """Splits ``inputs`` across devices: a tuple of chunks for a tensor, else a list with one copy of the
    structure per device, its tensors chunked."""
    devices = _as_devices(target_gpus)
    _checked_dim(dim)
    if isinstance(inputs, torch.Tensor):
        return tuple(_C.scatter(inputs, devices, None, dim))
    split = _split_tree(inputs, devices, dim)
    return split if split is not None else [inputs for _ in devices]


# ---- gather ------------------------------------------------------------------------------------------------

def gather(outputs: Sequence[Any], target_device: Optional[DeviceLike], dim: int = 0) -> Any:
    """Concatenates the replicas' outputs on ``target_device`` along ``dim``, keeping their structure."""
    target = _as_output_device(target_device)
    _checked_dim(dim)
    if len(outputs) == 0:
        raise ValueError("gather: expected the outputs of at least one replica, but got none")
    return _gather(outputs, target, dim)


def _gather(outputs: Sequence[Any], target: torch.device, dim: int, where: str = "output") -> Any:
    """gather to a device already checked and resolved (DataParallel resolves its output device once).
    ``where`` names ``outputs`` in error messages."""
    if len(outputs) == 0:
        raise ValueError("gather: expected the outputs of at least one replica, but got none")
    if isinstance(outputs[0], torch.Tensor):
        place = "" if where == "output" else f" at {where}"  # only the parts of an object (_gather_object)
        for i, out in enumerate(outputs):
            if not isinstance(out, torch.Tensor):
                raise ValueError(  # a different structure, as in the pytree branch below
                    f"gather: replica 0 returned a tensor{place} but replica {i} returned {type(out).__name__}; "
                    "every replica must return the same structure"
                )
        try:
            return _C.gather(list(outputs), target, dim)
        except RuntimeError as error:
            if not place or type(error) is not RuntimeError:
                raise
            raise RuntimeError(f"at {where}: {error}") from None
    first, spec = pytree.tree_flatten(outputs[0])
    columns = [[leaf] for leaf in first]
    for i, out in enumerate(outputs[1:], start=1):
        leaves, other = pytree.tree_flatten(out)
        if other != spec:
            raise ValueError(
                f"gather: replica {i} returned a different structure than replica 0 (dicts must have the same "
                f"keys, sequences the same length): replica 0 gave {spec}, replica {i} gave {other}"
            )
        for column, leaf in zip(columns, leaves):
            column.append(leaf)
    gathered = []
    for position, column in enumerate(columns):
        leaf = column[0]
        if isinstance(leaf, torch.Tensor) and all(isinstance(x, torch.Tensor) for x in column):
            try:
                gathered.append(_C.gather(column, target, dim))
            except RuntimeError as error:
                if type(error) is not RuntimeError:  # keep subclasses such as torch.OutOfMemoryError as they are
                    raise
                # Name the place in the output; the C++ message's "tensor at index i" is replica i's.
                raise RuntimeError(f"at {where}{_output_path(outputs[0], position)}: {error}") from None
        elif all(x is None for x in column):
            gathered.append(None)
        elif all(x is None or isinstance(x, torch.Tensor) for x in column):
            # nn.DataParallel returns None here when replica 0 gave None, dropping the other replicas' tensors.
            first_none = next(i for i, x in enumerate(column) if x is None)
            first_tensor = next(i for i, x in enumerate(column) if isinstance(x, torch.Tensor))
            raise ValueError(
                f"gather: at {where}{_output_path(outputs[0], position)} replica {first_none} returned None but "
                f"replica {first_tensor} returned a tensor; every replica must return a tensor there, or every "
                "replica None"
            )
        else:
            gathered.append(_gather_object(column, target, dim, where + _output_path(outputs[0], position)))
    return pytree.tree_unflatten(gathered, spec)


# Note [Gathering other objects]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch.nn.DataParallel gathers an object that is neither a tensor, None nor a dict by rebuilding it from its
# parts: type(out)(map(gather_map, zip(*outputs))), each replica's object iterated and the parts at each
# position gathered. Libraries rely on that: Hugging Face's caches (DynamicCache, EncoderDecoderCache) iterate
# as per-layer tuples of tensors and take exactly that iterable in their constructors, for DataParallel.
# Pytree-registered types (ModelOutput, and caches where a library registers them) are flattened above instead;
# anything else follows upstream's rule, with what upstream leaves to chance made an error that names the
# place: strings and bytes (iterating them yields strings again, recursing without end upstream), objects that
# are not iterable (numbers, dataclasses), replicas that iterate to different lengths, and constructors that
# reject their gathered parts. The parts are gathered before the constructor runs, so its error is its own.
def _gather_object(column: list[Any], target: torch.device, dim: int, where: str) -> Any:
    """One non-tensor leaf of the replicas' outputs, rebuilt from its gathered parts as upstream does."""
    kinds = sorted({type(x).__name__ for x in column})
    cannot = (
        f"gather: the replicas' outputs hold {' and '.join(kinds)} values at {where}; DataParallel can only gather "
        "tensors (and None), and objects it rebuilds from their gathered parts as torch.nn.DataParallel does "
        "(type(out)(parts), for an iterable object whose parts it can gather)"
    )
    kind = type(column[0])
    if len(kinds) > 1 or any(type(x) is not kind for x in column):
        raise TypeError(f"{cannot}, and every replica must return the same type there")
    if issubclass(kind, (str, bytes, bytearray)):
        raise TypeError(f"{cannot}. Return a tensor there, e.g. torch.tensor(x).")
    try:
        parts = [list(x) for x in column]
    except TypeError:
        raise TypeError(
            f"{cannot}; {kind.__name__} is not iterable. Return a tensor there, e.g. torch.tensor(x)."
        ) from None
    lengths = sorted({len(p) for p in parts})
    if len(lengths) > 1:
        raise ValueError(
            f"gather: the replicas' {kind.__name__} values at {where} hold different numbers of parts "
            f"({', '.join(str(len(p)) for p in parts)} for replicas 0 to {len(parts) - 1}); every replica must return "
            "the same structure"
        )
    gathered = [_gather(list(part), target, dim, f"{where}[{i}]") for i, part in enumerate(zip(*parts))]
    try:
        return kind(gathered)
    except Exception as error:
        raise TypeError(
            f"{cannot}; {kind.__name__}(gathered parts) raised {type(error).__name__}: {error}. Return tensors there."
        ) from error


def _output_path(output: Any, position: int) -> str:
    """The key path of leaf ``position`` of ``output`` ("[1]['name']"), for error messages."""
    return pytree.keystr(pytree.tree_flatten_with_path(output)[0][position][0])


# ---- replicate ---------------------------------------------------------------------------------------------

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
    replica.__dict__.update(_parameters={}, _buffers=dict(module._buffers), _modules=dict(module._modules),
                            _is_replica=True)
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
        key = (torch.is_grad_enabled(), module.training, type(next(module.parameters(), None)), tuple(
            (tuple(x.shape), x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor) else type(x)
            for x in pytree.tree_leaves((args, kwargs))
        ))
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
    Note [Watching a module tree] in bindings.cpp).

    Replica modules are built with ``Module._replicate_for_data_parallel`` (as PyTorch does, so modules that
    customise it, such as RNNs, keep working) once, and again only when the module tree changed. Their tensors
    come from the C++ Replicator on every call and are written into the replicas only when they are other
    tensor objects than last time."""

    def __init__(self, trust_version_counters: bool = False) -> None:
        self._replicator = _C.Replicator(trust_version_counters)
        # Weak: torch_dp.data_parallel keeps a _Replicas per module in a WeakKeyDictionary, whose values must
        # not keep their key alive (that leaked every module ever passed to data_parallel).
        self._module: Optional[weakref.ref] = None
        self._devices: Optional[list[torch.device]] = None
        self._watch: Optional[Any] = None
        self._slots: list[list[torch.nn.Module]] = []
        self._targets: list[list[tuple[dict, str, int]]] = []  # per slot: (dict, key, source index)
        self._source_dicts: list[dict] = []  # the module tree's dicts, for DictWatch (not the modules)
        self.has_sync_batchnorm = False
        self.has_compiled = False  # torch.compile wrappers in the tree (Note [Compiled replicas])
        # One forward at a time: the replicas are shared state. threading.Lock releases the GIL while it
        # waits, so a waiting thread cannot starve the replicas' workers of the GIL.
        self.lock = threading.Lock()
        _live_replicas.add(self)

    def sync(self, module: torch.nn.Module, devices: list[torch.device]) -> None:
        """Rebuilds the replicas if the module, the devices or anything in the module tree changed."""
        if (
            self._module is None
            or module is not self._module()
            or devices != self._devices
            or self._watch is None
            or not self._watch.unchanged()
        ):
            self._build(module, devices)

    def check_device(self, expected: torch.device) -> None:
        self._replicator.check_device(expected)

    def get(self, count: int, differentiable: bool) -> list[torch.nn.Module]:
        """The root replica of each of the first ``count`` slots, with up-to-date tensors."""
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
        if changed or self._watch is None:
            self._watch_all()
        return [slot[0] for slot in self._slots[:count]]

    def _build(self, module: torch.nn.Module, devices: list[torch.device]) -> None:
        modules = list(module.modules())
        position = {id(m): i for i, m in enumerate(modules)}
        params = list(module.parameters())
        buffers = list(module.buffers())
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
            copies = [_replica_of(m) for m in modules]
            for replica in copies:
                replica.__dict__["zero_grad"] = _ReplicaZeroGrad()
                if isinstance(replica, torch.nn.RNNBase):
                    replica.__dict__["flatten_parameters"] = _ReplicaFlattenParameters()
            targets = []
            for m, replica in zip(modules, copies):
                replica.__dict__["_modules"] = {
                    name: None if child is None else copies[position[id(child)]] for name, child in m._modules.items()
                }
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
                    # on the caller's thread (_parallel_apply).
                    if id(m) not in callers:
                        callers[id(m)] = _CompiledReplicaCall(m.dynamo_ctx)
                    replica.__dict__["forward"] = functools.partial(callers[id(m)], replica._modules["_orig_mod"])
            self._slots.append(copies)
            self._targets.append(targets)
        self._module, self._devices, self._watch = weakref.ref(module), list(devices), None
        self._source_dicts = [d for m in modules for d in (m.__dict__, m._parameters, m._buffers, m._modules)]
        self.has_sync_batchnorm = any(isinstance(m, SyncBatchNorm) for m in modules)
        self.has_compiled = bool(callers)
        # Watch at once: a DataParallel on one device never calls get(), and without a watch every sync()
        # rebuilt the replicas (on every forward). get() takes the watch again after it installs new tensors.
        self._watch_all()

    def _watch_all(self) -> None:
        dicts = list(self._source_dicts)
        for m in [r for slot in self._slots for r in slot]:
            dicts += [m.__dict__, m._parameters, m._buffers, m._modules]
        self._watch = _C.DictWatch(dicts)


def replicate(network: torch.nn.Module, devices: Sequence[DeviceLike], detach: bool = False) -> list[torch.nn.Module]:
    """One replica of ``network`` per device. Replicas on the network's own device share its parameters;
    elsewhere they hold copies whose gradients flow back to the network (unless ``detach``)."""
    if not devices:
        return []
    targets = _as_devices(devices, "devices")
    replicas = _Replicas()
    replicas.sync(network, targets)
    return replicas.get(len(targets), differentiable=not detach)


# ---- parallel_apply ----------------------------------------------------------------------------------------

_shared_pool: Optional[Any] = None
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


ISSUING_MODES = ("auto", "threads", "serial")


def _checked_issuing(issuing: str) -> str:
    if issuing not in ISSUING_MODES:
        raise ValueError(f"issuing must be one of {', '.join(map(repr, ISSUING_MODES))}, but got {issuing!r}")
    return issuing


def _parallel_apply(
    modules, inputs, kwargs_tup, devices: list[torch.device], pool, synchronize: bool = False,
    issuing: str = "threads", compiled: bool = False,
) -> list[Any]:
    """Runs replica i on inputs[i] and kwargs_tup[i] on the pool, issued as `issuing` says (Note [Issuing
    replicas] in parallel_apply.cpp). With `synchronize` (replicas holding SyncBatchNorm layers), those layers
    meet across replicas (Note [Synchronized batch norm]); only for a pool no other call can use at the same
    time, since replicas waiting for each other must all be running. `compiled` (replicas of a torch.compile
    wrapper) makes "auto" serial on one device (Note [Compiled replicas])."""
    results: list[Any] = [None] * len(modules)
    group = SyncGroup(len(modules)) if synchronize and len(modules) > 1 and not in_replica() else None
    if group is not None:
        if issuing == "serial":
            raise RuntimeError(
                "issuing='serial' runs replicas one after another, but the module has SyncBatchNorm layers, whose "
                "replicas wait for each other inside a forward; use issuing='auto' or 'threads'"
            )
        issuing = "threads"
    elif issuing == "auto" and compiled and len(set(devices)) == 1:
        issuing = "serial"  # dynamo is not thread-safe (Note [Compiled replicas])

    def run_replica(i: int) -> None:
        failed = False
        try:
            args = inputs[i]
            if not isinstance(args, (list, tuple)):
                args = (args,)  # a lone tensor is one argument, not a sequence to unpack
            if group is None:
                results[i] = modules[i](*args, **kwargs_tup[i])
            else:
                with replica_context(group, i):
                    results[i] = modules[i](*args, **kwargs_tup[i])
        except BaseException:
            failed = True
            results[i] = ExceptionWrapper(where=f"in replica {i} on device {_label(devices[i])}")
        finally:
            if group is not None:
                group.finish(i, failed)

    if _rebuild_autograd_engine_first:
        _rebuild_autograd_engine()  # Note [After fork]
    _C.parallel_apply(pool, devices, run_replica, getattr(_C.Issuing, issuing))
    failures = [r for r in results if isinstance(r, ExceptionWrapper)]
    if failures:
        # A replica that waited for a failed one reports that; raise the failure itself.
        causes = [f for f in failures if f.exc_type is not PeerReplicaFailed]
        (causes or failures)[0].reraise()
    return results


def parallel_apply(
    modules: Sequence[torch.nn.Module],
    inputs: Sequence[Any],
    kwargs_tup: Optional[Sequence[dict[str, Any]]] = None,
    devices: Optional[Sequence[Optional[DeviceLike]]] = None,
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


# ---- data_parallel -----------------------------------------------------------------------------------------

_functional_replicas: "weakref.WeakKeyDictionary[torch.nn.Module, _Replicas]" = weakref.WeakKeyDictionary()
_functional_lock = threading.Lock()


# ---- fork ----------------------------------------------------------------------------------------------------

# Note [After fork]
# ~~~~~~~~~~~~~~~~~
# After fork() only the forking thread exists in the child. A lock that another thread held at that moment (a
# DataParallel in the middle of a forward on a background thread) would stay held there forever, and the
# child's first forward would hang. The child gets fresh locks, and every _Replicas drops its watch so that its
# next sync() rebuilds it (the other thread may have been half-way through updating it); the worker pools
# notice the new process on their own (Note [Worker pool] in parallel_apply.cpp).
#
# torch's autograd engine also rebuilds itself in a forked child, on its first use there
# (PythonEngine::get_python_engine), and that rebuild is not thread-safe: two replicas recording their first
# autograd graph in the child at the same time both destroy and rebuild the engine (a double free, a crash;
# seen with two plain threads running a Linear in a child too). So the child's first _parallel_apply uses the
# engine once from the calling thread before any replica runs. Not at fork time: a child that never runs a
# replica (a DataLoader worker) keeps torch's own lazy behaviour.
_live_replicas: "weakref.WeakSet[_Replicas]" = weakref.WeakSet()
_rebuild_autograd_engine_first = False


def _rebuild_autograd_engine() -> None:
    global _rebuild_autograd_engine_first
    _rebuild_autograd_engine_first = False
    torch.autograd.Variable._execution_engine.is_checkpoint_valid()  # calls get_python_engine()


def _after_fork_in_child() -> None:
    global _shared_pool_lock, _functional_lock, _rebuild_autograd_engine_first
    _rebuild_autograd_engine_first = True
    _shared_pool_lock = threading.Lock()
    _functional_lock = threading.Lock()
    for replicas in list(_live_replicas):
        replicas.lock = threading.Lock()
        replicas._watch = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def data_parallel(
    module: torch.nn.Module,
    inputs: Any,
    device_ids: Optional[Sequence[DeviceLike]] = None,
    output_device: Optional[DeviceLike] = None,
    dim: int = 0,
    module_kwargs: Optional[dict[str, Any]] = None,
) -> Any:
    """Evaluates ``module(*inputs, **module_kwargs)`` in parallel across ``device_ids``, like
    ``torch.nn.parallel.data_parallel``. Replicas are cached per module between calls."""
    if not isinstance(inputs, tuple):
        inputs = (inputs,) if inputs is not None else ()
    # Every check that does not need the replicas' outputs comes first, gather's included: a training-mode
    # module's BatchNorm statistics must not move for a call that fails.
    devices, output_device, target = _checked_arguments(device_ids, output_device, dim, _accelerator_type())
    module_kwargs = _checked_kwargs(module_kwargs, "module_kwargs")
    with _functional_lock:
        replicas = _functional_replicas.get(module)
        if replicas is None:
            replicas = _functional_replicas[module] = _Replicas()
    with replicas.lock:
        replicas.sync(module, devices)
        replicas.check_device(devices[0])
        inputs, kwargs = _scatter_kwargs(inputs, module_kwargs, devices, dim)
        if not inputs and not kwargs:
            inputs, kwargs = ((),), ({},)
        if len(devices) == 1:
            return module(*inputs[0], **kwargs[0])
        modules = replicas.get(len(inputs), differentiable=torch.is_grad_enabled())
        outputs = _parallel_apply(
            modules, inputs, kwargs, devices[: len(inputs)], _default_pool(), issuing="auto",
            compiled=replicas.has_compiled,
        )
    if _is_minus_one(output_device):
        warnings.warn(_MINUS_ONE_DEPRECATED, FutureWarning, stacklevel=2)
    return _gather(outputs, target, dim)

