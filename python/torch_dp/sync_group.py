"""The rendezvous of the replicas of one forward: SyncBatchNorm's replicas meet in a SyncGroup to combine their
statistics (Note [Synchronized batch norm] in sync_batchnorm.py), and, under reproducible=True, replicas sharing
a device take turns in it.

Note [Reproducible synchronized batch norm]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
DataParallel(reproducible=True) runs the replicas sharing a device one after another, in index order, so that
they draw from the device's random generator in the same order on every run (Note [Reproducible replicas] in
parallel_apply.cpp). Replicas with SyncBatchNorm layers cannot run one after another: each waits at every
rendezvous for all the others. So they run on threads as usual, and those sharing a device take turns: a
replica starts only when the replica before it on its device (in index order) reached the first rendezvous or
finished, and passes its turn on, round the device's replicas, at every rendezvous it reaches and when it
finishes. Between two rendezvous the replicas of a device thus run one at a time, always in index order, and
every random op draws from the generator in the same order on every run; replicas on distinct devices (distinct
generators) still run at once. The statistics are combined by whichever replica arrives last, which draws no
random numbers, and their gradients are added in replica order (Note [Summing the replicas' gradients in index
order]). Mismatched calls and failures are reported as without turns: a replica waiting for its turn
also wakes when another failed or finished early.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any, Callable

import torch

__all__: list[str] = []

_local = threading.local()


# Note [Summing the replicas' gradients in index order]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Every replica's gradient of the combined statistics flows back into the one tensor that combine() returned. Had
# each replica its own copy of it (`combined.to(device)`), autograd would add those gradients in the order they
# arrive, and across distinct devices they arrive from the autograd engine's thread of each device, in whatever
# order those threads get there: with three replicas or more, (a + b) + c one run and (a + c) + b the next, and
# the gradients of the layers below (the first Linear's weight, say) differ in their last bits between two runs
# of reproducible=True. _Distribute hands every replica its copy from one autograd node, whose backward waits for
# all of them and adds them in replica order: the same sum on every run.


class _Distribute(torch.autograd.Function):
    """`combined` copied onto each of `devices` (one autograd node); backward adds the copies' gradients on
    `combined`'s device in index order (Note [Summing the replicas' gradients in index order]), on the streams
    the forward ran on (Note [Streams of a backward across devices] in src/scatter.cpp)."""

    @staticmethod
    def forward(ctx: Any, combined: torch.Tensor, *devices: torch.device) -> tuple[torch.Tensor, ...]:
        ctx.device = combined.device
        spanned = {d for d in (combined.device, *devices) if d.type != "cpu"}
        ctx.streams = [torch.accelerator.current_stream(d) for d in spanned]
        return tuple(combined.to(device, copy=True) for device in devices)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        total = None
        with contextlib.ExitStack() as streams:
            for stream in ctx.streams:
                streams.enter_context(stream)
            for grad in grads:
                if grad is not None:
                    grad = grad.to(ctx.device)
                    total = grad if total is None else total + grad
        return (total, *(None,) * len(grads))


class PeerReplicaFailed(RuntimeError):
    """Raised in a replica waiting at a SyncBatchNorm rendezvous when another replica failed; DataParallel reports
    the other replica's error instead."""


