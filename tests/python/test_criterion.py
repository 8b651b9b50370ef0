"""DataParallel.forward_scattered and ParallelCriterion: outputs left on the replicas, and a loss computed there
whose value and gradients (inputs and parameters, over several optimizer steps) are those of the whole batch's
loss, in float64, for uneven chunks, devices without a chunk and batches smaller than the device count."""

import collections
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import torch_dp
from helpers import cpus
from torch_dp import ParallelCriterion, ScatteredOutputs, SumAndCount

DT = torch.float64
CLASSES = 5


class Net(torch.nn.Module):
    """A small MLP whose output is turned into what the loss takes (logits, log-probabilities, probabilities)."""

    def __init__(self, kind="logits", out=CLASSES):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, out))
        self.kind = kind

    def forward(self, x):
        y = self.body(x)
        if self.kind == "log_probs":
            return F.log_softmax(y, dim=1)
        if self.kind == "probs":
            return torch.sigmoid(y)
        return y


def class_targets(n, ignore=False):
    t = torch.randint(0, CLASSES, (n,))
    if ignore:
        t[torch.rand(n) < 0.4] = -1  # ignore_index=-1 below
        t[0] = -1
    return t


def soft_targets(n):
    return torch.softmax(torch.randn(n, CLASSES, dtype=DT), dim=1)


def dense_targets(n):
    return torch.randn(n, CLASSES, dtype=DT)


def unit_targets(n):
    return torch.rand(n, CLASSES, dtype=DT)


def weight():
    return torch.rand(CLASSES, dtype=DT) + 0.1


# (id, loss factory, model kind, target factory)
LOSSES = [
    ("ce", lambda r: torch.nn.CrossEntropyLoss(reduction=r), "logits", class_targets),
    ("ce_weight", lambda r: torch.nn.CrossEntropyLoss(weight=weight(), reduction=r), "logits", class_targets),
    (
        "ce_ignore",
        lambda r: torch.nn.CrossEntropyLoss(ignore_index=-1, reduction=r),
        "logits",
        lambda n: class_targets(n, True),
    ),
    ("ce_smooth", lambda r: torch.nn.CrossEntropyLoss(label_smoothing=0.15, reduction=r), "logits", class_targets),
    (
        "ce_weight_ignore_smooth",
        lambda r: torch.nn.CrossEntropyLoss(weight=weight(), ignore_index=-1, label_smoothing=0.2, reduction=r),
        "logits",
        lambda n: class_targets(n, True),
    ),
    (
        "ce_probs_weight_smooth",
        lambda r: torch.nn.CrossEntropyLoss(weight=weight(), label_smoothing=0.1, reduction=r),
        "logits",
        soft_targets,
    ),
    ("nll", lambda r: torch.nn.NLLLoss(reduction=r), "log_probs", class_targets),
    (
        "nll_weight_ignore",
        lambda r: torch.nn.NLLLoss(weight=weight(), ignore_index=-1, reduction=r),
        "log_probs",
        lambda n: class_targets(n, True),
    ),
    ("mse", lambda r: torch.nn.MSELoss(reduction=r), "logits", dense_targets),
    ("l1", lambda r: torch.nn.L1Loss(reduction=r), "logits", dense_targets),
    ("smooth_l1", lambda r: torch.nn.SmoothL1Loss(reduction=r, beta=0.5), "logits", dense_targets),
    ("huber", lambda r: torch.nn.HuberLoss(reduction=r, delta=0.7), "logits", dense_targets),
    ("bce_weight", lambda r: torch.nn.BCELoss(weight=weight(), reduction=r), "probs", unit_targets),
    (
        "bce_logits_pos_weight",
        lambda r: torch.nn.BCEWithLogitsLoss(weight=weight(), pos_weight=weight() * 3, reduction=r),
        "logits",
        unit_targets,
    ),
    ("kl", lambda r: torch.nn.KLDivLoss(reduction=r), "log_probs", soft_targets),
    (
        "kl_log_target",
        lambda r: torch.nn.KLDivLoss(reduction=r, log_target=True),
        "log_probs",
        lambda n: soft_targets(n).log(),
    ),
]

