"""torch_dp inside torch.distributed: DistributedDataParallel over processes, torch_dp.DataParallel inside each.

Two processes (gloo, CPU) each wrap ``DistributedDataParallel(torch_dp.DataParallel(model, ["cpu"] * k))`` and
train on their half of a global batch. DDP averages the gradients of the ranks and torch_dp sums the gradients
of its replicas into the module's own parameters, so the parameters after a few SGD steps must equal those of
the unwrapped module trained on the whole batch. Both processes run every scenario in one spawn (starting two
interpreters with torch costs seconds) and save what they saw; the tests compare it with references computed
here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any init_process_group: Note [Shutting down gloo] in ddp.py)
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_dp

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 24
LR = 0.1
# Replicas per rank: the ranks need not agree (DDP sees one module per process, whatever runs inside it).
REPLICAS = {0: 2, 1: 3}

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


class MLP(nn.Module):
    def __init__(self, batch_norm: bool = False, unused: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(8, 3)
        # A parameter forward never touches: DDP must be told (find_unused_parameters=True) and must find it
        # by walking the graph through torch_dp's gather, replicas and scatter.
        self.unused = nn.Linear(8, 3) if unused else None

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


SCENARIOS = {
    # name: (model options, DDP options, micro-batches per step: all but the last under no_sync())
    "plain": (dict(), dict(), 1),
    "batch_norm": (dict(batch_norm=True), dict(), 1),
    "unused_parameters": (dict(unused=True), dict(find_unused_parameters=True), 1),
    "bucket_views": (dict(), dict(gradient_as_bucket_view=True, bucket_cap_mb=0.0001), 1),
    "no_sync_accumulation": (dict(), dict(), 2),
    # torch_dp.SyncBatchNorm: statistics over every replica of every process.
    "sync_batch_norm": (dict(batch_norm=True, sync=True), dict(), 1),
    # ... and with one replica per process, where it synchronizes the processes only (as nn.SyncBatchNorm).
    "sync_batch_norm_one_replica": (dict(batch_norm=True, sync=True, one_replica=True), dict(), 1),
}


def _model(options: dict) -> nn.Module:
    torch.manual_seed(0)
    options = dict(options)
    sync = options.pop("sync", False)
    options.pop("one_replica", None)
    model = MLP(**options).double()
    return torch_dp.convert_sync_batchnorm(model) if sync else model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 6, dtype=torch.double, generator=generator)
    return x, torch.randn(GLOBAL_BATCH, 3, dtype=torch.double, generator=generator)


def _micro_batches(x: torch.Tensor, y: torch.Tensor, rank: int, count: int):
    """This rank's rows of the global batch, in `count` micro-batches."""
    local = GLOBAL_BATCH // WORLD
    rows = slice(rank * local, (rank + 1) * local)
    return list(zip(x[rows].chunk(count), y[rows].chunk(count)))


def _run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        x, y = _batch()
        seen = {}
        for name, (model_options, ddp_options, count) in SCENARIOS.items():
            replicas = 1 if model_options.get("one_replica") else REPLICAS[rank]
            inner = torch_dp.DataParallel(_model(model_options), device_ids=["cpu"] * replicas)
            model = DDP(inner, **ddp_options)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR)
            for _ in range(STEPS):
                optimizer.zero_grad()
                batches = _micro_batches(x, y, rank, count)
                for i, (xb, yb) in enumerate(batches):
                    # Every micro-batch but the last accumulates locally; the last one synchronises the sum.
                    sync = i == len(batches) - 1
                    with contextlib.nullcontext() if sync else model.no_sync():
                        (F.mse_loss(model(xb), yb) / count).backward()
                optimizer.step()
            seen[name] = {k: v.detach().clone() for k, v in inner.module.state_dict().items()}
            del model, inner, optimizer
        torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done, and no DDP left holding the group, so that destroying it joins gloo's worker threads
        # before the interpreter finalizes (Note [Shutting down gloo] in examples/python/ddp.py).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_state(tmp_path_factory) -> dict[int, dict]:
    """What each rank's module held after each scenario (one spawn of WORLD processes for the module)."""
    root = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_run_rank, args=(os.path.join(root, "init"), root), nprocs=WORLD, join=True)
    return {rank: torch.load(os.path.join(root, f"rank{rank}.pt")) for rank in range(WORLD)}