class SyncGroup:
    """The rendezvous of one forward's replicas (Note [Synchronized batch norm]). With `turns` (each replica's
    device), the replicas sharing a device take turns (Note [Reproducible synchronized batch norm])."""

    def __init__(self, num_replicas: int, turns: Sequence[torch.device] | None = None) -> None:
        self.num_replicas = num_replicas
        self._cond = threading.Condition()
        self._slots: dict[Any, dict[str, Any]] = {}
        self._calls: dict[int, int] = {}  # per replica: its SyncBatchNorm calls so far
        self._finished: set[int] = set()
        self._failed: int | None = None
        # With turns: per replica, its generator's key (every CPU device shares the CPU's) and the replicas
        # sharing it, in index order; per key, the replica whose turn it is.
        self._keys: list[Any] = []
        self._peers: list[list[int]] | None = None
        self._turn: dict[Any, int] = {}
        if turns is not None:
            self._keys = ["cpu" if torch.device(d).type == "cpu" else torch.device(d) for d in turns]
            self._peers = [[j for j, other in enumerate(self._keys) if other == key] for key in self._keys]
            for i, key in enumerate(self._keys):
                self._turn.setdefault(key, i)

    def _has_turn(self, replica: int) -> bool:
        return self._peers is None or self._turn[self._keys[replica]] == replica

    def _pass_turn(self, replica: int) -> None:
        """Hands `replica`'s turn to the next of its peers, round its device's replicas, that has not finished.
        Called with the condition held."""
        if self._peers is None:
            return
        peers = self._peers[replica]
        k = peers.index(replica)
        following = peers[k + 1 :] + peers[:k]
        self._turn[self._keys[replica]] = next((j for j in following if j not in self._finished), replica)
        self._cond.notify_all()

    def wait_turn(self, replica: int) -> None:
        """Returns once `replica` may start (at once without turns); raises PeerReplicaFailed if another replica
        failed meanwhile."""
        if self._peers is None:
            return
        with self._cond:
            while not self._has_turn(replica):
                if self._failed is not None:
                    raise PeerReplicaFailed(
                        f"SyncBatchNorm: replica {self._failed} failed while replica {replica} waited for its turn"
                    )
                self._cond.wait()

    def exchange(
        self,
        layer: object,
        replica: int,
        stats: torch.Tensor,
        count: int,
        combine: Callable[[list[torch.Tensor]], torch.Tensor],
    ) -> tuple[torch.Tensor, int]:
        """`combine` of every replica's `stats` for this call (run by the last replica to arrive), on `stats`'s
        device, and the sum of the replicas' `count`s (known on the host: no device synchronization). The
        replicas meet at their n-th SyncBatchNorm call; `layer` (a token the replicas of one layer share) checks
        that it is the same layer."""
        with self._cond:
            call = self._calls.get(replica, 0)
            self._calls[replica] = call + 1
            slot = self._slots.setdefault(call, {"layer": layer, "inputs": {}, "outputs": None, "count": 0})
            if slot["layer"] is not layer:
                raise RuntimeError(
                    f"SyncBatchNorm: at their SyncBatchNorm call {call + 1} the replicas reached different layers "
                    f"(replica {replica} another one than replica {min(slot['inputs'], default=0)}); every replica "
                    "must call the same SyncBatchNorm layers in the same order"
                )
            slot["inputs"][replica] = stats
            slot["count"] += count
            if len(slot["inputs"]) == self.num_replicas:
                inputs = [slot["inputs"][i] for i in range(self.num_replicas)]
                combined = combine(inputs)
                slot["outputs"] = list(_Distribute.apply(combined, *(s.device for s in inputs)))
                slot["inputs"] = {i: None for i in range(self.num_replicas)}  # hold no tensors longer than needed
                self._cond.notify_all()
            self._pass_turn(replica)
            while slot["outputs"] is None or not self._has_turn(replica):
                if self._failed is not None:
                    raise PeerReplicaFailed(
                        f"SyncBatchNorm: replica {self._failed} failed while replica {replica} waited for it"
                    )
                missing = sorted(self._finished - set(slot["inputs"]))
                if missing:
                    raise RuntimeError(
                        f"SyncBatchNorm: replica {missing[0]} finished its forward without reaching SyncBatchNorm "
                        f"call {call + 1}, where replica {replica} waits for it; every replica must call the same "
                        "SyncBatchNorm layers the same number of times in a forward"
                    )
                self._cond.wait()
            return slot["outputs"][replica], slot["count"]

    def calls(self, replica: int) -> int:
        """How many SyncBatchNorm calls `replica` made so far in this forward."""
        with self._cond:
            return self._calls.get(replica, 0)

    def finish(self, replica: int, failed: bool) -> None:
        with self._cond:
            self._finished.add(replica)
            if failed and self._failed is None:
                self._failed = replica
            self._pass_turn(replica)
            self._cond.notify_all()


class replica_context:
    """Marks the calling thread as running `replica` of a forward whose replicas synchronize through `group`."""

    def __init__(self, group: SyncGroup | None, replica: int) -> None:
        self.group, self.replica = group, replica

    def __enter__(self) -> None:
        self.previous = getattr(_local, "context", None)
        _local.context = (self.group, self.replica)

    def __exit__(self, *exc: Any) -> None:
        _local.context = self.previous


def in_replica() -> bool:
    """Whether the calling thread runs a replica of a synchronizing forward (a DataParallel started inside one
    is nested, and its replicas might run inline, one after the other)."""
    return getattr(_local, "context", None) is not None
