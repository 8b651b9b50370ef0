"""torch_dp.SyncBatchNorm across distinct devices: the replicas' statistics meet across devices (copied between
them), and outputs, input and parameter gradients and running statistics over several SGD steps equal plain
BatchNorm's on the whole batch at once, unwrapped, on the CPU (Note [Synchronized batch norm]); with
reproducible=True too, whose replicas sharing a device take turns between the layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_dp
from distinct import assert_gradients_match, cpu, sims
from helpers import conv_bn_net as convnet, run_with_timeout

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def assert_trains_like_whole_batch(device_ids, rows=10, steps=3, make_model=convnet, **dp_options):
    """`steps` SGD steps of the converted model through a DataParallel over `device_ids` (sim device indices,
    the module on the first), against the unconverted model on the whole batch on the CPU."""
    torch.manual_seed(0)
    reference = make_model()
    source = torch.device("sim", device_ids[0])
    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference)).to(source)
    dp = torch_dp.DataParallel(model, device_ids, **dp_options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(steps):
        x_ref = torch.randn(rows, 3, 6, 6, dtype=DT, requires_grad=True)
        x = x_ref.detach().to(source).requires_grad_()
        out, out_ref = run_with_timeout(lambda x=x: dp(x)), reference(x_ref)
        assert out.device == source
        torch.testing.assert_close(cpu(out), out_ref, msg=lambda m, step=step: f"step {step} outputs: {m}", **TOL)
        out.square().sum().backward()
        out_ref.square().sum().backward()
        assert_gradients_match(x, x_ref, model, reference, source, step, TOL)
        for o in (optimizer, reference_optimizer):
            o.step()
            o.zero_grad()
        for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(
                cpu(b), b_ref, msg=lambda m, step=step, name=name: f"step {step} {name}: {m}", **TOL
            )
    return model, dp


@pytest.mark.parametrize("reproducible", [False, True], ids=["default", "reproducible"])
@pytest.mark.parametrize("count", [2, 3, 4])
def test_trains_like_batchnorm_on_the_whole_batch(count, reproducible):
    """10 rows over 2, 3 or 4 distinct devices (uneven chunks over 3 and 4)."""
    assert_trains_like_whole_batch([d.index for d in sims(count)], reproducible=reproducible)


@pytest.mark.parametrize(
    "device_ids", [[2, 0, 1], [0, 1, 0, 1], [1, 1, 2]], ids=["module-on-sim2", "two-per-device", "two-on-source"]
)
def test_other_device_lists(device_ids):
    """The module on another device than sim:0; several replicas per device (both sharing and copying tensors)."""
    assert_trains_like_whole_batch(device_ids, rows=11)


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
    ids=["cumulative-average", "no-affine", "no-running-stats"],
)
def test_batchnorm_options(options):
    assert_trains_like_whole_batch([0, 1, 2], make_model=lambda: convnet(**options))


def test_a_device_with_an_empty_chunk_leaves_the_others_synchronized():
    assert_trains_like_whole_batch([0, 1, 2], rows=6, chunk_sizes=[4, 0, 2])


def test_not_the_per_chunk_statistics():
    """What a broken synchronization would give (each device normalizing its own chunk) differs from the whole
    batch's result the tests above compare with, so they would catch it."""
    torch.manual_seed(0)
    reference = convnet()
    x = torch.randn(10, 3, 6, 6, dtype=DT)
    per_chunk = torch.cat([reference(chunk) for chunk in x.chunk(3)])
    assert not torch.allclose(per_chunk, reference(x), **TOL)


def test_eval_mode_uses_the_running_statistics():
    torch.manual_seed(0)
    reference = convnet()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    reference.eval()
    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference)).to(sims(1)[0])
    dp = torch_dp.DataParallel(model, sims(3))
    x = torch.randn(9, 3, 6, 6, dtype=DT)
    torch.testing.assert_close(cpu(dp(x.to(sims(1)[0]))), reference(x), **TOL)
