"""The argument checks every front-end and step shares, written once so that a mistake gets the same error from
each of them, before anything runs: device_ids entries (ints, strings, torch.device, "cpu") as torch.device
objects, gather's output device (upstream's -1 included), dim, chunk_sizes, issuing and the flags; and how PyTorch
names a device in messages and in DataParallel.device_ids."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Union

import torch
from torch._utils import _get_all_device_indices, _get_available_device_type

__all__ = ["DeviceLike"]

DeviceLike = Union[int, str, torch.device]


def _accelerator_type() -> str | None:
    """The accelerator PyTorch's DataParallel would use (None without one; MPS is not supported, as upstream)."""
    device_type = _get_available_device_type()
    return None if device_type == "mps" else device_type


def _as_device(device: DeviceLike, accelerator: str | None) -> torch.device:
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


def _usable_devices(accelerator: str | None) -> str:
    """What a device argument may name on this machine, for error messages."""
    if accelerator is None:
        return "'cpu' (no accelerator is available)"
    count = getattr(torch, accelerator).device_count()
    return f"'cpu' or a {accelerator} device, index 0 to {count - 1}"


def _as_devices(
    devices: Sequence[DeviceLike], name: str = "target_gpus", accelerator: str | None = None
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


def _is_minus_one(device: DeviceLike | None) -> bool:
    """Whether device is upstream's -1, its deprecated way of saying the CPU."""
    return isinstance(device, int) and not isinstance(device, bool) and device == -1


_MINUS_ONE_DEPRECATED = (
    'Using -1 to represent CPU tensor is deprecated. Please use a device object or string instead, e.g., "cpu".'
)


def _as_output_device(device: DeviceLike | None) -> torch.device:
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
    device_ids: Sequence[DeviceLike] | None,
    output_device: DeviceLike | None,
    dim: int,
    accelerator: str | None,
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


def _public_id(device: torch.device) -> int | torch.device:
    """device_ids entries as nn.DataParallel stores them: int indices; CPU entries stay torch.device('cpu')."""
    return device if device.type == "cpu" else device.index


def _checked_chunk_sizes(
    chunk_sizes: Sequence[int] | None, num_devices: int, first_may_be_empty: bool = False
) -> tuple[int, ...] | None:
    """chunk_sizes checked against the device count. `first_may_be_empty` where no replica is the module itself
    (PackageDataParallel's loaders); see Note [Empty chunks]."""
    if chunk_sizes is None:
        return None
    if isinstance(chunk_sizes, (str, bytes, torch.Tensor)) or not isinstance(chunk_sizes, Sequence):
        raise TypeError(f"chunk_sizes must be a sequence of ints, one per device, but got {chunk_sizes!r}")
    sizes = tuple(chunk_sizes)
    if any(not isinstance(n, int) or isinstance(n, bool) for n in sizes):
        raise TypeError(f"chunk_sizes must hold ints (rows per device), but got {list(sizes)!r}")
    if len(sizes) != num_devices:
        raise ValueError(
            f"chunk_sizes must give one size per device: {num_devices} devices, but got {len(sizes)} sizes "
            f"{list(sizes)}"
        )
    if any(n < 0 for n in sizes) or sum(sizes) == 0:
        raise ValueError(f"chunk_sizes must be non-negative and not all 0, but got {list(sizes)}")
    if sizes[0] == 0 and not first_may_be_empty:
        # Note [Empty chunks]
        # ~~~~~~~~~~~~~~~~~~~
        # A device whose chunk would be empty runs no replica (a model may not take 0 rows: BERT's reshapes fail),
        # and outputs and gradients are those of the replicas that ran. The first device is not free to skip:
        # its replica is the module itself, whose buffer updates (BatchNorm's running statistics) are the ones
        # DataParallel keeps, and the module must live there. So a 0 there is an error, not a silent move of
        # that rule to a replica whose buffers are copies.
        raise ValueError(
            f"chunk_sizes[0] must not be 0, but got {list(sizes)}: the first device's replica is the module itself, "
            "which keeps its buffer updates (BatchNorm's running statistics); give it at least one row (a 0 is "
            "allowed for the other devices, which then run no replica)"
        )
    return sizes


ISSUING_MODES = ("auto", "threads", "serial")


def _checked_issuing(issuing: str) -> str:
    if issuing not in ISSUING_MODES:
        raise ValueError(f"issuing must be one of {', '.join(map(repr, ISSUING_MODES))}, but got {issuing!r}")
    return issuing


def _checked_flag(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, but got {value!r}")
    return value
