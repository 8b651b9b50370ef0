"""torch_dp.SyncBatchNorm: batch statistics over every replica of a DataParallel forward.

Through DataParallel, a model whose BatchNorm layers were converted must compute what the unconverted model
computes on the whole batch, unwrapped: outputs, input and parameter gradients, and running statistics after
SGD steps (Note [Synchronized batch norm])."""

import copy
import threading

import pytest
import torch
from torch import nn

import torch_dp
from helpers import cpus
from reference import copying


def convnet(**bn_options):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **bn_options), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5, **bn_options), nn.Tanh(), nn.Linear(5, 2),
    ).double()


def sequence_net():
    # BatchNorm1d on (N, C, L) and BatchNorm3d on (N, C, D, H, W); one layer called twice.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm1d(3)
            self.bn3 = nn.BatchNorm3d(2)

        def forward(self, x):
            h = self.bn1(self.bn1(x) * 2)
            return self.bn3(h.reshape(h.size(0), 2, 3, 2, -1)).sum((2, 3, 4))

    return Net().double()


def assert_trains_like_whole_batch(make_model, make_input, device_ids, steps=3, copy_everything=False,
                                   **dp_options):
    torch.manual_seed(0)
    reference = make_model()
    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    dp = torch_dp.DataParallel(model, device_ids, **dp_options)
    if copy_everything:  # the path of replicas on other devices: copies of every tensor
        copying(dp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(steps):
        x = make_input()
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = dp(x), reference(x_ref)
        torch.testing.assert_close(out, out_ref, msg=lambda m: f"step {step} outputs: {m}")
        out.square().sum().backward()
        out_ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, msg=lambda m: f"step {step} input grads: {m}")
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, msg=lambda m: f"step {step} {name}.grad: {m}")
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(b, b_ref, msg=lambda m: f"step {step} {name}: {m}")
    return model, dp


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_trains_like_batchnorm_on_the_whole_batch(replicas):
    # 10 rows over 3 or 4 replicas: chunks of unequal size.
    assert_trains_like_whole_batch(convnet, lambda: torch.randn(10, 3, 6, 6, dtype=torch.double,
                                                               requires_grad=True), cpus(replicas))


def test_trains_like_batchnorm_with_copied_replicas():
    assert_trains_like_whole_batch(convnet, lambda: torch.randn(9, 3, 6, 6, dtype=torch.double,
                                                               requires_grad=True), cpus(3), copy_everything=True)


@pytest.mark.parametrize("options", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
                         ids=["cumulative-average", "no-affine", "no-running-stats"])
def test_trains_like_batchnorm_with_options(options):
    assert_trains_like_whole_batch(lambda: convnet(**options), lambda: torch.randn(
        8, 3, 6, 6, dtype=torch.double, requires_grad=True), cpus(3))


def test_1d_and_3d_inputs_and_a_layer_called_twice():
    assert_trains_like_whole_batch(sequence_net, lambda: torch.randn(
        7, 3, 8, dtype=torch.double, requires_grad=True), cpus(3))


def test_an_empty_chunk_takes_part():
    assert_trains_like_whole_batch(convnet, lambda: torch.randn(
        6, 3, 6, 6, dtype=torch.double, requires_grad=True), cpus(3), chunk_sizes=[0, 4, 2])


def test_eval_mode_uses_the_running_statistics():
    torch.manual_seed(0)
    reference = convnet().eval()
    dp = torch_dp.DataParallel(torch_dp.convert_sync_batchnorm(copy.deepcopy(reference)), cpus(3))
    x = torch.randn(9, 3, 6, 6, dtype=torch.double)
    torch.testing.assert_close(dp(x), reference(x))


def test_bfloat16_statistics_in_float32():
    torch.manual_seed(0)
    reference = nn.BatchNorm1d(4)
    dp = torch_dp.DataParallel(torch_dp.convert_sync_batchnorm(copy.deepcopy(reference)), cpus(2))
    x = torch.randn(16, 4) * 3 + 1
    out = dp(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x.bfloat16().float()), atol=2e-2, rtol=2e-2)


