"""torch_dp.replicate: parameter sharing on the source device, buffer aliasing of replica 0, gradients."""

import io

import pytest
import torch
from torch import nn

import torch_dp
from helpers import cpus


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 2, bias=False)
        self.shared = self.head  # the same module twice
        self.register_buffer("offset", torch.randn(2))
        self.nothing = None

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x)))) + self.offset


def make_net():
    return Net().double()


def test_no_devices_give_no_replicas():
    assert torch_dp.replicate(make_net(), []) == []


@pytest.mark.parametrize("n", [1, 2, 4])
def test_replicas_share_the_original_parameters(n):
    net = make_net()
    replicas = torch_dp.replicate(net, cpus(n))
    assert len(replicas) == n
    originals = list(net.parameters())
    for replica in replicas:
        assert type(replica) is Net and replica is not net
        assert replica.fc is not net.fc and replica.bn is not net.bn
        assert next(replica.parameters()) is originals[0]  # no StopIteration: the replica's parameters() yields
        params = list(replica.parameters())
        assert len(params) == len(originals)
        assert all(p is q for p, q in zip(params, originals))
        assert replica.fc.weight is net.fc.weight and replica.head.weight is net.head.weight
        assert replica.head.bias is None and replica.nothing is None
        assert replica.shared is replica.head  # a module used twice stays one module inside a replica


def test_replica_zero_shares_buffers_and_others_copy_them():
    net = make_net()
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2.0)
    replicas = torch_dp.replicate(net, cpus(3))
    originals = list(net.buffers())
    assert all(b is o for b, o in zip(replicas[0].buffers(), originals))
    for replica in replicas[1:]:
        copies = list(replica.buffers())
        assert len(copies) == len(originals)
        for copy, original in zip(copies, originals):
            assert copy is not original
            assert copy.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
            assert copy.dtype == original.dtype
            torch.testing.assert_close(copy, original, rtol=0, atol=0)


def test_only_replica_zero_updates_the_original_running_stats():
    net = make_net().train()
    before = net.bn.running_mean.clone()
    replicas = torch_dp.replicate(net, cpus(2))
    replicas[1](torch.randn(4, 4, dtype=torch.float64))
    torch.testing.assert_close(net.bn.running_mean, before, rtol=0, atol=0)
    assert net.bn.num_batches_tracked.item() == 0
    replicas[0](torch.randn(4, 4, dtype=torch.float64))
    assert not torch.equal(net.bn.running_mean, before)
    assert net.bn.num_batches_tracked.item() == 1


def test_replicas_inherit_mode_and_hooks():
    net = make_net().eval()
    calls = []
    net.fc.register_forward_hook(lambda module, args, out: calls.append(module))
    replicas = torch_dp.replicate(net, cpus(3))
    assert all(not r.training and not r.bn.training for r in replicas)
    for replica in replicas:
        replica(torch.randn(2, 4, dtype=torch.float64))
    assert calls == [r.fc for r in replicas]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_gradients_from_replicas_reach_the_original_parameters(n):
    net = make_net().eval()
    net.bn.running_mean.normal_()
    x = torch.randn(7, 4, dtype=torch.float64)
    weights = torch.randn(7, 2, dtype=torch.float64)

    expected = torch.autograd.grad((net(x) * weights).sum(), list(net.parameters()))

    replicas = torch_dp.replicate(net, cpus(n))
    chunks, wchunks = x.chunk(n), weights.chunk(n)
    loss = sum((r(c) * w).sum() for r, c, w in zip(replicas, chunks, wchunks))
    loss.backward()
    for param, grad in zip(net.parameters(), expected):
        torch.testing.assert_close(param.grad, grad)


def test_detached_replicas_compute_the_same():
    net = make_net().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    for replica in torch_dp.replicate(net, cpus(2), detach=True):
        torch.testing.assert_close(replica(x), net(x))


def test_replicas_can_be_saved():
    net = make_net()
    x = torch.randn(3, 4, dtype=torch.float64)
    for detach in (False, True):
        for replica in torch_dp.replicate(net.eval(), cpus(2), detach=detach):
            buffer = io.BytesIO()
            torch.save(replica, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            torch.testing.assert_close(loaded(x), net(x))
