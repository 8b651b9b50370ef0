"""torch_dp.PackageDataParallel: data-parallel inference over an AOTInductor package (a ``.pt2`` file written by
``torch._inductor.aoti_compile_and_package``), called like the module that was exported."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from torch_dp import _C
from torch_dp.arguments import (
    DeviceLike,
    _accelerator_type,
    _checked_arguments,
    _checked_chunk_sizes,
    _checked_issuing,
    _public_id,
)
from torch_dp.parallel_apply import _ISSUING

__all__ = ["PackageDataParallel"]


class PackageDataParallel:
    r"""Runs an AOTInductor package over several devices: every tensor input is split along ``dim`` into one
    chunk per device (as :class:`torch_dp.DataParallel` splits), each chunk runs through the package's compiled
    model, one loader per device, on persistent C++ worker threads with the GIL released, and the outputs are
    concatenated on ``output_device``.

    .. code-block:: python

        pdp = torch_dp.PackageDataParallel("model.pt2", device_ids=["cpu", "cpu"])
        with torch.no_grad():
            y = pdp(x)                   # the exported module's arguments, keyword arguments and outputs

    ``device_ids`` takes what :class:`torch_dp.DataParallel` takes (ints, strings, :class:`torch.device`, CPU
    lists such as ``["cpu"] * 4``); ``None`` means the CPU for a CPU package and every GPU for a CUDA one. The
    devices must be of the type the package was compiled for. ``chunk_sizes`` and ``issuing`` are
    :class:`torch_dp.DataParallel`'s, except that the first device's size may be 0 too (no loader is the model
    itself), e.g. to keep the output device free for the gather.

    The package is loaded once per device, here, and the loaders are kept for the object's lifetime.

    Inference only: a package holds no autograd graph, so its outputs never require grad, and a call with grad
    mode on and an input that requires grad raises instead of dropping the gradient silently.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device_ids: Sequence[DeviceLike] | None = None,
        output_device: DeviceLike | None = None,
        dim: int = 0,
        *,
        chunk_sizes: Sequence[int] | None = None,
        issuing: str = "auto",
    ) -> None:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"PackageDataParallel: no file at '{path}': expected an AOTInductor package (.pt2) written by "
                "torch._inductor.aoti_compile_and_package"
            )
        metadata = _C.read_package_metadata(path)
        package_type = metadata.get("AOTI_DEVICE_KEY") or "cpu"
        accelerator = _accelerator_type()
        if device_ids is None and package_type == "cpu":
            device_ids = ["cpu"]
        # The package's device type is checked before the devices themselves, so that CUDA devices for a CPU package
        # say so, on a machine without CUDA too (where the device check would only say that CUDA is missing).
        _C.check_package_devices(path, metadata, _requested_devices(device_ids, accelerator or package_type))
        devices, output_device, target = _checked_arguments(device_ids, output_device, dim, accelerator)
        self.path = path
        self.dim = dim
        self.device_ids = [_public_id(d) for d in devices]
        self.output_device = output_device
        self.chunk_sizes = _checked_chunk_sizes(chunk_sizes, len(devices), first_may_be_empty=True)
        self.issuing = _checked_issuing(issuing)
        self._impl = _C.PackageDataParallel(
            path,
            devices,
            target,
            dim,
            list(self.chunk_sizes) if self.chunk_sizes is not None else None,
            _ISSUING[self.issuing],
        )
        in_spec, out_spec = self._impl.call_spec
        self._in_spec = _loaded_spec(in_spec, path, "inputs")
        self._out_spec = _loaded_spec(out_spec, path, "outputs")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The exported module's forward over the devices: its positional and keyword arguments, flattened with
        the package's input spec; its outputs, in the structure the module returned."""
        if kwargs:
            from torch.export._tree_utils import reorder_kwargs

            kwargs = reorder_kwargs(kwargs, self._in_spec)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            raise TypeError(
                f"PackageDataParallel: '{self.path}' takes arguments structured as {self._in_spec}, but got {spec}"
            )
        outputs = self._impl.forward([leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])
        return pytree.tree_unflatten(outputs, self._out_spec)

    @property
    def metadata(self) -> dict[str, str]:
        """The package's metadata, e.g. ``{"AOTI_DEVICE_KEY": "cpu", ...}``."""
        return dict(self._impl.metadata)

    @property
    def num_loads(self) -> int:
        """How many loaders were made: one per device, however many calls ran."""
        return self._impl.num_loads

    def __repr__(self) -> str:
        return (
            f"PackageDataParallel({self.path!r}, device_ids={self.device_ids}, output_device={self.output_device!r}, "
            f"dim={self.dim})"
        )


def _requested_devices(device_ids: Sequence[DeviceLike] | None, index_type: str) -> list[torch.device]:
    """The device types device_ids asks for, read without checking that the devices exist (the full check,
    _checked_arguments, comes next): int entries are devices of `index_type`. Entries that do not parse are left to
    the full check."""
    if device_ids is None or isinstance(device_ids, (str, int, torch.device)):
        return []
    try:
        entries = list(device_ids)
    except TypeError:
        return []
    requested = []
    for entry in entries:
        try:
            if isinstance(entry, int) and not isinstance(entry, bool):
                requested.append(torch.device(index_type, max(entry, 0)))
            else:
                requested.append(torch.device(entry))
        except (RuntimeError, TypeError, ValueError):
            continue
    return requested


def _loaded_spec(spec: str, path: Any, what: str) -> Any:
    """The package's tree spec for its inputs or outputs. A type that is not registered with pytree in this process
    (e.g. a Hugging Face ModelOutput class when transformers is not imported), or whose context pytree cannot read
    back, cannot be rebuilt: say what to do instead of pytree's bare error."""
    try:
        return pytree.treespec_loads(spec)
    except (NotImplementedError, TypeError) as error:
        raise TypeError(
            f"PackageDataParallel: the {what} of {str(path)!r} are in a structure that cannot be rebuilt in Python "
            f"({error}); export the model so that it takes and returns tensors in tuples, lists and dicts (for "
            "Hugging Face models: return_dict=False), or call the package from C++ (torch_dp::PackageDataParallel "
            "takes and returns flat tensors)"
        ) from error
