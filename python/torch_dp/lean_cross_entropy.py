"""A cross-entropy over class indices that keeps only its input for the backward: the loss summed over a chunk
and the chunk's denominator, exactly as ``torch.nn.functional.cross_entropy`` defines them, for
ParallelCriterion's CrossEntropyLoss rule (Note [A cross-entropy that keeps only the logits])."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["lean_cross_entropy"]

# Note [A cross-entropy that keeps only the logits]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# torch's cross_entropy is log_softmax followed by nll_loss, and autograd keeps the log-probabilities for the
# backward: a tensor as large as the logits beside them. For a language model's head that is the largest tensor
# of the step (BENCHMARKS.md, "The loss on the replicas"). The loss needs only the logits x and, per row, the
# log-sum-exp lse: with weights w (1 without), the target t of a row kept (not ignore_index) and smoothing e over
# C classes,
#     loss_row  = (1 - e) * w[t] * (lse - x[t]) + (e / C) * sum_c w[c] * (lse - x[c])
#     dloss/dx  = softmax(x) * ((1 - e) * w[t] + (e / C) * sum_c w[c]) - (1 - e) * w[t] * onehot(t) - (e / C) * w
# (cross_entropy_loss_label_smoothing in aten/src/ATen/native/LossNLL.cpp: the nll term and the smoothing term,
# both zero for ignored rows, both divided by the sum of w[t] over the rows kept for "mean"). So the forward keeps
# x (the replica's output, alive anyway), the targets and one float per row, and the backward recomputes the
# softmax. Both run over blocks of rows whose class-wide temporaries are a few MiB (_BLOCK_ELEMENTS), in float32
# for float16 and bfloat16 logits (float64 for float64), and the backward writes the gradient of the logits block
# by block. The sums are accumulated as torch does (the nll sum and the smoothing sum apart, combined at the end),
# so the result is torch's to float rounding. What this does not cover exactly (probability targets, autocast,
# tensor subclasses, torch.compile tracing, an out-of-range target on the CPU, a weight that requires grad)
# returns None, and the caller uses torch's cross_entropy. A second derivative (backward with create_graph=True)
# is computed through torch's cross_entropy, which keeps its log-probabilities only then.

_BLOCK_ELEMENTS = 1 << 19  # class-wide temporaries per block: 2 MiB each in float32


def lean_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(total, count)`` for logits ``input`` (N, C) or (N, C, d1, ...) and class indices ``target`` (N) or
    (N, d1, ...): ``total`` equals ``F.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
    label_smoothing=label_smoothing, reduction="sum")`` (differentiable, in input's dtype) and ``count`` the
    divisor of its ``"mean"``: the sum of ``weight[target]`` over the targets not ignored (their number without
    weight). None where this is not exactly torch's definition (Note [A cross-entropy that keeps only the
    logits]); then call torch's cross_entropy."""
    if not _supported(input, target, weight, ignore_index, label_smoothing):
        return None
    total, count = _LeanCrossEntropy.apply(input, target, weight, int(ignore_index), float(label_smoothing))
    return total, count


