"""torch_dp.DataParallel end to end, on CPU replica lists: the drop-in contract of torch.nn.DataParallel.

Every comparison runs the wrapped module against an unwrapped deep copy in float64: outputs, parameter
gradients and input gradients must agree for 1 to 4 replicas."""

import collections
import copy
import gc
import io
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import torch_dp
from helpers import MLP, cpus, os_threads, run_in_threads
from reference import copying

Pair = collections.namedtuple("Pair", ["first", "second"])


# ---- models --------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def conv_net(training):
    net = ConvNet().double().train(training)
    with torch.no_grad():  # running statistics that matter in eval mode
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.normal_()
    return net


class KwargsNet(nn.Module):
    """Positional and keyword tensors plus non-tensor arguments; returns a dict holding a namedtuple."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = nn.Linear(4, 1)

    def forward(self, x, y=None, *, scale=1.0, mode="sum"):
        h = self.proj(x) * scale
        if y is not None:
            h = h + y
        pooled = h.sum(1, keepdim=True) if mode == "sum" else h.mean(1, keepdim=True)
        return {"hidden": h, "pair": Pair(torch.sigmoid(self.gate(h)), pooled), "nothing": None}


class Scaled(nn.Module):
    """Reads a plain attribute and a submodule in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = 1.0

    def forward(self, x):
        return self.fc(x) * self.scale


# ---- helpers -------------------------------------------------------------------------------------------------


def tensors_of(tree):
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def leaf_inputs(args, kwargs):
    """Fresh requires-grad leaves with the same values, for each of the two runs."""

    def fresh(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.detach().clone().requires_grad_()
        return leaf

    return pytree.tree_map(fresh, args), pytree.tree_map(fresh, kwargs)


def run_and_backward(module, args, kwargs, weights=None):
    out = module(*args, **kwargs)
    outputs = tensors_of(out)
    if weights is None:
        weights = [torch.randn_like(o) for o in outputs]
    sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
    grads = [p.grad for p in module.parameters()]
    input_grads = [t.grad for t in tensors_of((args, kwargs)) if t.requires_grad]
    return out, weights, grads, input_grads


def assert_equivalent(module, args, kwargs, devices):
    """Wrapped and unwrapped agree on outputs, parameter gradients and input gradients."""
    reference = copy.deepcopy(module)
    ref_args, ref_kwargs = leaf_inputs(args, kwargs)
    dp_args, dp_kwargs = leaf_inputs(args, kwargs)
    expected, weights, expected_grads, expected_input_grads = run_and_backward(reference, ref_args, ref_kwargs)
    dp = torch_dp.DataParallel(module, devices)
    out, _, grads, input_grads = run_and_backward(dp, dp_args, dp_kwargs, weights)
    assert pytree.tree_structure(out) == pytree.tree_structure(expected)
    torch.testing.assert_close(out, expected)
    assert len(grads) == len(expected_grads) > 0
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    assert len(input_grads) == len(expected_input_grads) > 0
    for grad, expected_grad in zip(input_grads, expected_input_grads):
        torch.testing.assert_close(grad, expected_grad)
    return dp


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


# ---- the class and its attributes ----------------------------------------------------------------------------


def test_is_a_torch_data_parallel_with_its_attributes():
    net = MLP()
    dp = torch_dp.DataParallel(net, cpus(4))
    assert isinstance(dp, torch.nn.DataParallel) and isinstance(dp, nn.Module)
    assert dp.module is net
    assert dp.device_ids == [torch.device("cpu")] * 4
    assert dp.output_device == torch.device("cpu")
    assert dp.dim == 0
    assert dp.src_device_obj == torch.device("cpu")
    assert list(dp.children()) == [net]


def test_state_dict_interchangeable_with_torch_data_parallel():
    ours = torch_dp.DataParallel(conv_net(training=False), cpus(2))
    # A passthrough on CPU, still module.-prefixed; with one GPU it moves the module there.
    theirs = torch.nn.DataParallel(conv_net(training=False))
    names = [name for name, _ in ours.module.state_dict().items()]
    assert list(ours.state_dict()) == ["module." + name for name in names]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(theirs.state_dict()[key].to(value.device), value, rtol=0, atol=0)
    fresh = torch_dp.DataParallel(conv_net(training=False), cpus(3))
    fresh.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), ours(x))
    # and the unwrapped module loads it after dropping the prefix
    plain = conv_net(training=False)
    state = ours.state_dict()
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "module.")
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), ours(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="without an accelerator only")
def test_without_device_ids_and_accelerator_the_module_is_called_directly():
    class Token(nn.Module):
        def forward(self, x):
            return {"rows": x.shape[0]}  # an int: gather could not handle it, a direct call can

    net = Token()
    dp = torch_dp.DataParallel(net)
    assert dp.device_ids == [] and dp.module is net
    assert dp(torch.randn(8, 2)) == {"rows": 8}
    assert torch_dp.DataParallel(net, []).device_ids == []  # as torch.nn.DataParallel on such a machine


