"""The loss computed where the outputs are: ParallelCriterion runs a loss on every replica's chunk of a
ScatteredOutputs (what DataParallel.forward_scattered returns), on the same worker pool as the forward, and
reduces the per-replica parts to the loss of the whole batch."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import torch
import torch.utils._pytree as pytree

from torch_dp import _C
from torch_dp.arguments import _checked_dim
from torch_dp.lean_cross_entropy import lean_cross_entropy
from torch_dp.scatter_gather import _gather
from torch_dp.scattered_outputs import ScatteredOutputs

__all__ = ["ParallelCriterion", "SumAndCount"]


class SumAndCount(NamedTuple):
    """What a loss callable returns for one chunk to have its mean reduced exactly: the loss summed over the
    chunk, and what the whole batch's loss divides by, for this chunk (a row count, a sum of class weights, the
    number of tokens not ignored). ParallelCriterion returns ``sum(total) / sum(count)`` over the replicas
    (``sum(total)`` with ``reduction="sum"``)."""

    total: torch.Tensor
    count: torch.Tensor | int | float


# ---- the losses with an exact rule --------------------------------------------------------------------------

# The rules themselves, and Note [Reducing a loss over chunks], are written once, in C++ (src/loss_rules.cpp), for
# both languages' ParallelCriterion. What is Python's: recognizing a torch.nn module, reading its options, and the
# lean cross-entropy (lean_cross_entropy.py).


def _exact_kind(loss: Any) -> type | None:
    """The torch.nn class whose exact rule applies to `loss` (a subclass keeping its forward counts); None for
    other callables; an error for other torch.nn losses, whose reduction has no exact rule here."""
    if not isinstance(loss, torch.nn.modules.loss._Loss):
        return None
    for kind in type(loss).__mro__:
        if kind.__module__ == "torch.nn.modules.loss" and _C.has_exact_rule(kind.__name__):
            if type(loss).forward is kind.forward:
                return kind
            break
    raise TypeError(
        f"ParallelCriterion has no exact rule for {type(loss).__name__} (it has one for {_C.exact_rule_names()}); "
        "wrap it in a callable that returns torch_dp.SumAndCount(sum over the chunk, the chunk's denominator), or "
        "one returning a mean over the chunk's rows, which ParallelCriterion(fn, reduction='mean') weights by each "
        "chunk's share of the batch"
    )


def _rule_of(kind: type, loss: Any) -> _C.LossRule:
    """The rule of a torch.nn loss with its options as they are now (the attributes it has; the rule's defaults
    for those it lacks)."""
    return _C.LossRule(
        kind.__name__,
        str(loss.reduction),  # anything else than the strings torch takes is refused by name
        weight=getattr(loss, "weight", None),
        pos_weight=getattr(loss, "pos_weight", None),
        ignore_index=getattr(loss, "ignore_index", -100),
        label_smoothing=getattr(loss, "label_smoothing", 0.0),
        beta=getattr(loss, "beta", 1.0),
        delta=getattr(loss, "delta", 1.0),
        log_target=getattr(loss, "log_target", False),
    )


def _loss_part(rule: _C.LossRule, loss: Any, lean: bool, input: Any, target: Any, dim: int, first: bool) -> Any:
    """A chunk's (part of the loss, denominator); for CrossEntropyLoss with lean, without keeping
    log-probabilities (Note [A cross-entropy that keeps only the logits]) where that is torch's definition
    exactly."""
    if lean and rule.name == "CrossEntropyLoss" and rule.reduction != "none":
        weight = None if loss.weight is None else loss.weight.to(input.device)
        part = lean_cross_entropy(input, target, weight, loss.ignore_index, loss.label_smoothing)
        if part is not None:
            return part
    return _C.loss_part(rule, input, target, dim, first)


def _checked_reduction(reduction: Any, allowed: tuple[str, ...], whose: str) -> str:
    if reduction not in allowed:
        raise ValueError(
            f"ParallelCriterion supports reduction {', '.join(map(repr, allowed))} for {whose}, but got {reduction!r}"
        )
    return reduction


class ParallelCriterion(torch.nn.Module):
    r"""Computes a loss on the replicas' outputs where they are, and reduces it to the loss of the whole batch.

    ``criterion(scattered, *targets, **kwargs)`` takes the :class:`ScatteredOutputs` of
    :meth:`torch_dp.DataParallel.forward_scattered`, splits every tensor among ``targets`` and ``kwargs`` along
    ``dim`` (default: the outputs' ``dim``) into the outputs' ``chunk_sizes`` on the replicas' devices, runs the
    loss on each replica's device on the DataParallel's worker threads (with the caller's grad mode, autocast
    state and streams, as the forward), and reduces the per-replica results on the output device. Device 0 then
    never holds the whole output or its gradient.

    For ``loss`` a ``torch.nn`` loss among ``CrossEntropyLoss`` and ``NLLLoss`` (``weight``, ``ignore_index``,
    ``label_smoothing``, class-probability targets), ``MSELoss``, ``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``,
    ``BCELoss``, ``BCEWithLogitsLoss`` (``weight``, ``pos_weight``) and ``KLDivLoss`` (``log_target``), its own
    ``reduction`` applies and the result is the loss of the whole batch, to float rounding, whatever the chunk
    sizes (Note [Reducing a loss over chunks]): ``"mean"`` (and ``"batchmean"``) as sum of the chunks' sums over
    sum of their denominators, ``"sum"`` as the sum, ``"none"`` gathered like the forward's output. Other
    ``torch.nn`` losses are an error at construction.

    Any other callable ``loss(output, *targets, **kwargs)`` runs on each chunk, and ``reduction`` (default
    ``"mean"``) says how its results combine:

    - a :class:`SumAndCount` ``(total, count)``: ``sum(total) / sum(count)`` for ``"mean"``, ``sum(total)`` for
      ``"sum"``; exact for any loss that is a sum divided by a count (tokens not ignored, say);
    - a tensor: for ``"mean"`` the chunks' values weighted by their share of the batch,
      ``sum(loss_i * chunk_sizes[i] / sum(chunk_sizes))``, which is the whole batch's loss when the callable
      returns a mean over its chunk's rows (with the same number of elements per row); ``"sum"`` adds them (a
      loss summed over rows); ``"none"`` gathers them along ``dim``.

    For ``CrossEntropyLoss`` with class-index targets and reduction ``"mean"`` or ``"sum"``, each replica computes
    its part of the loss keeping only its logits and one float per row for the backward, which recomputes the
    softmax in blocks of rows, where ``torch.nn.functional.cross_entropy`` would keep log-probabilities as large
    as the logits: the same loss and gradients to float rounding (``weight``, ``ignore_index``,
    ``label_smoothing``), the largest tensor of a language model's step fewer. ``lean=False`` uses torch's
    ``cross_entropy`` instead; probability targets, autocast and ``reduction="none"`` always do.

    A replica whose chunk is empty does not run the loss (unless all are), and contributes nothing.

    ``prepare(output, *targets)``, if given, runs on each replica before the loss and returns ``(input,
    *targets)`` for it, e.g. ``lambda out, y: (out.logits.flatten(0, 1), y.flatten())`` for a language model.
    """

    def __init__(
        self,
        loss: Callable[..., Any],
        dim: int | None = None,
        *,
        reduction: str | None = None,
        prepare: Callable[..., Any] | None = None,
        lean: bool = True,
    ) -> None:
        super().__init__()
        if not callable(loss):
            raise TypeError(f"ParallelCriterion needs a loss module or callable, but got {type(loss).__name__}")
        self._kind = _exact_kind(loss)
        self._lean = lean
        if self._kind is not None:
            if reduction is not None:
                raise ValueError(
                    f"ParallelCriterion takes the reduction of {type(loss).__name__} from the module "
                    f"(reduction={loss.reduction!r}); set it there instead of passing reduction={reduction!r}"
                )
            _C.check_loss_reduction(_rule_of(self._kind, loss))
        else:
            reduction = _checked_reduction(
                "mean" if reduction is None else reduction, ("mean", "sum", "none"), "a callable"
            )
        if dim is not None:
            _checked_dim(dim)
        if prepare is not None and not callable(prepare):
            raise TypeError(f"prepare must be callable, but got {type(prepare).__name__}")
        self.loss = loss
        self.dim = dim
        self.reduction = reduction
        self.prepare = prepare

    def forward(self, outputs: ScatteredOutputs, *targets: Any, **kwargs: Any) -> Any:
        if not isinstance(outputs, ScatteredOutputs):
            raise TypeError(
                "ParallelCriterion takes the ScatteredOutputs of DataParallel.forward_scattered(...), but got "
                f"{type(outputs).__name__}; for a gathered output call the loss itself"
            )
        dim = outputs.dim if self.dim is None else self.dim
        sizes = outputs.chunk_sizes
        if any(n is None for n in sizes):
            raise ValueError(
                f"ParallelCriterion splits the targets by the outputs' sizes along dim {outputs.dim}, but a "
                f"replica's first output tensor has no dim {outputs.dim} (chunk_sizes={list(sizes)})"
            )
        split = _split_targets((targets, kwargs), outputs.devices, list(sizes), dim)
        runs = [i for i, n in enumerate(sizes) if n > 0] or [0]
        rule = None if self._kind is None else _rule_of(self._kind, self.loss)
        exact = rule is not None
        if exact:
            _C.check_loss_reduction(rule)
        reduction = rule.reduction if exact else self.reduction
        losses = self._losses_for([outputs.devices[i] for i in runs]) if not exact else None

        def task(slot: int, i: int) -> Any:
            out, (args, kw) = outputs.outputs[i], split[i]
            if self.prepare is not None:
                out, *args = self.prepare(out, *args)
            if exact:
                if len(args) != 1 or kw:
                    raise TypeError(
                        f"{type(self.loss).__name__} takes one target and no keyword arguments, but got "
                        f"{len(args)} targets and keywords {sorted(kw)}"
                    )
                return _loss_part(rule, self.loss, self._lean, out, args[0], outputs.dim, slot == 0)
            return losses[slot](out, *args, **kw)

        tasks = [functools.partial(task, slot, i) for slot, i in enumerate(runs)]
        results = outputs._run(tasks, [outputs.devices[i] for i in runs])
        target = outputs.output_device
        if reduction == "none":
            parts = [r[0] for r in results] if exact else results
            return _gather(parts, target, _C.none_gather_dim(rule, parts[0], dim) if exact else dim, where="loss")
        if exact:
            results = [SumAndCount(*r) for r in results]
        return _reduce(results, reduction, [sizes[i] for i in runs], target)

    def _losses_for(self, devices: list[torch.device]) -> list[Callable[..., Any]]:
        """The callable once per replica: a module holding tensors is replicated onto devices it is not on."""
        loss = self.loss
        if isinstance(loss, torch.nn.Module):
            places = {t.device for t in loss.parameters()} | {t.device for t in loss.buffers()}
            if places and places != set(devices):
                from torch_dp.replicate import replicate

                return replicate(loss, devices, detach=not torch.is_grad_enabled())
        return [loss] * len(devices)

    def extra_repr(self) -> str:
        parts = [] if self.dim is None else [f"dim={self.dim}"]
        if self.reduction is not None:
            parts.append(f"reduction={self.reduction!r}")
        return ", ".join(parts)


def _split_targets(
    tree: Any, devices: Sequence[torch.device], sizes: list[int], dim: int
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """(targets, kwargs) once per replica, every tensor split along dim into `sizes` on `devices`."""
    leaves, spec = pytree.tree_flatten_with_path(tree)
    total = sum(sizes)
    columns: list[list[Any]] = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            columns.append([leaf] * len(devices))
            continue
        if leaf.dim() == 0 or not -leaf.dim() <= dim < leaf.dim() or leaf.size(dim) != total:
            size = (
                f"{leaf.size(dim)} along dim {dim}"
                if leaf.dim() > 0 and -leaf.dim() <= dim < leaf.dim()
                else f"shape {tuple(leaf.shape)}"
            )
            name = ("targets", "kwargs")[path[0].idx] + pytree.keystr(path[1:])
            raise ValueError(
                f"ParallelCriterion splits every tensor among the targets along dim {dim} into the outputs' chunk "
                f"sizes {sizes} ({total} rows), but {name} has {size}; bind tensors that are not per row into the "
                "loss (functools.partial)"
            )
        columns.append(_C.scatter(leaf, list(devices), sizes, dim))
    return [pytree.tree_unflatten([column[r] for column in columns], spec) for r in range(len(devices))]


def _reduce(results: list[Any], reduction: str, sizes: list[int], target: torch.device) -> torch.Tensor:
    """The replicas' results on `target`, reduced (Note [Reducing a loss over chunks], C++'s reduce_loss_parts)."""
    if all(isinstance(r, SumAndCount) and isinstance(r.total, torch.Tensor) for r in results):
        counts = [c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.float64) for _, c in results]
        return _C.reduce_loss_parts([r.total for r in results], counts, reduction == "sum", sizes, target)
    if not all(isinstance(r, torch.Tensor) for r in results):
        kinds = sorted({type(r).__name__ for r in results})
        raise TypeError(
            "ParallelCriterion: the loss must return a tensor or a torch_dp.SumAndCount (whose total is a tensor) on "
            f"every replica, but the replicas returned {', '.join(kinds)}"
        )
    return _C.reduce_loss_parts(results, [], reduction == "sum", sizes, target)