# (id, device_ids, chunk_sizes, batch): uneven chunks, a device given no rows, a batch smaller than the device
# count, equal chunks (where only weights and ignore_index tell a wrong rule apart).
LAYOUTS = [
    ("uneven_3_3_1", cpus(3), None, 7),
    ("chunk_sizes_1_5_2", cpus(3), [1, 5, 2], 8),
    ("empty_chunk_4_0_3", cpus(3), [4, 0, 3], 7),
    ("batch_3_on_4", cpus(4), None, 3),
    ("even_4x2", cpus(4), None, 8),
    ("one_device", cpus(1), None, 5),
]


def reductions_for(loss_id):
    return ["mean", "sum", "none"] + (["batchmean"] if loss_id.startswith("kl") else [])


CASES = [
    pytest.param(loss, red, layout, id=f"{loss[0]}-{red}-{layout[0]}")
    for loss in LOSSES
    for red in reductions_for(loss[0])
    for layout in LAYOUTS
]


def compare_training(make_loss, kind, make_target, device_ids, chunk_sizes, batch, steps=3):
    """Trains a module and its DataParallel copy side by side, the reference on the whole batch's loss, and
    compares loss, input gradient and parameter gradients at every step."""
    reference = Net(kind).to(DT)
    dp = torch_dp.DataParallel(copy.deepcopy(reference), device_ids, chunk_sizes=chunk_sizes)
    loss = make_loss()
    criterion = ParallelCriterion(loss)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    opt_dp = torch.optim.SGD(dp.parameters(), lr=0.5, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(batch, 6, dtype=DT)
        y = make_target(batch)
        x_ref, x_dp = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = loss(reference(x_ref), y)
        scattered = dp.forward_scattered(x_dp)
        got = criterion(scattered, y)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13, equal_nan=True)
        if loss.reduction == "none":  # a weighted sum, so that every element's gradient counts
            r = torch.rand(expected.shape, dtype=DT)
            expected, got = (expected * r).sum(), (got * r).sum()
        opt_ref.zero_grad()
        opt_dp.zero_grad()
        expected.backward()
        got.backward()
        torch.testing.assert_close(x_dp.grad, x_ref.grad, rtol=1e-12, atol=1e-13)
        for (name, p_ref), p_dp in zip(reference.named_parameters(), dp.module.parameters()):
            torch.testing.assert_close(p_dp.grad, p_ref.grad, rtol=1e-11, atol=1e-13, msg=name)
        opt_ref.step()
        opt_dp.step()
    for p_ref, p_dp in zip(reference.parameters(), dp.module.parameters()):
        torch.testing.assert_close(p_dp, p_ref, rtol=1e-11, atol=1e-13)


# KLDivLoss(reduction="mean") warns that "batchmean" is the mathematical KL divergence; it is exact all the same.
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
@pytest.mark.parametrize("loss, reduction, layout", CASES)
def test_loss_and_gradients_equal_the_whole_batch(loss, reduction, layout):
    _, factory, kind, make_target = loss
    _, device_ids, chunk_sizes, batch = layout
    compare_training(lambda: factory(reduction), kind, make_target, device_ids, chunk_sizes, batch)


def test_dividing_by_the_replica_count_would_fail_these_checks():
    """The comparison above tells the exact rule from PyTorch-Encoding's (mean of the replicas' means)."""
    model = Net().to(DT)
    dp = torch_dp.DataParallel(model, cpus(3))
    x, y = torch.randn(7, 6, dtype=DT), class_targets(7)
    scattered = dp.forward_scattered(x)
    naive = sum(F.cross_entropy(out, t) for out, t in zip(scattered, y.split([3, 3, 1]))) / 3
    exact = ParallelCriterion(torch.nn.CrossEntropyLoss())(scattered, y)
    torch.testing.assert_close(exact, F.cross_entropy(model(x), y), rtol=1e-12, atol=0)
    assert not torch.allclose(naive, exact, rtol=1e-6, atol=0)