def test_import_under_another_torch_fails_naming_both_versions():
    # The compiled part only works with the torch it was built against: importing under another must fail with
    # a message, before the extension is loaded (an undefined-symbol error from the loader otherwise).
    script = textwrap.dedent("""
        import sys, torch
        torch.__version__ = "1.0.0+elsewhere"
        try:
            import torch_dp
        except ImportError as error:
            print(error)
            print("extension loaded:", "torch_dp._C" in sys.modules)
        else:
            print("imported")
    """)
    python_dir = os.path.dirname(os.path.dirname(torch_dp.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [python_dir, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout != "imported\n", "torch_dp imported under another torch"
    message, loaded = result.stdout.strip().splitlines()
    assert message.startswith(
        f"torch_dp was built against torch {torch.__version__}, but torch 1.0.0+elsewhere is installed. Rebuild "
        "torch_dp against the installed torch: `pip install --no-build-isolation --no-deps --force-reinstall .`"
    ), message
    assert loaded == "extension loaded: False"


# ---- equivalence with the unwrapped module -------------------------------------------------------------------


def test_mlp_equals_module(cpu_ids):
    assert_equivalent(MLP().double(), (torch.randn(10, 5, dtype=torch.float64),), {}, cpu_ids)


def test_conv_net_with_batchnorm_in_eval_mode_equals_module(cpu_ids):
    net = conv_net(training=False)
    running_mean = net.bn.running_mean.clone()
    assert_equivalent(net, (torch.randn(10, 3, 4, 4, dtype=torch.float64),), {}, cpu_ids)
    torch.testing.assert_close(net.bn.running_mean, running_mean, rtol=0, atol=0)


def test_kwargs_and_structured_outputs_equal_module(cpu_ids):
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randn(9, 4, dtype=torch.float64)
    dp = assert_equivalent(KwargsNet().double(), (x,), {"y": y, "scale": 0.5, "mode": "mean"}, cpu_ids)
    out = dp(x, y=y)
    assert type(out) is dict and type(out["pair"]) is Pair and out["nothing"] is None
    assert out["hidden"].shape == (9, 4) and out["pair"].first.shape == (9, 1)


def test_dim_one(cpu_ids):
    class Columns(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 1, dtype=torch.float64))

        def forward(self, x):  # x: (features, batch)
            return torch.tanh(x * self.weight)

    reference = Columns()
    net = copy.deepcopy(reference)
    x = torch.randn(4, 7, dtype=torch.float64)
    dp = torch_dp.DataParallel(net, cpu_ids, dim=1)
    assert dp.dim == 1
    out = dp(x)
    torch.testing.assert_close(out, reference(x))
    out.sum().backward()
    reference(x).sum().backward()
    torch.testing.assert_close(net.weight.grad, reference.weight.grad)


def test_gradcheck_through_data_parallel():
    net = MLP().double()
    dp = torch_dp.DataParallel(net, cpus(3))
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dp, (x,))
    assert torch.autograd.gradgradcheck(dp, (x,))


def test_two_forwards_then_one_backward_accumulate_like_the_module():
    net = MLP().double()
    reference = copy.deepcopy(net)
    dp = torch_dp.DataParallel(net, cpus(4))
    a, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    (dp(a).pow(2).sum() + dp(b).sum()).backward()
    (reference(a).pow(2).sum() + reference(b).sum()).backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class WithUnused(nn.Module):
    """A layer forward never calls."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)

    def forward(self, x):
        return self.used(x)


def test_unused_parameters_get_no_gradient_like_the_unwrapped_module(cpu_ids):
    # Every replica shares the module's device (and so its parameters): the unused layer's .grad stays None.
    net = WithUnused().double()
    reference = copy.deepcopy(net)
    dp = torch_dp.DataParallel(net, cpu_ids)
    x = torch.randn(8, 5, dtype=torch.float64)
    dp(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert reference.unused.weight.grad is None and reference.unused.bias.grad is None
    assert net.unused.weight.grad is None and net.unused.bias.grad is None
    torch.testing.assert_close(net.used.weight.grad, reference.used.weight.grad)
    torch.testing.assert_close(net.used.bias.grad, reference.used.bias.grad)


@pytest.mark.parametrize("n", [2, 3])
def test_unused_parameters_of_replicas_that_copy_get_zero_gradients(n):
    # Replicas with copies of the parameters (other devices) reduce-add every copy's gradient onto the module: an
    # unused parameter gets zeros, as torch.nn.DataParallel gives on several GPUs (docs/differences.md).
    net = WithUnused().double()
    reference = copy.deepcopy(net)
    dp = copying(torch_dp.DataParallel(net, cpus(n)))
    x = torch.randn(8, 5, dtype=torch.float64)
    dp(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    torch.testing.assert_close(net.unused.weight.grad, torch.zeros_like(net.unused.weight), rtol=0, atol=0)
    torch.testing.assert_close(net.unused.bias.grad, torch.zeros_like(net.unused.bias), rtol=0, atol=0)
    torch.testing.assert_close(net.used.weight.grad, reference.used.weight.grad)
    torch.testing.assert_close(net.used.bias.grad, reference.used.bias.grad)


def test_changing_batch_sizes():
    net = MLP().double()
    dp = torch_dp.DataParallel(net, cpus(4))
    calls, _ = count_calls(net.fc1)
    for rows, replicas in [(10, 4), (3, 3), (8, 4), (6, 3), (1, 1), (12, 4)]:
        calls.clear()
        x = torch.randn(rows, 5, dtype=torch.float64)
        torch.testing.assert_close(dp(x), net(x))
        assert len(calls) == replicas + 1  # the replicas, then the reference call above


def test_no_grad_and_inference_mode_forwards():
    net = MLP().double()
    reference = copy.deepcopy(net)
    dp = torch_dp.DataParallel(net, cpus(3))
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        out = dp(x)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, reference(x).detach())
    with torch.inference_mode():
        out = dp(x)
    assert out.is_inference()
    torch.testing.assert_close(out, net(x))
    out = dp(x)  # grad mode back on: the next forward is differentiable again
    assert out.requires_grad
    out.sum().backward()
    reference(x).sum().backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_autocast_reaches_the_replicas():
    net = MLP()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dp(x)
        expected = net(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    assert dp(x).dtype == torch.float32


@pytest.mark.cuda
def test_single_cuda_device_equals_module():
    net = MLP().double().cuda()
    x = torch.randn(6, 5, dtype=torch.float64, device="cuda")
    torch.testing.assert_close(torch_dp.DataParallel(copy.deepcopy(net), [0])(x), net(x))


# ---- BatchNorm in training mode ------------------------------------------------------------------------------


def test_batchnorm_train_mode_uses_per_replica_statistics_and_replica_zero_buffers():
    net = conv_net(training=True)
    reference = copy.deepcopy(net)  # updated with chunk 0 only, as PyTorch's replica 0
    dp = torch_dp.DataParallel(net, cpus(4))
    for step in range(2):
        x = torch.randn(10, 3, 4, 4, dtype=torch.float64) + step
        chunks = x.chunk(4)
        expected = torch.cat([copy.deepcopy(reference)(chunk) for chunk in chunks])  # each chunk on its own
        reference(chunks[0])
        torch.testing.assert_close(dp(x), expected)
        torch.testing.assert_close(net.bn.running_mean, reference.bn.running_mean)
        torch.testing.assert_close(net.bn.running_var, reference.bn.running_var)
        assert net.bn.num_batches_tracked.item() == reference.bn.num_batches_tracked.item() == step + 1


def test_batchnorm_train_mode_gradients_equal_per_chunk_module():
    net = conv_net(training=True)
    reference = copy.deepcopy(net)
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    dp_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(8, 2, dtype=torch.float64)
    (torch_dp.DataParallel(net, cpus(3))(dp_x) * weights).sum().backward()
    expected = torch.cat([reference(c) for c in ref_x.chunk(3)])
    (expected * weights).sum().backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(dp_x.grad, ref_x.grad)


# ---- changes to dp.module between forwards -------------------------------------------------------------------


def test_optimizer_step_between_forwards_is_seen():
    net = MLP().double()
    dp = torch_dp.DataParallel(net, cpus(4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        out = dp(x)
        torch.testing.assert_close(out, net(x))
        out.pow(2).sum().backward()
        optimizer.step()
    torch.testing.assert_close(dp(x), net(x))


def test_in_place_buffer_change_is_seen():
    net = conv_net(training=False)
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    before = net(x).detach()
    torch.testing.assert_close(dp(x), before)
    with torch.no_grad():
        net.bn.running_mean.add_(3.0)
    after = dp(x)
    assert not torch.allclose(after, before)  # the edit matters, so the next line can tell stale from fresh
    torch.testing.assert_close(after, net(x))
    net.bn.running_var.data = torch.rand(4, dtype=torch.float64) + 0.5  # swapped storage, same tensor object
    torch.testing.assert_close(dp(x), net(x))


def test_replaced_submodule_is_seen():
    net = Scaled().double()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(dp(x), net(x))
    dp.module.fc = nn.Linear(3, 3).double()
    reference = copy.deepcopy(net)
    out = dp(x)
    torch.testing.assert_close(out, reference(x))
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for p, q in zip(net.fc.parameters(), reference.fc.parameters()):  # gradients reach the new submodule
        torch.testing.assert_close(p.grad, q.grad)


def test_replaced_parameter_is_seen():
    net = Scaled().double()
    dp = torch_dp.DataParallel(net, cpus(3))
    x = torch.randn(6, 3, dtype=torch.float64)
    dp(x)
    net.fc.bias = nn.Parameter(torch.randn(3, dtype=torch.float64))
    torch.testing.assert_close(dp(x), net(x))


def test_changed_plain_attribute_is_seen():
    net = Scaled().double()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(dp(x), net(x))
    net.scale = -2.5
    torch.testing.assert_close(dp(x), net.fc(x) * -2.5)


def test_train_eval_switch_is_seen():
    net = conv_net(training=True)
    dp = torch_dp.DataParallel(net, cpus(2))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    dp(x)
    dp.eval()
    assert not net.training and not net.bn.training
    stats = net.bn.running_mean.clone()
    torch.testing.assert_close(dp(x), net(x))  # eval: running statistics, no update
    torch.testing.assert_close(net.bn.running_mean, stats, rtol=0, atol=0)
    dp.train()
    reference = copy.deepcopy(net)
    expected = torch.cat([copy.deepcopy(reference)(c) for c in x.chunk(2)])
    torch.testing.assert_close(dp(x), expected)  # train: per-replica batch statistics again
    assert not torch.equal(net.bn.running_mean, stats)


def test_forward_hook_registered_between_forwards_fires_once_per_replica():
    net = MLP().double()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(10, 5, dtype=torch.float64)
    dp(x)
    calls, handle = count_calls(net.fc2)
    dp(x)
    assert sorted(calls) == [1, 3, 3, 3]
    dp(x[:2])
    assert sorted(calls[4:]) == [1, 1]
    handle.remove()
    dp(x)
    assert len(calls) == 6


def test_dtype_change_between_forwards_is_seen():
    net = conv_net(training=False).float()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 3, 4, 4)
    assert dp(x).dtype == torch.float32
    dp.module.double()
    out = dp(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, net(x.double()))


# ---- an exception in a replica (more in test_reliability.py; bad input: test_errors.py) ----------------------


class FailsOnMarker(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        if (x > 1000).any():
            raise KeyError("wonderful")
        return self.fc(x)


def test_replica_exception_is_reraised_and_the_next_forward_works():
    net = FailsOnMarker()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 2)
    bad = x.clone()
    bad[3, 0] = 5000.0  # row 3 is in chunk 1
    expected = r"Caught KeyError in replica 1 on device cpu\.\nOriginal Traceback[\s\S]+wonderful"
    with pytest.raises(KeyError, match=expected):
        dp(bad)
    bad[0, 0] = 5000.0  # now replica 0 fails too, and wins
    with pytest.raises(KeyError, match=r"Caught KeyError in replica 0 on device cpu\."):
        dp(bad)
    torch.testing.assert_close(dp(x), net(x))


# ---- special forwards ----------------------------------------------------------------------------------------


def test_zero_argument_forward():
    class NoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))

        def forward(self):
            return self.weight * 2

    net = NoInputs()
    calls = []
    net.register_forward_hook(lambda m, args, out: calls.append(args))
    dp = torch_dp.DataParallel(net, cpus(3))
    out = dp()
    assert calls == [()]  # one replica, no arguments
    torch.testing.assert_close(out, net.weight * 2)
    out.sum().backward()
    torch.testing.assert_close(net.weight.grad, torch.full((3, 2), 2.0, dtype=torch.float64))


def test_batch_smaller_than_the_number_of_replicas():
    net = MLP().double()
    calls, _ = count_calls(net)
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(2, 5, dtype=torch.float64)
    out = dp(x)
    assert calls == [1, 1]  # 2 rows on 4 replicas: 2 replicas
    torch.testing.assert_close(out, net(x))


def test_scalar_outputs_become_a_vector():
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x).pow(2).mean()

    net = Loss().double()
    x = torch.randn(9, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="all input tensors were scalars"):
        out = torch_dp.DataParallel(net, cpus(3))(x)
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.stack([net(c) for c in x.chunk(3)]))


def test_output_device_minus_one_gathers_on_cpu_with_a_warning():
    net = MLP()
    dp = torch_dp.DataParallel(net, cpus(2), output_device=-1)
    assert dp.output_device == -1
    x = torch.randn(4, 5)
    with pytest.warns(FutureWarning, match="Using -1 to represent CPU"):
        out = dp(x)
    assert out.device == torch.device("cpu")
    torch.testing.assert_close(out, net(x))
    with pytest.warns(FutureWarning, match="Using -1 to represent CPU"):
        out = torch_dp.data_parallel(net, x, cpus(2), -1)
    torch.testing.assert_close(out, net(x))


def test_nested_data_parallel():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch_dp.DataParallel(MLP().double(), cpus(2))

        def forward(self, x):
            return self.inner(x) * 2

    net = Outer()
    dp = torch_dp.DataParallel(net, cpus(2))
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(dp(x), net.inner.module(x) * 2)


# ---- resources -----------------------------------------------------------------------------------------------


def test_many_forwards_start_no_new_threads():
    gc.collect()
    threads_before, tasks_before = threading.active_count(), os_threads()
    net = nn.Linear(4, 3)
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 4)
    dp(x)
    python_threads, tasks = threading.active_count(), os_threads()
    assert python_threads == threads_before  # workers are C++ threads, not Python threads
    assert 0 < tasks - tasks_before <= 4
    for _ in range(1000):
        out = dp(x)
    assert threading.active_count() == python_threads
    assert os_threads() == tasks
    torch.testing.assert_close(out, net(x))
    del dp, out
    gc.collect()
    assert os_threads() == tasks_before  # the workers end with their DataParallel


def test_concurrent_forwards_from_two_threads():
    net = MLP().double()
    dp = torch_dp.DataParallel(net, cpus(3))
    inputs = [torch.randn(9, 5, dtype=torch.float64) for _ in range(2)]
    results, errors = [None, None], []

    def work(i):
        try:
            for _ in range(20):
                results[i] = dp(inputs[i])
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    run_in_threads(work, 2)
    assert not errors
    for result, x in zip(results, inputs):
        torch.testing.assert_close(result, net(x))


# ---- copies --------------------------------------------------------------------------------------------------


def test_pickle_and_torch_save_after_a_forward():
    net = conv_net(training=False)
    dp = torch_dp.DataParallel(net, cpus(3))
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    reference = copy.deepcopy(net)
    expected = reference(x)
    reference(x).sum().backward()
    torch.testing.assert_close(dp(x), expected)
    buffer = io.BytesIO()
    torch.save(dp, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(dp))
    for copy_ in (loaded, unpickled):
        assert type(copy_) is torch_dp.DataParallel
        assert copy_.module is not net and copy_.device_ids == dp.device_ids
        torch.testing.assert_close(copy_(x), expected)
        copy_(x).sum().backward()
        for p, q in zip(copy_.module.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        assert net.conv.weight.grad is None  # the copy's gradients are its own
    torch.testing.assert_close(dp(x), expected)  # the original still works


def test_deepcopy():
    net = MLP().double()
    dp = torch_dp.DataParallel(net, cpus(4))
    x = torch.randn(8, 5, dtype=torch.float64)
    expected = net(x).detach()
    torch.testing.assert_close(dp(x), expected)
    clone = copy.deepcopy(dp)
    assert clone.module is not net and clone.module.fc1.weight is not net.fc1.weight
    torch.testing.assert_close(clone(x), expected)
    with torch.no_grad():
        clone.module.fc1.weight.add_(1.0)  # the copy is independent of the original
    torch.testing.assert_close(dp(x), expected)
    torch.testing.assert_close(clone(x), clone.module(x))
    assert not torch.allclose(clone(x), expected)


# ---- functional form -----------------------------------------------------------------------------------------


def test_functional_data_parallel_equals_module():
    net = KwargsNet().double()
    reference = copy.deepcopy(net)
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randn(7, 4, dtype=torch.float64)
    out = torch_dp.data_parallel(net, (x, y), device_ids=cpus(3), module_kwargs={"scale": 3.0})
    expected = reference(x, y, scale=3.0)
    torch.testing.assert_close(out, expected)
    (out["hidden"].sum() + out["pair"].first.sum()).backward()
    (expected["hidden"].sum() + expected["pair"].first.sum()).backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # a lone tensor is the one argument; repeated calls reuse the cached replicas and see weight changes
    mlp = MLP().double()
    z = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(torch_dp.data_parallel(mlp, z, device_ids=cpus(3)), mlp(z))
    with torch.no_grad():
        mlp.fc2.bias.add_(1.0)
    torch.testing.assert_close(torch_dp.data_parallel(mlp, z, device_ids=cpus(3)), mlp(z))


def test_no_warnings_in_a_plain_forward():
    dp = torch_dp.DataParallel(MLP(), cpus(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp(torch.randn(8, 5)).sum().backward()


# ---- chunk_sizes: rows per device instead of the even split -------------------------------------------------


class RowsSeen(nn.Module):
    """Returns, for every row of its chunk, the number of rows the replica received (and a differentiable
    term so gradients flow)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x, scale=None):
        out = self.fc(x) * (scale if scale is not None else 1.0)
        return out, torch.full((x.size(0), 1), float(x.size(0)), dtype=x.dtype)


