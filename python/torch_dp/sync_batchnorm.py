"""Batch normalization synchronized across the replicas of a torch_dp.DataParallel forward.

Note [Synchronized batch norm]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under data parallelism each replica normalizes its chunk with the chunk's own statistics, so with small chunks
BatchNorm sees a fraction of the batch, and PyTorch's nn.SyncBatchNorm only synchronizes across processes
(torch.distributed), not across the replicas of one DataParallel (pytorch#38940). torch_dp's replicas run in
threads of one process, so their statistics can meet in memory:

- each replica computes its chunk's per-channel mean, sum of squared deviations (M2) and count;
- the replicas meet at a rendezvous (one per layer call, in a SyncGroup that DataParallel creates for each
  forward); the last to arrive combines everyone's statistics into the batch's (Chan's parallel formula: no
  catastrophic cancellation) with differentiable ops, so backward sends each replica its share of the gradient;
- under torch.distributed (as nn.SyncBatchNorm: the default process group, or the layer's), that thread also
  all-gathers the processes' combined statistics (torch.distributed.nn's differentiable all_gather) and combines
  those. Rendezvous complete one at a time, in call order, so every process issues its collectives in the same
  order; a process without DataParallel (or with one replica) takes part the same way;
- every replica normalizes its chunk with the result and updates its running statistics with it. Replica 0
  updates the module's own buffers (the replica-0 rule), so the module ends with the whole batch's statistics.

Outputs, gradients and running statistics equal those of BatchNorm applied to the whole batch. A replica that
fails, or finishes without calling the layer as often as the others, wakes the ones waiting for it with an error
instead of leaving them waiting. Outside a torch_dp forward with several replicas (no DataParallel, one replica,
a nested DataParallel, or torch_dp.data_parallel, whose shared workers could interleave two calls' replicas) the
layer synchronizes across processes only (under torch.distributed), or is plain BatchNorm. DataParallel
synchronizes only when its replicas hold a SyncBatchNorm, so other models pay nothing for this.

Note [Converting BatchNorm subclasses]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
convert_sync_batchnorm replaces the exact classes (BatchNorm1d/2d/3d, nn.SyncBatchNorm) with a SyncBatchNorm.
Replacing a subclass would drop what it adds (timm's BatchNormAct2d, used by EfficientNet, calls F.batch_norm and
then its activation in its own forward), so a subclass is converted in place instead: its class becomes one, made
once per subclass, that derives from both it and SyncBatchNorm and whose forward is the subclass's own, run under
a TorchFunctionMode that answers the batch-norm op (F.batch_norm, torch.batch_norm) with the synchronized one.
Synchronizing at the op, with the op's own arguments (running statistics, momentum, eps), keeps whatever the
forward does around it. The mode is per thread, so it sees this replica's calls only, and it is entered only in a
synchronizing forward: elsewhere the layer runs exactly as its subclass.
- super().forward reaches SyncBatchNorm.forward: SyncBatchNorm comes before _BatchNorm in the new MRO and, for
  subclasses of nn.SyncBatchNorm (timm's SyncBatchNormAct), before nn.SyncBatchNorm, whose forward synchronizes
  processes only, and only on GPUs.
- isinstance checks, attributes, parameters, buffers and state_dict keys stay; copies and pickles rebuild the
  class (__reduce_ex__); a lazy layer becomes a SyncBatchNorm when it initializes.
- A forward that never calls the op (it normalizes by hand) runs as written, with a warning naming its class the
  first time it trains in a synchronizing forward; a class that refuses to be subclassed stays unconverted, with
  a warning.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

from torch_dp.sync_group import SyncGroup, _local


def _combine(stats: torch.Tensor) -> torch.Tensor:
    """(k, 3, C) rows of (mean, M2, count) -> (3, C): the statistics of their union (Chan's formula)."""
    means, m2s, counts = stats[:, 0], stats[:, 1], stats[:, 2]
    total = counts.sum(0)
    mean = (means * counts).sum(0) / total.clamp_min(1)
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return torch.stack([mean, m2, total])


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch normalization over the whole batch of a :class:`torch_dp.DataParallel` forward: each replica
    normalizes its chunk with the statistics of every replica's chunk (Note [Synchronized batch norm]).

    Takes the arguments of :class:`torch.nn.BatchNorm2d` and any input of 2 or more dimensions, channels in
    dim 1; its ``state_dict`` is BatchNorm's. Under torch.distributed it also synchronizes across the processes of
    ``process_group`` (default: all), as :class:`torch.nn.SyncBatchNorm` does; without either, it is plain
    BatchNorm. Build one with
    :func:`convert_sync_batchnorm`, which replaces a model's BatchNorm layers.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        # Replicas copy their module's __dict__, so they share this token; a deep copy of the layer gets its own.
        self._torch_dp_sync_token = _Token()

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # _BatchNorm.forward, with the batch-norm op synchronized (not through super(): for the converted
        # subclasses of nn.SyncBatchNorm that would be nn.SyncBatchNorm.forward, Note [Converting BatchNorm
        # subclasses]).
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return _batch_norm(
            self,
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )

    def _processes(self) -> Any | None:
        """The process group to synchronize across, when torch.distributed runs with more than one process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        process_group = self.process_group or torch.distributed.group.WORLD
        return process_group if torch.distributed.get_world_size(process_group) > 1 else None


def _context() -> tuple[SyncGroup | None, int]:
    context = getattr(_local, "context", None)
    return context if context is not None else (None, 0)


def _batch_norm(
    layer: SyncBatchNorm,
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """F.batch_norm (same arguments after `layer`), with the batch statistics of every replica (and process)
    when `layer` runs in a synchronizing forward."""
    _local.batch_norm_calls = getattr(_local, "batch_norm_calls", 0) + 1
    group, replica = _context()
    processes = layer._processes() if training else None
    if not training or (group is None and processes is None):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # Statistics in at least float32, as cuDNN's batch norm computes them for half inputs; exchanged and
    # combined in float64 (counts above 2**24 stay exact).
    x = input if input.dtype in (torch.float32, torch.float64) else input.float()
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.size(1)] + [1] * (x.dim() - 2)
    count = x.numel() // x.size(1)
    if count > 0:
        var, mean = torch.var_mean(x, dims, correction=0)  # one pass over the chunk
        m2 = var * count
    else:
        mean = m2 = x.new_zeros(x.size(1))
    stats = torch.stack([mean.double(), m2.double(), torch.full_like(mean, count, dtype=torch.float64)])

    def combine(replicas: list[torch.Tensor]) -> torch.Tensor:
        here = replicas[-1].device
        combined = _combine(torch.stack([s.to(here) for s in replicas]))
        if processes is not None:
            from torch.distributed.nn.functional import all_gather

            combined = _combine(torch.stack(all_gather(combined, group=processes)))
        return combined

    if group is None:
        batch, total_count = combine([stats]), count
    else:
        batch, total_count = group.exchange(layer._torch_dp_sync_token, replica, stats, count, combine)
    if total_count <= 1 and processes is None:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(input.shape)} "
            f"and {total_count} value(s) per channel over all replicas"
        )
    batch_mean, batch_m2, total = batch[0], batch[1], batch[2]
    with torch.no_grad():
        # Through .data, as ATen's batch norm updates them, without bumping their version counters: a
        # replica's buffer copies can be views of one flat buffer with its parameters, which backward
        # would then find modified.
        if running_mean is not None:
            running_mean.data.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = batch_m2 / (total - 1)
            running_var.data.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    batch_var = (batch_m2 / total).to(x.dtype)
    # y = (x - mean) / sqrt(var + eps) * weight + bias as one pass over the chunk, x * scale + shift, with the
    # per-channel scale and shift computed first (differentiable, so gradients reach the statistics too).
    scale = torch.rsqrt(batch_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -batch_mean.to(x.dtype) * scale
    if bias is not None:
        shift = shift + bias
    out = torch.addcmul(shift.view(shape), x, scale.view(shape))
    return out.to(input.dtype)


class _Token:
    """Identifies one SyncBatchNorm layer across its replicas."""


class _SyncBatchNormOverNN(SyncBatchNorm, nn.SyncBatchNorm):
    """The base of converted nn.SyncBatchNorm subclasses: puts SyncBatchNorm.forward before nn.SyncBatchNorm's in
    their MRO (Note [Converting BatchNorm subclasses])."""


class _BatchNormCalls(TorchFunctionMode):
    """Answers the batch-norm op with `layer`'s synchronized one while a converted subclass's forward runs."""

    def __init__(self, layer: SyncBatchNorm) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(self.layer, *args, **kwargs)
        if func is torch.batch_norm:
            return _batch_norm(self.layer, *_from_aten_order(*args, **kwargs))
        return func(*args, **kwargs)


def _from_aten_order(
    input: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool,
) -> tuple:
    """torch.batch_norm's arguments in F.batch_norm's order."""
    return input, running_mean, running_var, weight, bias, training, momentum, eps


_warned: set[type] = set()  # subclasses warned about, once each
_warned_lock = threading.Lock()


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _synchronized_class(cls: type) -> type:
    """`cls` (a BatchNorm subclass) made a SyncBatchNorm as well (Note [Converting BatchNorm subclasses])."""
    base = _SyncBatchNormOverNN if issubclass(cls, nn.SyncBatchNorm) else SyncBatchNorm

    class Synchronized(cls, base):  # type: ignore[valid-type, misc]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(self, Synchronized):  # a lazy layer, initialized by this call: now cls_to_become
                return self.forward(*args, **kwargs)
            group, replica = _context()
            if group is None and self._processes() is None:
                return super().forward(*args, **kwargs)
            calls = getattr(_local, "batch_norm_calls", 0)
            with _BatchNormCalls(self):
                out = super().forward(*args, **kwargs)
            if group is not None and self.training and getattr(_local, "batch_norm_calls", 0) == calls:
                with _warned_lock:
                    first = cls not in _warned
                    _warned.add(cls)
                if first:
                    warnings.warn(
                        f"torch_dp.SyncBatchNorm: {_name(cls)}.forward does not call the batch-norm op "
                        "(torch.nn.functional.batch_norm), so its statistics cannot be synchronized across "
                        "replicas; it runs as written, on each replica's chunk",
                        stacklevel=2,
                    )
            return out

        def __reduce_ex__(self, protocol: Any) -> Any:
            # Pickle cannot find this class by name: rebuild it from the subclass it extends.
            return (_new_synchronized, (cls,)) + super().__reduce_ex__(protocol)[2:]

    if getattr(cls, "cls_to_become", None) is not None:
        # A lazy layer changes its class once initialized: to one that synchronizes as well.
        target = cls.cls_to_become
        Synchronized.cls_to_become = SyncBatchNorm if target in _EXACT else _synchronized_class(target)
    Synchronized.__name__, Synchronized.__qualname__ = cls.__name__, cls.__qualname__
    Synchronized.__module__, Synchronized.__doc__ = cls.__module__, cls.__doc__
    return Synchronized


def _new_synchronized(cls: type) -> nn.Module:
    synchronized = _synchronized_class(cls)
    return synchronized.__new__(synchronized)


_EXACT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Makes every BatchNorm layer of `module` synchronize its statistics across the replicas of a
    :class:`torch_dp.DataParallel` forward; returns the module (or the new layer when `module` itself is a BatchNorm
    layer), like ``nn.SyncBatchNorm.convert_sync_batchnorm``. Under torch.distributed the layers also synchronize
    across the processes of `process_group` (default: all).

    ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` layers are replaced with a :class:`SyncBatchNorm` holding the
    same parameters and buffers. Layers of their subclasses (such as timm's ``BatchNormAct2d``) are converted in
    place: they keep their class, attributes and forward, and the batch-norm op their forward calls computes the
    statistics of every replica (Note [Converting BatchNorm subclasses])."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        if type(module) in _EXACT:
            converted = SyncBatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        else:
            try:
                module.__class__ = _synchronized_class(type(module))
            except TypeError as error:  # the subclass refuses to be subclassed (say, __init_subclass__ arguments)
                warnings.warn(
                    f"convert_sync_batchnorm: left {_name(type(module))} unconverted ({error}): its replicas "
                    "normalize with their own chunk's statistics",
                    stacklevel=2,
                )
            else:
                module.process_group = process_group
                module._torch_dp_sync_token = _Token()
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    del module
    return converted
