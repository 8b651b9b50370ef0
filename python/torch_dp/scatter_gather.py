"""scatter, scatter_kwargs and gather, with torch.nn.parallel's signatures. The work happens in torch_dp._C; this
module maps Python structures onto tensor lists with torch.utils._pytree: inputs are split into one structure per
replica (Note [Which tensors set the batch]), and the replicas' outputs are gathered back into one (Note
[Gathering other objects])."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from torch_dp import _C
from torch_dp.arguments import DeviceLike, _as_devices, _as_output_device, _checked_dim

__all__ = ["scatter", "scatter_kwargs", "gather"]


# ---- scatter -----------------------------------------------------------------------------------------------


def _leaf_name(path: tuple, roots: tuple[str, ...] | None) -> str:
    """How error messages name the leaf at `path`: "args[0]", "kwargs['mask'][1]", or "input"."""
    if roots is not None and path:
        # (args, kwargs) from scatter_kwargs: name the argument, not its position in that pair.
        return roots[path[0].idx] + pytree.keystr(path[1:])
    return pytree.keystr(path) or "input"


def _describe_counts(obj: Any, devices: list[torch.device], dim: int, roots: tuple[str, ...] | None = None) -> str:
    parts = []
    for path, leaf in pytree.tree_flatten_with_path(obj)[0]:
        if isinstance(leaf, torch.Tensor):
            where = _leaf_name(path, roots)
            size = leaf.size(dim) if leaf.dim() > 0 else "a scalar"
            chunks = len(_C.chunk_sizes(leaf.size(dim), len(devices))) if leaf.dim() > 0 else "-"
            parts.append(f"{where}: {size} along dim {dim} -> {chunks} chunks")
    return "; ".join(parts)


def _check_sizes_fit(obj: Any, sizes: Sequence[int], dim: int, roots: tuple[str, ...] | None = None) -> None:
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
# chunk. Replicas whose chunk_sizes entry is 0 do not run (Note [Empty chunks] in arguments.py).
# data_parallel.cpp applies the same rule to the C++ module's arguments.
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
    roots: tuple[str, ...] | None,
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
    """The indices of the devices that run a replica: those whose chunk size is not 0 (Note [Empty chunks] in
    arguments.py)."""
    return [i for i, n in enumerate(sizes) if n > 0]


def _split_tensors(
    obj: Any,
    tensors: list[torch.Tensor],
    devices: list[torch.device],
    dim: int,
    roots: tuple[str, ...] | None,
    sizes: Sequence[int] | None,
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
    roots: tuple[str, ...] | None = None,
    sizes: Sequence[int] | None = None,
) -> list[Any] | None:
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


def _scatter_tensors(inputs: tuple, devices: list[torch.device], dim: int) -> tuple[tuple, ...]:
    """Positional arguments that are all tensors, without keyword arguments, split into one argument tuple per
    replica: what _scatter_kwargs gives for them, without the pytree walk."""
    if len(inputs) == 1:
        return tuple(zip(_C.scatter(inputs[0], devices, None, dim)))
    chunked = [_C.scatter(x, devices, None, dim) for x in inputs]
    count = len(chunked[0])
    for chunks in chunked:
        if len(chunks) != count:
            chunked = _cut_to_batch((inputs, {}), list(inputs), chunked, devices, dim, _ARGS_KWARGS)
            break
    return tuple(zip(*chunked))


def _all_tensors(inputs: tuple) -> bool:
    return all(isinstance(x, torch.Tensor) for x in inputs)


def _scatter_kwargs(
    inputs: tuple, kwargs: dict, devices: list[torch.device], dim: int, sizes: Sequence[int] | None = None
) -> tuple[tuple, tuple]:
    if sizes is None and not kwargs and inputs and _all_tensors(inputs):
        split_inputs = _scatter_tensors(inputs, devices, dim)
        return split_inputs, tuple({} for _ in split_inputs)
    split = _split_tree((inputs, kwargs), devices, dim, _ARGS_KWARGS, sizes)
    if split is None:
        # No tensors: every replica gets the same objects (one replica for a call without arguments).
        replicas = len(devices) if sizes is None else sum(1 for n in sizes if n > 0)
        split = [(inputs, kwargs)] * (replicas if (inputs or kwargs) else 0)
    return tuple(tuple(args) for args, _ in split), tuple(kw for _, kw in split)


def scatter_kwargs(
    inputs: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
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


def _checked_kwargs(kwargs: dict[str, Any] | None, name: str) -> dict[str, Any]:
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


def gather(outputs: Sequence[Any], target_device: DeviceLike | None, dim: int = 0) -> Any:
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