@pytest.mark.parametrize("sizes", [[1, 5], [5, 1], [6, 0], [2, 0, 4], [2, 1, 3], [1, 1, 1, 3]], ids=str)
def test_chunk_sizes_split_rows_as_given(sizes):
    net = RowsSeen().double()
    reference = copy.deepcopy(net)
    dp = torch_dp.DataParallel(net, cpus(len(sizes)), chunk_sizes=sizes)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(6, 1, dtype=torch.float64)
    out, rows = dp(x, scale=scale)
    # Replica i's rows come i-th in the gathered output, each marked with its chunk's size.
    expected_rows = [float(n) for n in sizes for _ in range(n)]
    assert rows.squeeze(1).tolist() == expected_rows
    assert dp.chunk_sizes == tuple(sizes)
    x_ref = x.detach().clone().requires_grad_()
    out_ref, _ = reference(x_ref, scale=scale)
    torch.testing.assert_close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), p_ref in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


class NoEmptyBatch(nn.Module):
    """Fails on an empty chunk as BERT does (reshaping 0 elements with a -1), and records each call's device
    position (the first column of its rows)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4).double()
        self.calls = []

    def forward(self, x):
        self.calls.append(int(x[0, 0]))
        return self.fc(x.view(x.size(0), -1, 4)).flatten(1)


@pytest.mark.parametrize("sizes", [[3, 0, 2], [2, 3, 0, 0], [5, 0]], ids=str)
def test_chunk_sizes_of_0_run_no_replica(sizes):
    net = NoEmptyBatch()
    reference = copy.deepcopy(net)
    dp = torch_dp.DataParallel(net, cpus(len(sizes)), chunk_sizes=sizes)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(sum(sizes), 4, dtype=torch.float64)
        x[:, 0] = torch.tensor([float(i) for i, n in enumerate(sizes) for _ in range(n)])
        x.requires_grad_()
        out = dp(x)
        x_ref = x.detach().clone().requires_grad_()
        expected = reference(x_ref)
        torch.testing.assert_close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        for p, p_ref in zip(net.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad)
        optimizer.step()
        optimizer_ref.step()
        optimizer.zero_grad()
        optimizer_ref.zero_grad()
    assert sorted(set(net.calls)) == [i for i, n in enumerate(sizes) if n > 0]
    for p, p_ref in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref)


def test_chunk_sizes_of_0_with_one_value_per_replica():
    # Trainer's num_items_in_batch, one equal row per device, beside a batch split by chunk_sizes: each replica
    # that runs gets its device's row.
    seen = []

    class Scaled(nn.Module):
        def forward(self, x, n):
            seen.append((x.shape[0], n.shape[0]))
            return x / n

    dp = torch_dp.DataParallel(Scaled(), cpus(3), chunk_sizes=[3, 0, 1])
    x = torch.randn(4, 2)
    torch.testing.assert_close(dp(x, torch.tensor([[2.0]]).expand(3, -1) / 1), x / 2)
    assert sorted(seen) == [(1, 1), (3, 1)]


def test_chunk_sizes_along_another_dim():
    fc = nn.Linear(5, 3).double()

    class FeaturesFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = fc

        def forward(self, x):  # x: (features, rows) -> (3, rows)
            assert x.size(1) in (3, 1)
            return self.fc(x.t()).t()

    dp = torch_dp.DataParallel(FeaturesFirst(), cpus(2), dim=1, chunk_sizes=[3, 1])
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(dp(x), fc(x.t()).t())


def test_chunk_sizes_keep_pytorch_semantics_elsewhere():
    # Extra keyword only: the positional signature, state_dict keys and pickling are those of the even split.
    net = MLP()
    dp = torch_dp.DataParallel(net, cpus(2), None, 0, chunk_sizes=[3, 1])
    assert list(dp.state_dict()) == list(torch_dp.DataParallel(MLP(), cpus(2)).state_dict())
    restored = pickle.loads(pickle.dumps(dp))
    assert restored.chunk_sizes == (3, 1)
    torch.testing.assert_close(restored(torch.ones(4, 5)), net(torch.ones(4, 5)))
    assert torch_dp.DataParallel(net, cpus(2)).chunk_sizes is None


# ---- issuing (Note [Issuing replicas]) -----------------------------------------------------------------------


class RecordsThread(nn.Module):
    """Records which thread ran each chunk (keyed by the chunk's first value)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.threads = {}

    def forward(self, x):
        self.threads[float(x[0, 0])] = threading.get_ident()
        return self.fc(x)


@pytest.mark.parametrize("issuing, on_caller", [("serial", True), ("threads", False)])
def test_issuing_decides_which_threads_run_the_replicas(issuing, on_caller):
    net = RecordsThread()
    dp = torch_dp.DataParallel(net, cpus(3), issuing=issuing)
    x = torch.arange(3.0).repeat_interleave(5).reshape(3, 5)  # chunk i starts with the value i
    torch.testing.assert_close(dp(x), net.fc(x))
    assert sorted(net.threads) == [0.0, 1.0, 2.0]
    me = threading.get_ident()
    assert net.threads[0.0] == me  # replica 0 always runs on the calling thread
    others = {net.threads[1.0], net.threads[2.0]}
    assert others == {me} if on_caller else (me not in others and len(others) == 2)


def test_issuing_auto_uses_threads_across_devices_and_measures_on_one():
    def resolved(*devices):
        return torch_dp._C.resolve_issuing(torch_dp._C.Issuing.auto, [torch.device(d) for d in devices]).name

    assert resolved("cuda:0", "cuda:1") == "threads"
    assert resolved("cuda:0", "cuda:0", "cuda:1") == "threads"
    assert resolved("cuda:0", "cuda:0") == "auto"  # one device: settled by measuring both ways
    assert resolved("cpu", "cpu", "cpu") == "auto"
    assert torch_dp._C.resolve_issuing(torch_dp._C.Issuing.serial, [torch.device("cpu")] * 2).name == "serial"


def test_issuing_auto_settles_on_one_way_and_keeps_it():
    net = RecordsThread()
    dp = torch_dp.DataParallel(net, cpus(3))
    x = torch.arange(3.0).repeat_interleave(5).reshape(3, 5)
    pool = dp._get_engine().pool
    seen = set()
    for _ in range(51):  # 2 warm-up calls on threads, then blocks of 12 calls each way (Note [Issuing replicas])
        if pool.settled_auto_issuing.name != "auto":
            break
        net.threads.clear()
        torch.testing.assert_close(dp(x), net.fc(x))
        seen.add("serial" if len(set(net.threads.values())) == 1 else "threads")
    assert seen == {"serial", "threads"}  # both ways were tried
    settled = pool.settled_auto_issuing.name
    assert settled in ("serial", "threads")
    for _ in range(5):
        net.threads.clear()
        dp(x)
        assert len(set(net.threads.values())) == (1 if settled == "serial" else 3)


class SleepsPerReplica(nn.Module):
    """Each replica sleeps (without the GIL), so replicas on threads finish their forward sooner than in series."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.threads = set()

    def forward(self, x):
        self.threads.add(threading.get_ident())
        time.sleep(0.002)
        return self.fc(x)


def test_issuing_auto_times_the_whole_step_not_the_forward():
    """Threads run this forward faster, but the rest of the step is slower after it (as a backward can be when
    threads left the device's queue in another state): "auto" must keep the way whose whole step is shorter,
    serial here, which timing the forward alone would not."""
    net = SleepsPerReplica()
    dp = torch_dp.DataParallel(net, cpus(2))
    pool = dp._get_engine().pool
    x = torch.randn(4, 5)
    for _ in range(51):
        if pool.settled_auto_issuing.name != "auto":
            break
        net.threads.clear()
        dp(x)
        if len(net.threads) > 1:  # issued on threads: the rest of this step takes longer
            time.sleep(0.008)
    assert pool.settled_auto_issuing.name == "serial"


@pytest.mark.parametrize("n", [2, 4])
def test_serial_issuing_matches_the_unwrapped_module_over_steps(n):
    torch.manual_seed(0)
    net = conv_net(training=False)  # eval: BatchNorm normalises every chunk as the whole batch
    reference = copy.deepcopy(net)
    dp = torch_dp.DataParallel(net, cpus(n), issuing="serial")
    for _ in range(3):
        x = torch.randn(2 * n + 1, 3, 4, 4, dtype=torch.double, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = dp(x), reference(x_ref)
        torch.testing.assert_close(out, out_ref)
        out.square().sum().backward()
        out_ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        for p, p_ref in zip(net.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad)
            with torch.no_grad():
                p -= 0.1 * p.grad
                p_ref -= 0.1 * p_ref.grad
            p.grad = p_ref.grad = None


def test_serial_issuing_runs_every_replica_and_raises_the_first_failure():
    ran = []

    class FailsOnOddChunks(nn.Module):
        def forward(self, x):
            ran.append(int(x[0]))
            if int(x[0]) % 2:
                raise ValueError(f"chunk {int(x[0])} failed")
            return x

    dp = torch_dp.DataParallel(FailsOnOddChunks(), cpus(4), issuing="serial")
    with pytest.raises(ValueError, match="Caught ValueError in replica 1 on device cpu") as info:
        dp(torch.arange(4.0))
    assert "chunk 1 failed" in str(info.value)
    assert sorted(ran) == [0, 1, 2, 3]  # as with threads: every replica ran before the error surfaced


def test_serial_issuing_keeps_the_callers_grad_mode():
    class TurnsGradOff(nn.Module):
        def forward(self, x):
            torch.set_grad_enabled(False)
            return x * 2

    dp = torch_dp.DataParallel(TurnsGradOff(), cpus(2), issuing="serial")
    dp(torch.ones(4, requires_grad=True))
    assert torch.is_grad_enabled()  # the replica's change did not leak into the caller


def test_issuing_is_kept_by_pickling():
    dp = torch_dp.DataParallel(MLP(), cpus(2), issuing="serial")
    assert pickle.loads(pickle.dumps(dp)).issuing == "serial"
    assert torch_dp.DataParallel(MLP(), cpus(2)).issuing == "auto"