def test_plain_batchnorm_outside_a_data_parallel_forward():
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3).double()
    layer = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(layer, torch_dp.SyncBatchNorm)
    x = torch.randn(4, 3, 5, 5, dtype=torch.double)
    torch.testing.assert_close(layer(x), reference(x))  # unwrapped
    torch.testing.assert_close(torch_dp.DataParallel(layer, cpus(1))(x), reference(x))  # one replica
    # torch_dp.data_parallel shares its workers between callers, so its replicas do not wait for each other:
    # each normalizes its own chunk.
    per_chunk = torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.chunk(2)])
    fresh = torch_dp.convert_sync_batchnorm(nn.BatchNorm2d(3).double())
    torch.testing.assert_close(torch_dp.data_parallel(fresh, x, cpus(2)), per_chunk)


def test_convert_keeps_parameters_buffers_and_state_dict():
    model = convnet()
    model[1].running_mean.fill_(0.5)
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    converted = torch_dp.convert_sync_batchnorm(model)
    assert isinstance(converted[1], torch_dp.SyncBatchNorm) and isinstance(converted[5], torch_dp.SyncBatchNorm)
    assert list(converted.state_dict()) == keys
    for name, p in converted.named_parameters():
        assert p is params[name], name
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5, dtype=torch.double))
    assert isinstance(torch_dp.convert_sync_batchnorm(nn.SyncBatchNorm(3)), torch_dp.SyncBatchNorm)


def test_bad_input_too_few_values_over_all_replicas():
    dp = torch_dp.DataParallel(torch_dp.convert_sync_batchnorm(nn.BatchNorm1d(3)), cpus(2), chunk_sizes=[1, 0])
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*1 value\(s\) per "
                                         r"channel over all replicas"):
        dp(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        torch_dp.convert_sync_batchnorm(nn.BatchNorm1d(3))(torch.randn(3))


class Faulty(nn.Module):
    """Runs x through a SyncBatchNorm unless told otherwise for some replica (by the first value of its chunk)."""

    def __init__(self):
        super().__init__()
        self.bn = torch_dp.SyncBatchNorm(2)
        self.other = torch_dp.SyncBatchNorm(2)
        self.plan = {}

    def forward(self, x):
        action = self.plan.get(int(x[0, 0].item()))
        if action == "raise":
            raise KeyError("replica failed before the rendezvous")
        if action == "skip":
            return x
        if action == "other":
            return self.other(x)
        return self.bn(x)


def faulty_batch(n):
    x = torch.randn(2 * n, 2)
    x[:, 0] = torch.arange(n).repeat_interleave(2).float()  # replica i's rows start with i
    return x


def run_with_timeout(call, seconds=30):
    """call() on a thread; fails the test instead of hanging it when the call does not return."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: B902 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no return within {seconds} s: replicas left waiting"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("failing", [0, 2])
def test_a_failing_replica_releases_the_waiting_ones(failing):
    net = Faulty()
    dp = torch_dp.DataParallel(net, cpus(3))
    net.plan = {failing: "raise"}
    with pytest.raises(KeyError, match=f"Caught KeyError in replica {failing} on device cpu"):
        run_with_timeout(lambda: dp(faulty_batch(3)))
    net.plan = {}
    x = faulty_batch(3)
    torch.testing.assert_close(run_with_timeout(lambda: dp(x)), nn.functional.batch_norm(
        x, None, None, net.bn.weight.detach(), net.bn.bias.detach(), training=True))


def test_replicas_calling_different_layers_get_an_error():
    net = Faulty()
    dp = torch_dp.DataParallel(net, cpus(3))
    net.plan = {1: "skip"}
    with pytest.raises(RuntimeError, match="replica 1 finished its forward without reaching SyncBatchNorm call 1"):
        run_with_timeout(lambda: dp(faulty_batch(3)))
    net.plan = {2: "other"}
    with pytest.raises(RuntimeError, match="the replicas reached different layers"):
        run_with_timeout(lambda: dp(faulty_batch(3)))
    net.plan = {}
    run_with_timeout(lambda: dp(faulty_batch(3)))  # and the next forward works


@pytest.mark.cuda
@pytest.mark.parametrize("device_ids", [[0, 0], [0, 0, 0, 0], "all"], ids=["cuda00", "cuda0000", "all-gpus"])
def test_on_gpus(device_ids):
    if device_ids == "all":
        device_ids = list(range(torch.cuda.device_count()))
        if len(device_ids) < 2:
            pytest.skip("needs two GPUs")
    assert_trains_like_whole_batch(lambda: convnet().cuda(), lambda: torch.randn(
        10, 3, 6, 6, dtype=torch.double, device="cuda", requires_grad=True), device_ids)