def test_options_changed_between_calls_are_seen():
    """The rule reads the module's options at every call, as calling the module itself does."""
    model = Net().to(DT)
    dp = torch_dp.DataParallel(model, cpus(3))
    loss = torch.nn.CrossEntropyLoss()
    criterion = ParallelCriterion(loss)
    x = torch.randn(7, 6, dtype=DT)
    y = torch.tensor([0, 1, 2, 3, 4, 1, 1])
    for change in [{}, {"ignore_index": 1}, {"label_smoothing": 0.3}, {"reduction": "sum"}, {"weight": weight()}]:
        for name, value in change.items():
            setattr(loss, name, value)
        torch.testing.assert_close(criterion(dp.forward_scattered(x), y), loss(model(x), y), rtol=1e-12, atol=0)


def test_target_sizes_warned_and_checked_as_torch_does():
    """A target that broadcasts against the output gets torch's warning (the loss is torch's, broadcast); the BCE
    losses refuse it, as torch.nn.functional does."""
    model = Net().to(DT)
    dp = torch_dp.DataParallel(model, cpus(3))
    x, y = torch.randn(7, 6, dtype=DT), torch.randn(7, 1, dtype=DT)
    with pytest.warns(UserWarning, match="different to the input size"):
        expected = torch.nn.MSELoss()(model(x), y)
    with pytest.warns(
        UserWarning, match=r"mse_loss: using a target size \(\[\d, 1\]\) that is different to the input size"
    ):
        got = ParallelCriterion(torch.nn.MSELoss())(dp.forward_scattered(x), y)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for loss in [torch.nn.BCELoss(), torch.nn.BCEWithLogitsLoss()]:
        with pytest.raises(ValueError, match=r"needs a target of the input.s size, but got target size \[\d, 1\]"):
            ParallelCriterion(loss)(dp.forward_scattered(x), y.sigmoid())