def _reference(model_options: dict) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The unwrapped module trained on the whole batch: its parameters, and the buffers each rank must end
    with. The module runs chunk by chunk, as the replicas do (BatchNorm normalises each replica's chunk with its
    own statistics), and takes the mean loss over all rows. Buffers follow the two rules at play: each step
    starts from rank 0's buffers (DDP broadcasts them before the forward) and each rank keeps the update of its
    replica 0 (torch.nn.DataParallel's rule, which torch_dp keeps)."""
    if model_options.get("sync"):
        return _reference_whole_batch({k: v for k, v in model_options.items() if k not in ("sync", "one_replica")})
    model = _model(model_options)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _batch()
    local = GLOBAL_BATCH // WORLD
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    for _ in range(STEPS):
        optimizer.zero_grad()
        outputs, after_replica0 = [], {}
        for rank in range(WORLD):
            rows = x[rank * local : (rank + 1) * local]
            chunks = rows.chunk(REPLICAS[rank])
            outputs += [model(chunk) for chunk in chunks]
            # In training mode the outputs do not depend on the running statistics; a copy of the module
            # loaded with the step's starting buffers gives replica 0's update.
            probe = copy.deepcopy(model)
            probe.load_state_dict(buffers, strict=False)
            with torch.no_grad():
                probe(chunks[0])
            after_replica0[rank] = {k: v.clone() for k, v in probe.named_buffers()}
        F.mse_loss(torch.cat(outputs), y).backward()
        optimizer.step()
        buffers = after_replica0[0]
    return {k: v.detach() for k, v in model.named_parameters()}, after_replica0


def _reference_whole_batch(model_options: dict) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The unwrapped module (plain BatchNorm) trained on the whole batch at once: what SyncBatchNorm over every
    replica of every rank computes, buffers included (the same on every rank)."""
    model = _model(model_options)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _batch()
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return {k: v.detach() for k, v in model.named_parameters()}, {rank: buffers for rank in range(WORLD)}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ddp_over_torch_dp_trains_like_the_whole_batch(ranks_state, scenario):
    model_options = SCENARIOS[scenario][0]
    parameters, buffers = _reference(model_options)
    initial = _model(model_options).state_dict()
    for rank in range(WORLD):
        state = ranks_state[rank][scenario]
        assert state.keys() == initial.keys()
        moved = [name for name, value in parameters.items() if (value - initial[name]).abs().max() > 1e-9]
        assert len(moved) >= 2, moved
        for name, value in parameters.items():
            # Guards against a vacuous comparison: what training moved must have moved. (Not every parameter
            # moves: a bias right before BatchNorm gets a zero gradient, exactly 0 or rounding noise.)
            if name in moved:
                assert not torch.equal(state[name], initial[name]), f"rank {rank}: {name} never changed"
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-12, msg=f"rank {rank}: {name}")
        for name, value in buffers[rank].items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-12, msg=f"rank {rank}: {name}")


def test_buffers_follow_rank0_broadcast_and_replica0_rule(ranks_state):
    # Guards the reference above: with BatchNorm the ranks end with different running statistics (each kept
    # its own replica 0's update of rank 0's broadcast), and the count is one per step.
    state0, state1 = ranks_state[0]["batch_norm"], ranks_state[1]["batch_norm"]
    assert int(state0["norm.num_batches_tracked"]) == int(state1["norm.num_batches_tracked"]) == STEPS
    assert not torch.equal(state0["norm.running_mean"], state1["norm.running_mean"])


def test_unused_parameter_untouched(ranks_state):
    initial = _model(dict(unused=True)).state_dict()
    for rank in range(WORLD):
        state = ranks_state[rank]["unused_parameters"]
        torch.testing.assert_close(state["unused.weight"], initial["unused.weight"], rtol=0, atol=0)


def test_ddp_example_under_torchrun():
    # examples/python/ddp.py as its docstring says to start it: torchrun, two processes of two CPU replicas.
    root = Path(__file__).resolve().parents[2]
    python_path = os.pathsep.join(filter(None, [str(root / "python"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=python_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(root / "examples" / "python" / "ddp.py"),
            "--device",
            "cpu",
            "--epochs",
            "3",
            "--replicas",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    # Every rank trained, shut its process group down, and exited cleanly: the example's shutdown order keeps
    # gloo's worker threads from running into the interpreter's finalization (Note [Shutting down gloo]).
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes x 2 replicas each (CPU), backend gloo" in result.stdout
    losses = [float(line.rsplit(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(losses) == 3, result.stdout
    assert losses[-1] < losses[0] / 2, losses
    for rank in range(2):
        assert f"rank {rank}: process group destroyed" in result.stdout, result.stdout + result.stderr
