"""lean_cross_entropy, the cross-entropy ParallelCriterion runs for CrossEntropyLoss: its sum, its denominator
and its gradients against torch.nn.functional.cross_entropy (weight, ignore_index, label_smoothing, (N, C) and
(N, C, d1, ...) logits, blocks of rows, float64 / float32 / bfloat16), what it keeps for the backward (the logits,
not log-probabilities), and where it declines and torch's cross_entropy runs."""

import pytest
import torch
import torch.nn.functional as F

import torch_dp
from helpers import cpus
from torch_dp import ParallelCriterion, ScatteredOutputs, lean_cross_entropy as lean_module
from torch_dp.lean_cross_entropy import lean_cross_entropy

TOLERANCE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def case(shape, dtype=torch.float64, weighted=False, ignored=False, scale=3.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    classes = shape[1]
    t = torch.randint(0, classes, (shape[0], *shape[2:]))
    if ignored and t.numel():
        t[torch.rand(t.shape) < 0.4] = -1
        t.view(-1)[0] = -1
    w = (torch.rand(classes, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    return x, t, w


def check(x, t, w, smoothing, ignore_index=-1):
    tolerance = TOLERANCE[x.dtype]
    kwargs = {"weight": w, "ignore_index": ignore_index, "label_smoothing": smoothing}
    total, count = lean_cross_entropy(x, t, w, ignore_index, smoothing)
    expected = F.cross_entropy(x, t, reduction="sum", **kwargs)
    assert total.dtype == expected.dtype and total.shape == expected.shape == ()
    torch.testing.assert_close(total, expected, **tolerance)
    if t.numel() and (t != ignore_index).any():
        mean = F.cross_entropy(x, t, reduction="mean", **kwargs)
        torch.testing.assert_close((total / count.to(total.dtype)).to(mean.dtype), mean, **tolerance)
    upstream = torch.randn((), dtype=torch.float64).to(x.dtype)
    (got,) = torch.autograd.grad(total, x, upstream)
    (want,) = torch.autograd.grad(expected, x, upstream)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **tolerance)


SHAPES = [(9, 5), (4, 5, 7), (3, 6, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["", "weight"])
@pytest.mark.parametrize("ignored", [False, True], ids=["", "ignore"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15, 1.0], ids=["", "smooth", "smooth1"])
def test_equals_torch_in_float64(shape, weighted, ignored, smoothing):
    check(*case(shape, weighted=weighted, ignored=ignored), smoothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_equals_torch_in_lower_precision(dtype, shape):
    check(*case(shape, dtype, weighted=True, ignored=True), 0.1)


@pytest.mark.parametrize("shape", [(37, 11), (5, 11, 13)], ids=str)
def test_blocks_of_rows_and_of_positions(monkeypatch, shape):
    """Blocks of a few rows (2-D), and blocks that split one row's positions (3-D with more positions than a
    block holds), still give torch's result."""
    monkeypatch.setattr(lean_module, "_BLOCK_ELEMENTS", 40)
    check(*case(shape, weighted=True, ignored=True), 0.2)
    check(*case(shape, ignored=True), 0.0)


def test_every_target_ignored():
    x, t, w = case((6, 5), weighted=True)
    t.fill_(-100)
    total, count = lean_cross_entropy(x, t, w, -100, 0.3)
    assert total.item() == 0 and count.item() == 0
    assert torch.isnan(total / count) and torch.isnan(F.cross_entropy(x, t, weight=w, label_smoothing=0.3))
    (grad,) = torch.autograd.grad(total, x)
    assert not grad.any()


def test_empty_input():
    x = torch.randn(0, 5, dtype=torch.float64, requires_grad=True)
    total, count = lean_cross_entropy(x, torch.zeros(0, dtype=torch.int64))
    assert total.item() == 0 and count.item() == 0
    (grad,) = torch.autograd.grad(total, x)
    assert grad.shape == (0, 5)


def test_large_logits_stay_finite():
    x, t, w = case((8, 5), ignored=True, scale=1e4)
    check(x, t, w, 0.1)


def test_second_derivative_equals_torch():
    x, t, w = case((7, 5), weighted=True, ignored=True)
    total, _ = lean_cross_entropy(x, t, w, -1, 0.1)
    expected = F.cross_entropy(x, t, weight=w, ignore_index=-1, label_smoothing=0.1, reduction="sum")
    (g_got,) = torch.autograd.grad(total, x, create_graph=True)
    (g_want,) = torch.autograd.grad(expected, x, create_graph=True)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(x)
    (h_got,) = torch.autograd.grad((g_got * v).sum(), x)
    (h_want,) = torch.autograd.grad((g_want * v).sum(), x)
    torch.testing.assert_close(h_got, h_want, rtol=1e-12, atol=1e-12)


def test_without_grad():
    x, t, w = case((5, 4))
    with torch.no_grad():
        total, _ = lean_cross_entropy(x, t, w, -1, 0.1)
    assert total.grad_fn is None
    torch.testing.assert_close(total, F.cross_entropy(x.detach(), t, label_smoothing=0.1, reduction="sum"))


# ---- what is kept for the backward -----------------------------------------------------------------------------


def saved_bytes(fn):
    """The bytes autograd saves for the backward while fn() runs (on every thread torch_dp's workers use: the
    hooks are part of the thread-local state a task carries)."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(sizes), result


def test_keeps_only_the_logits_targets_and_a_float_per_row():
    x, t, w = case((64, 1000), weighted=True, ignored=True)
    logits = x.numel() * x.element_size()
    kept, _ = saved_bytes(lambda: lean_cross_entropy(x, t, w, -1, 0.1))
    assert kept == logits + t.numel() * (8 + 8) + w.numel() * 8  # logits, targets, lse (float64), weight
    torch_kept, _ = saved_bytes(lambda: F.cross_entropy(x, t, weight=w, ignore_index=-1, label_smoothing=0.1))
    assert torch_kept >= logits  # the log-probabilities: what the test above would catch


@pytest.mark.parametrize("lean", [True, False])
def test_parallel_criterion_keeps_no_log_probabilities(lean):
    """With the lean cross-entropy the criterion's loss keeps the replicas' logits (alive anyway) and per-row
    floats; torch's cross_entropy (lean=False) keeps log-probabilities as large as the logits on top."""
    logits = torch.randn(48, 2000, dtype=torch.float64, requires_grad=True)
    parts = list(logits.split([20, 0, 28]))
    scattered = ScatteredOutputs(parts, cpus(3))
    y = torch.randint(0, 2000, (48,))
    criterion = ParallelCriterion(torch.nn.CrossEntropyLoss(label_smoothing=0.1), lean=lean)
    kept, loss = saved_bytes(lambda: criterion(scattered, y))
    size = logits.numel() * logits.element_size()
    if lean:
        assert size <= kept < size * 1.05
    else:
        assert kept >= 2 * size
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, label_smoothing=0.1), rtol=1e-12, atol=0)
    (got,) = torch.autograd.grad(loss, logits)
    (want,) = torch.autograd.grad(F.cross_entropy(logits, y, label_smoothing=0.1), logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


# ---- where torch's cross_entropy runs instead -------------------------------------------------------------------


def test_declines_what_it_does_not_compute_exactly():
    x, t, w = case((6, 5), weighted=True)
    assert lean_cross_entropy(x, torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1)) is None  # probabilities
    assert lean_cross_entropy(x, t.int()) is None
    assert lean_cross_entropy(x[0], t[0]) is None  # unbatched
    assert lean_cross_entropy(x, t, w.float()) is None  # torch refuses a weight of another dtype
    assert lean_cross_entropy(x, t, w.clone().requires_grad_()) is None
    assert lean_cross_entropy(x, t, label_smoothing=1.5) is None
    bad = t.clone()
    bad[2] = 5
    assert lean_cross_entropy(x, bad) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lean_cross_entropy(x, t) is None


def test_parallel_criterion_reports_torchs_error_for_a_class_out_of_range():
    dp = torch_dp.DataParallel(torch.nn.Linear(4, 5), cpus(2))
    y = torch.tensor([0, 1, 2, 9])
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        ParallelCriterion(torch.nn.CrossEntropyLoss())(dp.forward_scattered(torch.randn(4, 4)), y)