def test_the_callers_autocast_reaches_the_rule_on_every_replica():
    """Autocast casts the loss's input to float32 as it does for the module called on the whole batch."""
    model = Net()
    dp = torch_dp.DataParallel(model, cpus(3))
    x, y = torch.randn(7, 6), class_targets(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scattered = dp.forward_scattered(x)
        got = ParallelCriterion(torch.nn.CrossEntropyLoss())(scattered, y)
        expected = torch.nn.CrossEntropyLoss()(model(x), y)
    assert scattered[0].dtype == torch.bfloat16
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_smooth_l1_with_beta_0_is_l1_as_in_torch():
    """Where input equals target, L1's gradient is 0; smooth L1's own kernel with beta 0 would give -1."""
    dp = torch_dp.DataParallel(torch.nn.Identity(), cpus(2))
    loss = torch.nn.SmoothL1Loss(beta=0.0)
    y = torch.tensor([[0.0, 1.0], [2.0, -3.0], [0.5, 0.0]], dtype=DT)
    x_ref = torch.tensor([[0.0, 2.0], [2.0, -1.0], [0.0, 0.0]], dtype=DT, requires_grad=True)
    x_dp = x_ref.detach().clone().requires_grad_()
    loss(x_ref, y).backward()
    ParallelCriterion(loss)(dp.forward_scattered(x_dp), y).backward()
    assert x_ref.grad[0, 0] == 0
    torch.testing.assert_close(x_dp.grad, x_ref.grad, rtol=0, atol=0)


# ---- forward_scattered --------------------------------------------------------------------------------------


def test_forward_scattered_keeps_outputs_per_replica():
    model = Net().to(DT)
    dp = torch_dp.DataParallel(model, cpus(3), chunk_sizes=[2, 0, 5])
    x = torch.randn(7, 6, dtype=DT)
    scattered = dp.forward_scattered(x)
    assert isinstance(scattered, ScatteredOutputs)
    assert scattered.chunk_sizes == (2, 5)  # the device given no rows ran no replica
    assert scattered.devices == (torch.device("cpu"),) * 2
    assert scattered.dim == 0 and scattered.output_device == torch.device("cpu")
    assert len(scattered) == 2 and [o.shape[0] for o in scattered] == [2, 5]
    torch.testing.assert_close(scattered[1], model(x)[2:], rtol=0, atol=0)
    torch.testing.assert_close(scattered.gather(), dp(x), rtol=0, atol=0)
    assert "chunk_sizes=[2, 5]" in repr(scattered)


def test_forward_scattered_keeps_structures():
    Pair = collections.namedtuple("Pair", "logits hidden")

    class Structured(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x, *, scale):
            y = self.lin(x) * scale
            return {"out": Pair(y, x * 2), "extra": [y.sum(1, keepdim=True)]}

    dp = torch_dp.DataParallel(Structured(), cpus(4))
    x = torch.randn(7, 4)
    scattered = dp.forward_scattered(x, scale=3.0)
    assert scattered.chunk_sizes == (2, 2, 2, 1)
    assert isinstance(scattered[0]["out"], Pair)
    gathered, direct = scattered.gather(), dp(x, scale=3.0)
    assert pytree.tree_structure(gathered) == pytree.tree_structure(direct)
    for a, b in zip(pytree.tree_leaves(gathered), pytree.tree_leaves(direct)):
        torch.testing.assert_close(a, b)


def test_forward_scattered_along_another_dim():
    dp = torch_dp.DataParallel(torch.nn.Identity(), cpus(2), dim=1)
    x = torch.randn(2, 5)
    scattered = dp.forward_scattered(x)
    assert scattered.chunk_sizes == (3, 2) and scattered.dim == 1
    torch.testing.assert_close(scattered.gather(), x)


def test_forward_scattered_without_devices(no_accelerator):
    model = Net()
    dp = torch_dp.DataParallel(model)  # no accelerator, no "cpu" entries: the module is called directly
    x = torch.randn(4, 6)
    scattered = dp.forward_scattered(x)
    assert scattered.chunk_sizes == (4,) and scattered.devices == (torch.device("cpu"),)
    y = class_targets(4)
    torch.testing.assert_close(
        ParallelCriterion(torch.nn.CrossEntropyLoss())(scattered, y), F.cross_entropy(model(x), y)
    )


def test_gathering_stays_the_default():
    dp = torch_dp.DataParallel(Net(), cpus(2))
    assert isinstance(dp(torch.randn(4, 6)), torch.Tensor)


# ---- callables ----------------------------------------------------------------------------------------------


def scattered_pair(batch=7, devices=3, chunk_sizes=None):
    model = Net().to(DT)
    dp = torch_dp.DataParallel(model, cpus(devices), chunk_sizes=chunk_sizes)
    x = torch.randn(batch, 6, dtype=DT, requires_grad=True)
    return model, dp, x


def check_grads(model, dp, x, got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    (gx_got, *gp_got) = torch.autograd.grad(got, [x, *dp.module.parameters()])
    (gx_exp, *gp_exp) = torch.autograd.grad(expected, [x, *model.parameters()])
    torch.testing.assert_close(gx_got, gx_exp, rtol=1e-12, atol=1e-13)
    for a, b in zip(gp_got, gp_exp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_callable_mean_is_weighted_by_each_chunks_share():
    model, dp, x = scattered_pair(batch=7, chunk_sizes=[1, 4, 2])
    y = dense_targets(7)
    criterion = ParallelCriterion(lambda out, t: ((out - t) ** 2).mean())
    got = criterion(dp.forward_scattered(x), y)
    check_grads(model, dp, x, got, F.mse_loss(model(x), y))


def test_callable_sum_adds_the_chunks():
    model, dp, x = scattered_pair(batch=5, devices=4)
    y = dense_targets(5)
    got = ParallelCriterion(lambda out, t: (out - t).abs().sum(), reduction="sum")(dp.forward_scattered(x), y)
    check_grads(model, dp, x, got, F.l1_loss(model(x), y, reduction="sum"))


def test_callable_returning_sum_and_count_is_exact():
    """A token-level loss with ignored tokens: the chunks' shares of rows are not their shares of the mean."""

    def loss(out, t, mask):
        per_row = F.cross_entropy(out, t, reduction="none") * mask
        return SumAndCount(per_row.sum(), mask.sum())

    model, dp, x = scattered_pair(batch=9, chunk_sizes=[2, 3, 4])
    y, mask = class_targets(9), (torch.rand(9) < 0.6).to(DT)
    mask[:2] = 0  # the first chunk counts nothing
    got = ParallelCriterion(loss)(dp.forward_scattered(x), y, mask=mask)
    expected = (F.cross_entropy(model(x), y, reduction="none") * mask).sum() / mask.sum()
    check_grads(model, dp, x, got, expected)
    summed = ParallelCriterion(loss, reduction="sum")(dp.forward_scattered(x), y, mask=mask)
    torch.testing.assert_close(summed, expected * mask.sum())
    # counts may be Python numbers
    numbers = ParallelCriterion(lambda o, t, mask: SumAndCount(loss(o, t, mask).total, int(mask.sum())))
    torch.testing.assert_close(numbers(dp.forward_scattered(x), y, mask=mask), expected.detach())


def test_callable_none_gathers():
    model, dp, x = scattered_pair(batch=7)
    y = dense_targets(7)
    got = ParallelCriterion(lambda out, t: (out - t) ** 2, reduction="none")(dp.forward_scattered(x), y)
    torch.testing.assert_close(got, (model(x) - y) ** 2)


def test_module_with_parameters_as_loss():
    """A learnable loss (a temperature): its gradient is the whole batch's too."""

    class Tempered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log_t = torch.nn.Parameter(torch.tensor(0.3, dtype=DT))

        def forward(self, out, t):
            return F.cross_entropy(out / self.log_t.exp(), t)

    model, dp, x = scattered_pair(batch=7, devices=3)
    y = class_targets(7)
    loss_dp, loss_ref = Tempered(), Tempered()
    got = ParallelCriterion(loss_dp)(dp.forward_scattered(x), y)
    expected = loss_ref(model(x), y)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    got.backward()
    expected.backward()
    torch.testing.assert_close(loss_dp.log_t.grad, loss_ref.log_t.grad, rtol=1e-12, atol=0)


def test_prepare_for_a_language_model_output():
    """Logits shaped (batch, sequence, vocabulary) and targets (batch, sequence): split by rows of the batch,
    flattened per replica, and still exact with ignore_index."""

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.head = torch.nn.Linear(6, 11)

        def forward(self, tokens):
            return {"logits": self.head(torch.tanh(self.emb(tokens)))}

    model = LM().to(DT)
    dp = torch_dp.DataParallel(copy.deepcopy(model), cpus(3))
    tokens = torch.randint(0, 11, (5, 4))
    labels = torch.randint(0, 11, (5, 4))
    labels[labels < 4] = -100
    criterion = ParallelCriterion(
        torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        prepare=lambda out, t: (out["logits"].flatten(0, 1), t.flatten()),
    )
    got = criterion(dp.forward_scattered(tokens), labels)
    expected = F.cross_entropy(model(tokens)["logits"].flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    got.backward()
    expected.backward()
    for a, b in zip(dp.module.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_empty_output_chunk_is_skipped():
    """A replica whose output has no rows (built by hand here) does not run the loss and adds nothing."""
    out = torch.randn(6, CLASSES, dtype=DT, requires_grad=True)
    y = class_targets(6)
    calls = []

    def loss(o, t):
        calls.append(o.shape[0])
        return F.cross_entropy(o, t)

    parts = [out[:2], out[2:2], out[2:]]
    scattered = ScatteredOutputs(parts, ["cpu"] * 3)
    assert scattered.chunk_sizes == (2, 0, 4)
    torch.testing.assert_close(ParallelCriterion(loss)(scattered, y), F.cross_entropy(out, y), rtol=1e-12, atol=0)
    assert sorted(calls) == [2, 4]
    exact = ParallelCriterion(torch.nn.CrossEntropyLoss(weight=weight()))
    torch.testing.assert_close(exact(scattered, y), F.cross_entropy(out, y, weight=exact.loss.weight))


def test_every_target_ignored_is_nan_as_for_the_whole_batch():
    model, dp, x = scattered_pair(batch=5)
    y = torch.full((5,), -100)
    got = ParallelCriterion(torch.nn.CrossEntropyLoss())(dp.forward_scattered(x), y)
    assert torch.isnan(got) and torch.isnan(F.cross_entropy(model(x), y))


# ---- how the loss runs ------------------------------------------------------------------------------------


def test_loss_runs_on_the_worker_threads_with_the_callers_grad_mode():
    dp = torch_dp.DataParallel(Net(), cpus(4), issuing="threads")
    seen = []
    lock = threading.Lock()

    def loss(out, t):
        with lock:
            seen.append((threading.get_ident(), torch.is_grad_enabled()))
        return F.mse_loss(out, t)

    with torch.no_grad():
        scattered = dp.forward_scattered(torch.randn(8, 6))
        result = ParallelCriterion(loss)(scattered, torch.randn(8, CLASSES))
    assert not result.requires_grad
    assert len(seen) == 4 and not any(grad for _, grad in seen)
    assert len({ident for ident, _ in seen}) == 4  # one worker per replica (replica 0 on the caller)


def test_failure_names_the_replica():
    dp = torch_dp.DataParallel(Net(), cpus(3))

    def loss(out, t):
        if out.shape[0] == 1:
            raise KeyError("boom")
        return out.sum()

    with pytest.raises(KeyError, match=r"Caught KeyError in replica 2 on device cpu"):
        ParallelCriterion(loss)(dp.forward_scattered(torch.randn(7, 6)), torch.randn(7))


# ---- errors -------------------------------------------------------------------------------------------------


def _with_reduction(loss, reduction):
    loss.reduction = reduction
    return loss


@pytest.mark.parametrize(
    "loss, kwargs, error, match",
    [
        (torch.nn.MarginRankingLoss(), {}, TypeError, "no exact rule for MarginRankingLoss"),
        (torch.nn.CrossEntropyLoss(), {"reduction": "sum"}, ValueError, "takes the reduction of CrossEntropyLoss"),
        (torch.nn.MSELoss(reduction="batchmean"), {}, ValueError, "reduction 'mean', 'sum', 'none' for MSELoss"),
        (_with_reduction(torch.nn.L1Loss(), None), {}, ValueError, "for L1Loss, but got 'None'"),
        (lambda o, t: o, {"reduction": "batchmean"}, ValueError, "for a callable"),
        (3, {}, TypeError, "needs a loss module or callable"),
        (lambda o, t: o, {"prepare": 1}, TypeError, "prepare must be callable"),
    ],
)
def test_construction_errors(loss, kwargs, error, match):
    with pytest.raises(error, match=match):
        ParallelCriterion(loss, **kwargs)


def test_call_errors():
    dp = torch_dp.DataParallel(Net(), cpus(2))
    x = torch.randn(6, 6)
    criterion = ParallelCriterion(torch.nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="ScatteredOutputs of DataParallel.forward_scattered"):
        criterion(dp(x), class_targets(6))
    with pytest.raises(ValueError, match=r"chunk sizes \[3, 3\] \(6 rows\), but targets\[0\] has 5 along dim 0"):
        criterion(dp.forward_scattered(x), class_targets(5))
    bce = ParallelCriterion(torch.nn.BCEWithLogitsLoss(weight=torch.rand(6, 1)))
    with pytest.raises(ValueError, match="BCEWithLogitsLoss's weight has size 6 along the dimension the batch"):
        bce(dp.forward_scattered(x), unit_targets(6))
    mixed = ParallelCriterion(lambda o, t: SumAndCount(o.sum(), 1) if o.shape[0] == 3 and t[0] > 0 else o.sum())
    y = torch.tensor([1.0, 1, 1, -1, -1, -1])
    whose_total = r"tensor or a torch_dp.SumAndCount \(whose total is a tensor\) on every replica"
    with pytest.raises(TypeError, match=whose_total + ", but the replicas returned SumAndCount, Tensor"):
        mixed(dp.forward_scattered(x), y)
    with pytest.raises(TypeError, match=whose_total):
        ParallelCriterion(lambda o, t: SumAndCount(1.0, 1))(dp.forward_scattered(x), y)
