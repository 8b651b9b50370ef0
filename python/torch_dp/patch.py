"""patch() puts torch_dp.DataParallel and torch_dp.data_parallel in torch.nn.DataParallel's and
torch.nn.parallel.data_parallel's place, for code that builds its DataParallel internally; unpatch() undoes it."""

from __future__ import annotations

import sys
from typing import Any

import torch

from torch_dp.data_parallel import DataParallel, data_parallel

__all__ = ["patch", "unpatch", "is_patched"]

_originals: dict[str, Any] = {}


def _patch_targets() -> list[tuple[Any, str, Any]]:
    data_parallel_module = sys.modules["torch.nn.parallel.data_parallel"]
    return [
        (torch.nn, "DataParallel", DataParallel),
        (torch.nn.parallel, "DataParallel", DataParallel),
        (torch.nn.parallel, "data_parallel", data_parallel),
        (data_parallel_module, "DataParallel", DataParallel),
        (data_parallel_module, "data_parallel", data_parallel),
    ]


def patch() -> None:
    """Makes ``torch.nn.DataParallel`` (and ``torch.nn.parallel.data_parallel``) resolve to torch_dp, for code
    that builds its DataParallel internally, such as Hugging Face's Trainer. ``unpatch()`` undoes it."""
    for owner, name, replacement in _patch_targets():
        key = f"{owner.__name__}.{name}"
        if key not in _originals:
            _originals[key] = getattr(owner, name)
        setattr(owner, name, replacement)


def unpatch() -> None:
    """Restores what ``patch()`` replaced."""
    for owner, name, _ in _patch_targets():
        key = f"{owner.__name__}.{name}"
        if key in _originals:
            setattr(owner, name, _originals.pop(key))


def is_patched() -> bool:
    return bool(_originals)