def _supported(x: Any, t: Any, weight: Any, ignore_index: Any, smoothing: Any) -> bool:
    plain = (torch.Tensor, torch.nn.Parameter)
    if type(x) not in plain or type(t) not in plain or torch.compiler.is_compiling():
        return False
    if (
        x.dim() < 2
        or x.layout != torch.strided
        or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ):
        return False
    if t.dtype != torch.int64 or t.layout != torch.strided or t.device != x.device:
        return False
    if tuple(t.shape) != (x.size(0), *x.shape[2:]) or x.size(1) == 0 or (x.dim() > 2 and not x.is_contiguous()):
        return False
    if not isinstance(ignore_index, int) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if weight is not None:
        if type(weight) not in plain or weight.requires_grad or weight.dtype != x.dtype:
            return False
        if weight.device != x.device or tuple(weight.shape) != (x.size(1),):
            return False
    if x.device.type == "cpu" and t.numel():  # torch's error for a class out of range; on devices its own assert
        valid = (t == ignore_index) | ((t >= 0) & (t < x.size(1)))
        if not bool(valid.all()):
            return False
    return True


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(x: torch.Tensor) -> Iterator[tuple[Any, ...]]:
    """Index tuples into x's (N, C) or (N, C, D) view covering all positions, each block holding about
    _BLOCK_ELEMENTS elements (at least one row of C)."""
    n, c = x.size(0), x.size(1)
    d = x.numel() // (n * c) if n * c else 1
    positions = max(1, _BLOCK_ELEMENTS // c)
    if x.dim() == 2:
        for start in range(0, n, positions):
            yield (slice(start, start + positions),)
        return
    rows, cols = (max(1, positions // d), d) if d <= positions else (1, positions)
    for start in range(0, n, rows):
        for col in range(0, d, cols):
            yield (slice(start, start + rows), slice(None), slice(col, col + cols))


def _views(x: torch.Tensor, *per_position: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x as (N, C) or (N, C, D), and tensors of x's positions (targets, lse) as (N, 1) or (N, 1, D)."""
    if x.dim() == 2:
        return (x, *(p.view(-1, 1) for p in per_position))
    n, c = x.size(0), x.size(1)
    return (x.view(n, c, -1), *(p.view(n, 1, -1) for p in per_position))


def _class_view(weight: torch.Tensor, dims: int) -> torch.Tensor:
    return weight.view(1, -1) if dims == 2 else weight.view(1, -1, 1)


class _LeanCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, smoothing: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cd = _compute_dtype(x.dtype)
        x3, t3 = _views(x, t)
        lse = torch.empty(t.shape, dtype=cd, device=x.device)
        (lse3,) = _views(x, lse)[1:]
        w1 = None if weight is None else weight.to(cd)
        w = None if w1 is None else _class_view(w1, x3.dim())
        zero = torch.zeros((), dtype=cd, device=x.device)
        nll = zero.clone()
        smooth = zero.clone()
        count = torch.zeros((), dtype=torch.int64 if weight is None else weight.dtype, device=x.device)
        for index in _blocks(x3):
            xb, tb = x3[index].to(cd), t3[index]
            keep = tb != ignore_index
            tk = tb.masked_fill(~keep, 0)
            top = xb.amax(1, keepdim=True)
            shifted = xb - top  # log_softmax as torch computes it: x - max - log(sum(exp(x - max)))
            logsum = shifted.exp().sum(1, keepdim=True).log_()
            lse3[index] = top + logsum
            logp = shifted.sub_(logsum)
            picked = logp.gather(1, tk)
            if w1 is not None:
                picked = picked * w1[tk]
                count += torch.where(keep, weight[tk], weight.new_zeros(())).sum()
            else:
                count += keep.sum()
            nll -= torch.where(keep, picked, zero).sum()
            if smoothing:
                row = (logp * w).sum(1, keepdim=True) if w is not None else logp.sum(1, keepdim=True)
                smooth -= torch.where(keep, row, zero).sum()
            del xb, shifted, logp, picked
        total = nll if not smoothing else (1 - smoothing) * nll + smooth * (smoothing / x.size(1))
        ctx.save_for_backward(x, t, lse, weight)
        ctx.ignore_index, ctx.smoothing = ignore_index, smoothing
        ctx.mark_non_differentiable(count)
        return total.to(x.dtype), count

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, grad_count: Any) -> tuple[torch.Tensor | None, ...]:
        x, t, lse, weight = ctx.saved_tensors
        ignore_index, smoothing = ctx.ignore_index, ctx.smoothing
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a graph of the gradient, through torch's cross_entropy
            with torch.enable_grad():
                total = F.cross_entropy(
                    x, t, weight=weight, ignore_index=ignore_index, reduction="sum", label_smoothing=smoothing
                )
                (grad,) = torch.autograd.grad(total, x, grad_total, create_graph=True)
            return grad, None, None, None, None
        cd = _compute_dtype(x.dtype)
        c = x.size(1)
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x3, t3, lse3 = _views(x, t, lse)
        g3 = grad.view(x3.shape)
        g = grad_total.to(cd)
        w = None if weight is None else weight.to(cd)
        w_all = None if w is None else w.sum()
        w_row = None if w is None else _class_view(w, x3.dim()) * (smoothing / c)
        for index in _blocks(x3):
            xb, tb = x3[index].to(cd), t3[index]
            keep = tb != ignore_index
            tk = tb.masked_fill(~keep, 0)
            wt = torch.ones((), dtype=cd, device=x.device) if w is None else w[tk]
            hit = (1 - smoothing) * wt  # the nll term's weight on the target's class
            scale = hit + (smoothing / c) * (c if w is None else w_all)  # on the softmax
            p = xb.sub(lse3[index]).exp_()
            p.mul_(scale)
            p.scatter_(1, tk, p.gather(1, tk) - hit)
            if smoothing:
                p.sub_(smoothing / c if w_row is None else w_row)
            p.masked_fill_(~keep, 0)  # ignored rows: no gradient (and no NaN from a row of -inf)
            p.mul_(g)
            g3[index] = p
            del xb, p
        return grad, None, None, None, None
