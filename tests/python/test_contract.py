"""A property-based proof of DataParallel's contract with persistent replicas.

torch.nn.DataParallel rebuilds its replicas in every forward, so whatever the user changes on `dp.module` between
two forwards is seen by every replica of the next one. torch_dp keeps replicas alive, and must keep that promise
without exception. A hypothesis state machine draws a device setup (1-4 CPU replicas, sharing the module's
parameters or copying every tensor as replicas on other devices do), then interleaves forwards (any batch size,
train or eval, with or without grad) with every kind of edit a user makes to `dp.module`: in-place edits through
`.data`, under no_grad, through `data_ptr()`, `set_`, `.data =`, `load_state_dict`, `copy_`, a replaced
submodule, a changed plain attribute, a fused optimizer step and BatchNorm recalibration run on the module itself.
An independent twin of the module, edited in lockstep and run through `ChunkedReference` (torch.nn.DataParallel's
semantics on one device), gives the expected outputs, buffers and gradients after every forward.

The machine has teeth: with `trust_version_counters=True` (refresh copies only when a version counter or data
pointer moved) it finds a failing sequence, since several of those edits move neither.

More sequences on demand: TORCH_DP_CONTRACT_EXAMPLES=5000 pytest tests/python/test_contract.py
"""

from __future__ import annotations

import copy
import ctypes
import functools
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import torch_dp
from helpers import cpus
from reference import ChunkedReference, copying

# CPU-only and about half a minute: CI runs it; `-m "not slow"` (the GPU check's pytest) leaves it out.
pytestmark = pytest.mark.slow

DTYPE = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
IN, OUT, LENGTH = 3, 4, 2  # inputs are (batch, LENGTH, IN): BatchNorm sees batch * LENGTH values, so 1 row trains

SEEDS = st.integers(0, 2**31 - 1)
# Every factor and offset keeps a running variance positive (it is only ever scaled by > 0 or shifted up).
IN_PLACE_OPS = st.sampled_from([("mul_", 0.5), ("mul_", 3.0), ("add_", 1.0), ("add_", 5.0)])
TENSORS = st.sampled_from(
    ["lin.weight", "lin.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "shift"]
)
PARAMETERS = st.sampled_from(["lin.weight", "lin.bias", "bn.weight", "bn.bias"])

# Every setup: one replica (the module itself), several sharing its parameters, several copying every tensor.
SETUPS = [(1, False)] + [(n, copies) for n in (2, 3, 4) for copies in (False, True)]


def _values(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Fresh values for the tensor called `name`, never all zeros; a positive one for running variances."""
    values = torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    return values.abs() + 0.5 if name.endswith("running_var") else values


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Fills every floating tensor of `module` from `seed`, so that a sequence replays exactly."""
    with torch.no_grad():
        for i, (name, t) in enumerate([*module.named_parameters(), *module.named_buffers()]):
            if t.is_floating_point():
                t.copy_(_values(name, t.shape, seed + i))
    return module


# A user edits a few things between two forwards. Bounding the edits between forwards keeps forwards frequent,
# so that a stale replica is observed before a later edit that moves a version counter happens to refresh it.
MAX_EDITS_BETWEEN_FORWARDS = 2


def edit(**strategies):
    """A rule that edits the module between two forwards (identically on model and twin)."""

    def decorate(function):
        @functools.wraps(function)
        def counted(self, **arguments):
            self.edits += 1
            function(self, **arguments)

        return precondition(lambda self: self.edits < MAX_EDITS_BETWEEN_FORWARDS)(rule(**strategies)(counted))

    return decorate


class Net(nn.Module):
    """Tiny, but with every kind of state a forward reads: parameters, BatchNorm statistics, a plain buffer and
    a plain Python attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, OUT, dtype=DTYPE)
        self.bn = nn.BatchNorm1d(OUT, dtype=DTYPE)
        self.register_buffer("shift", torch.zeros(OUT, dtype=DTYPE))
        self.scale = 1.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x).transpose(1, 2)) * self.scale + self.shift[:, None]


class ContractMachine(RuleBasedStateMachine):
    """`dp` wraps `model`; `reference` wraps `twin`, a deep copy edited in lockstep. Every edit is applied to both
    modules identically (never sharing storage between them, or an edit would land twice)."""

    trust_version_counters = False
    setups = SETUPS

    @initialize(data=st.data(), seed=SEEDS)
    def build(self, data: st.DataObject, seed: int) -> None:
        self.count, copies = data.draw(st.sampled_from(self.setups), label="replicas, copies")
        self.model = _randomize(Net(), seed)
        self.twin = copy.deepcopy(self.model)
        self.dp = torch_dp.DataParallel(
            self.model, cpus(self.count), trust_version_counters=self.trust_version_counters
        )
        if copies:
            copying(self.dp)  # before the first forward: replicas > 0 then copy every tensor
        self.reference = ChunkedReference(self.twin, self.count)
        assert self.dp.module is self.model
        self.edits = 0

    def _pairs(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _tensor(self.model, name), _tensor(self.twin, name)

    # ---- forwards ------------------------------------------------------------------------------------------

    @rule(batch=st.integers(1, 9), train=st.booleans(), grad=st.booleans(), via_dp=st.booleans(), seed=SEEDS)
    def forward(self, batch: int, train: bool, grad: bool, via_dp: bool, seed: int) -> None:
        # Batches smaller than the replica count leave replicas idle (torch.chunk gives fewer chunks). The mode is
        # set either through the wrapper or on the module itself: both must reach every replica.
        self.edits = 0
        (self.dp if via_dp else self.model).train(train)
        self.twin.train(train)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, LENGTH, IN, dtype=DTYPE, generator=generator)
        with torch.set_grad_enabled(grad):
            out = self.dp(x)
            expected = self.reference(x)
        torch.testing.assert_close(out, expected, **TOL)
        # Buffers (replica 0's BatchNorm updates land in model, chunk 0's in twin) are compared by check_buffers.
        if grad:
            weights = torch.randn(expected.shape, dtype=DTYPE, generator=generator)
            (out * weights).sum().backward()
            (expected * weights).sum().backward()
            for (name, p), q in zip(self.model.named_parameters(), self.twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"grad of {name}: {m}", **TOL)
            self.model.zero_grad(set_to_none=True)
            self.twin.zero_grad(set_to_none=True)

    # ---- edits between forwards ----------------------------------------------------------------------------

    @edit(name=TENSORS, op=IN_PLACE_OPS)
    def edit_through_data(self, name: str, op: tuple[str, float]) -> None:
        # `.data` shares the storage but has its own version counter: the tensor's does not move.
        for t in self._pairs(name):
            getattr(t.data, op[0])(op[1])

    @edit(name=TENSORS, op=IN_PLACE_OPS)
    def edit_under_no_grad(self, name: str, op: tuple[str, float]) -> None:
        with torch.no_grad():
            for t in self._pairs(name):
                getattr(t, op[0])(op[1])

    @edit(name=TENSORS, seed=SEEDS)
    def write_through_data_ptr(self, name: str, seed: int) -> None:
        # What a C++/CUDA extension does: raw bytes, invisible to autograd and to version counters.
        for t in self._pairs(name):
            new = _values(name, t.shape, seed)
            assert t.is_contiguous() and new.dtype == t.dtype
            ctypes.memmove(t.data_ptr(), new.data_ptr(), t.numel() * t.element_size())

    @edit(name=TENSORS, seed=SEEDS)
    def set_storage(self, name: str, seed: int) -> None:
        with torch.no_grad():
            for t in self._pairs(name):
                t.set_(_values(name, t.shape, seed))

    @edit(name=PARAMETERS, seed=SEEDS)
    def swap_data(self, name: str, seed: int) -> None:
        for p in self._pairs(name):
            p.data = _values(name, p.shape, seed)

    @edit(seed=SEEDS)
    def load_perturbed_state_dict(self, seed: int) -> None:
        state = {}
        for i, (name, t) in enumerate(self.model.state_dict().items()):
            # Scaling by a positive factor keeps running variances positive.
            state[name] = t * _values("running_var", t.shape, seed + i) if t.is_floating_point() else t + 1
        self.model.load_state_dict(state)
        self.twin.load_state_dict(state)

    @edit(name=TENSORS, seed=SEEDS)
    def copy_from_another_module(self, name: str, seed: int) -> None:
        other = _randomize(Net(), seed)
        with torch.no_grad():
            for t in self._pairs(name):
                t.copy_(_tensor(other, name))

    @edit(which=st.sampled_from(["lin", "bn"]), seed=SEEDS, momentum=st.sampled_from([0.1, 0.5, None]))
    def replace_submodule(self, which: str, seed: int, momentum: float | None) -> None:
        if which == "lin":
            new = nn.Linear(IN, OUT, dtype=DTYPE)
        else:  # other hyperparameters as well: momentum=None is a cumulative average (uses num_batches_tracked)
            new = nn.BatchNorm1d(OUT, momentum=momentum, eps=1e-3, dtype=DTYPE)
            new.num_batches_tracked.fill_(seed % 7)
        _randomize(new, seed)
        setattr(self.model, which, new)
        setattr(self.twin, which, copy.deepcopy(new))

    @edit(scale=st.sampled_from([-2.0, 0.5, 3.0]), momentum=st.sampled_from([0.1, 0.7]))
    def change_attributes(self, scale: float, momentum: float) -> None:
        for m in (self.model, self.twin):
            m.scale = scale
            if m.bn.momentum is not None:
                m.bn.momentum = momentum

    @edit(seed=SEEDS, lr=st.sampled_from([1e-2, 1e-1]))
    def fused_optimizer_step(self, seed: int, lr: float) -> None:
        # A fused kernel writes the parameters without moving their version counters. Grads come from a backward
        # through each module itself, in eval mode so that the running statistics stay as they are.
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(4, LENGTH, IN, dtype=DTYPE, generator=generator)
        weights = torch.randn(4, OUT, LENGTH, dtype=DTYPE, generator=generator)
        for m in (self.model, self.twin):
            m.eval()
            (m(x) * weights).sum().backward()
            torch.optim.AdamW(m.parameters(), lr=lr, fused=True).step()
            m.zero_grad(set_to_none=True)

    @edit(batch=st.integers(2, 6), seed=SEEDS)
    def recalibrate_batchnorm(self, batch: int, seed: int) -> None:
        # The batch-norm op updates running statistics without moving their version counters.
        x = torch.randn(batch, LENGTH, IN, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for m in (self.model, self.twin):
                m.train()
                m(x)
                m.eval()

    # ---- invariants ----------------------------------------------------------------------------------------

    @invariant()
    def check_buffers(self) -> None:
        # After every step, forwards included: the twin is the ground truth only while both agree on every buffer.
        for (name, b), c in zip(self.model.named_buffers(), self.twin.buffers()):
            torch.testing.assert_close(b, c, msg=lambda m, name=name: f"buffer {name}: {m}", **TOL)

    def teardown(self) -> None:
        # The worker threads go with the DataParallel; do not let hundreds of them pile up until gc runs.
        self.__dict__.pop("dp", None)


EXAMPLES = int(os.environ.get("TORCH_DP_CONTRACT_EXAMPLES", "200"))

TestContract = ContractMachine.TestCase
TestContract.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("copies", [False, True], ids=["shared_parameters", "copies"])
def test_trusting_version_counters_breaks_the_contract(copies: bool) -> None:
    # The machine has teeth: under the old behaviour (copies refreshed only when a version counter or data
    # pointer moved) it finds a stale replica, both where replicas > 0 share the parameters and copy the buffers
    # and where they copy everything. Derandomized, so the same sequences run every time; it stops at the first
    # failure (found within a hundred sequences; the budget leaves a wide margin); no shrinking, which would only
    # cost time.
    trusting = type(
        "TrustingMachine",
        (ContractMachine,),
        {"trust_version_counters": True, "setups": [(n, copies) for n in (2, 3, 4)]},
    )
    with pytest.raises(AssertionError, match="not close"):
        run_state_machine_as_test(
            trusting,
            settings=settings(
                max_examples=500,
                stateful_step_count=15,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.generate],
                report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
