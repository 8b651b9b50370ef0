"""Bad arguments to torch_dp.DataParallel and torch_dp.data_parallel (docs/errors.md, "Bad input and the errors it
gets"): each mistake gets an error that names the problem and what was expected, raised before any replica runs,
and both forms give the same error, type and text, wherever both raise. The model holds a training-mode
BatchNorm, whose running statistics move in any forward that runs, so "before any replica runs" is checked
bitwise on its buffers as well as on its parameters. The options that only DataParallel takes (chunk_sizes,
issuing) have their bad values here too.

Errors that can only be found in the replicas' outputs (gather's) are in test_gather.py; an exception raised
inside a replica is in test_parallel_apply.py, test_reliability.py and test_data_parallel.py."""

import functools

import pytest
import torch
from torch import nn

import torch_dp
from helpers import MLP, cpus


class BatchNormNet(nn.Module):
    """Takes (and ignores) extra arguments, so that mistakes in them reach DataParallel's checks."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x, *rest, **kwargs):
        return self.out(torch.relu(self.bn(self.fc(x))))


def meta_buffer_net():
    net = MLP()
    net.fc1.register_buffer("scale", torch.empty(5, device="meta"))  # e.g. built under torch.device("meta")
    return net


def batchnorm_net(meta_buffer=False):
    net = BatchNormNet().train()
    if meta_buffer:  # a tensor forward does not read, but which is not on device_ids[0]
        net.fc.register_buffer("scale", torch.empty(5, device="meta"))
    return net


def state_of(module):
    """Copies of every parameter and buffer (num_batches_tracked included)."""
    return {name: t.detach().clone() for name, t in module.state_dict(keep_vars=True).items()}


def assert_bitwise_unchanged(module, before):
    after = state_of(module)
    assert after.keys() == before.keys()
    for name, expected in before.items():
        actual = after[name]
        assert (actual.device, actual.dtype, actual.shape) == (expected.device, expected.dtype, expected.shape), name
        if not expected.is_meta:  # bits, not values: -0.0 == 0.0 and NaN != NaN would hide or invent changes
            assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


def raises_and_leaves_module_unchanged(module, call, error, *fragments):
    """``call()`` raises ``error`` whose message holds every fragment, and ``module``'s state is bitwise unchanged."""
    before = state_of(module)
    with pytest.raises(error) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    assert_bitwise_unchanged(module, before)
    return info.value


def call_class(net, inputs, kwargs, device_ids, output_device, dim):
    torch_dp.DataParallel(net, device_ids, output_device, dim)(*inputs, **kwargs)


def call_functional(net, inputs, kwargs, device_ids, output_device, dim):
    torch_dp.data_parallel(net, inputs, device_ids, output_device, dim, kwargs)


def raise_from_both(net, inputs, kwargs, device_ids, output_device, dim, error):
    """Each form's exception, checking after each that the module's state did not change."""
    return [
        raises_and_leaves_module_unchanged(
            net, functools.partial(call, net, inputs, kwargs, device_ids, output_device, dim), error
        )
        for call in (call_class, call_functional)
    ]


X = (torch.randn(8, 5),)

# id: (machine, inputs, kwargs, device_ids, output_device, dim, error, fragments). The machine is a fixture: no
# accelerator, or two (fake) CUDA devices for the checks that only run with one.
BOTH_RAISE = {
    "device_ids-empty": ("two_fake_gpus", X, {}, [], None, 0, ValueError, ["device_ids is empty", "device_ids=[0]"]),
    "device_ids-int": (
        "two_fake_gpus",
        X,
        {},
        0,
        None,
        0,
        TypeError,
        ["device_ids must be a sequence of devices, but got a single device 0"],
    ),
    "device_ids-str": (
        "no_accelerator",
        X,
        {},
        "cpu",
        None,
        0,
        TypeError,
        ["device_ids must be a sequence of devices, but got a single device 'cpu'"],
    ),
    "device_ids-device": (
        "no_accelerator",
        X,
        {},
        torch.device("cpu"),
        None,
        0,
        TypeError,
        ["must be a sequence of devices, but got a single device device(type='cpu')"],
    ),
    "device_ids-float": (
        "two_fake_gpus",
        X,
        {},
        1.5,
        None,
        0,
        TypeError,
        ["device_ids must be a sequence of devices, but got float: 1.5"],
    ),
    "entry-negative": (
        "no_accelerator",
        X,
        {},
        ["cpu", -1],
        None,
        0,
        ValueError,
        ["invalid device index -1", "must be non-negative", "'cpu'"],
    ),
    "entry-cuda-without-accelerator": (
        "no_accelerator",
        X,
        {},
        ["cpu", "cuda:7"],
        None,
        0,
        ValueError,
        ["device cuda:7 is not available", "expected 'cpu' (no accelerator is available)"],
    ),
    "entry-int-without-accelerator": (
        "no_accelerator",
        X,
        {},
        ["cpu", 7],
        None,
        0,
        ValueError,
        ["device index 7 was given, but no accelerator is available", "device_ids=['cpu', 'cpu']"],
    ),
    "entry-meta": ("no_accelerator", X, {}, ["cpu", "meta"], None, 0, ValueError, ["device meta is not available"]),
    "entry-unknown-name": (
        "no_accelerator",
        X,
        {},
        ["cpu", "nonsense"],
        None,
        0,
        ValueError,
        ["invalid device 'nonsense'", "Expected one of cpu, cuda"],
    ),
    "entry-float": (
        "no_accelerator",
        X,
        {},
        ["cpu", 1.5],
        None,
        0,
        TypeError,
        ["a device must be an int index, a string", "got float: 1.5"],
    ),
    "entry-none": ("no_accelerator", X, {}, ["cpu", None], None, 0, TypeError, ["got NoneType: None"]),
    "entry-beyond-count-int": (
        "two_fake_gpus",
        X,
        {},
        [0, 7],
        None,
        0,
        ValueError,
        ["device cuda:7 does not exist: this machine has 2 cuda device(s), indices 0 to 1"],
    ),
    "entry-beyond-count-str": ("two_fake_gpus", X, {}, ["cuda:0", "cuda:2"], None, 0, ValueError, ["cuda:2 does not"]),
    "entry-beyond-count-device": (
        "two_fake_gpus",
        X,
        {},
        [0, torch.device("cuda", 5)],
        None,
        0,
        ValueError,
        ["device cuda:5 does not exist"],
    ),
    # The replicas could run with these (the device list is fine), so only an early check leaves the state alone.
    "output-cuda-without-accelerator": (
        "no_accelerator",
        X,
        {},
        cpus(2),
        "cuda:7",
        0,
        ValueError,
        ["device cuda:7 is not available", "'cpu'"],
    ),
    "output-int-without-accelerator": (
        "no_accelerator",
        X,
        {},
        cpus(2),
        3,
        0,
        ValueError,
        ["device index 3 was given, but no accelerator"],
    ),
    "output-meta": ("no_accelerator", X, {}, cpus(2), "meta", 0, ValueError, ["device meta is not available"]),
    "output-unknown-name": ("no_accelerator", X, {}, cpus(2), "nonsense", 0, ValueError, ["invalid device 'nonsense'"]),
    "output-float": ("no_accelerator", X, {}, cpus(2), 1.5, 0, TypeError, ["a device must be", "got float: 1.5"]),
    "output-beyond-count": (
        "two_fake_gpus",
        X,
        {},
        cpus(2),
        2,
        0,
        ValueError,
        ["device cuda:2 does not exist", "indices 0 to 1"],
    ),
    "dim-float": ("no_accelerator", X, {}, cpus(2), None, 0.5, TypeError, ["dim must be an int, but got float: 0.5"]),
    "dim-bool": ("no_accelerator", X, {}, cpus(2), None, True, TypeError, ["dim must be an int, but got bool: True"]),
    "dim-too-large": (
        "no_accelerator",
        X,
        {},
        cpus(2),
        None,
        5,
        IndexError,
        ["Dimension out of range (expected to be in range of [-2, 1], but got 5)"],
    ),
    "dim-too-negative": ("no_accelerator", X, {}, cpus(2), None, -3, IndexError, ["[-2, 1], but got -3"]),
    # Found by scatter, before the replicas run (test_scatter.py has more of them).
    "input-0-dim": (
        "no_accelerator",
        X + (torch.tensor(3.0),),
        {},
        cpus(2),
        None,
        0,
        RuntimeError,
        ["cannot split a 0-dim (scalar) tensor along dim 0"],
    ),
    "input-chunk-counts": (
        "no_accelerator",
        X,
        {"mask": [torch.randn(3, 5)]},
        cpus(4),
        None,
        0,
        ValueError,
        ["args[0]: 8 along dim 0 -> 4 chunks", "kwargs['mask'][0]: 3 along dim 0 -> 3 chunks"],
    ),
}


@pytest.mark.parametrize("case", BOTH_RAISE.values(), ids=BOTH_RAISE.keys())
def test_bad_input_same_error_from_class_and_functional_before_any_replica_runs(request, case):
    machine, inputs, kwargs, device_ids, output_device, dim, error, fragments = case
    request.getfixturevalue(machine)
    from_class, from_functional = raise_from_both(
        batchnorm_net(), inputs, kwargs, device_ids, output_device, dim, error
    )
    assert type(from_class) is type(from_functional)
    assert str(from_class) == str(from_functional)
    for fragment in fragments:
        assert fragment in str(from_class), f"{fragment!r} not in {str(from_class)!r}"


@pytest.mark.parametrize("replicas", [2, 4])
def test_bad_input_module_not_on_device_ids0_same_error_before_any_replica_runs(replicas):
    # forward does not read the meta buffer: the device check, made before anything runs, finds it.
    net = batchnorm_net(meta_buffer=True)
    from_class, from_functional = raise_from_both(net, X, {}, cpus(replicas), None, 0, RuntimeError)
    assert (
        str(from_class)
        == str(from_functional)
        == (
            "module must have its parameters and buffers on device cpu (device_ids[0]) but found one of them on "
            "device: meta"
        )
    )


@pytest.mark.parametrize("replicas", [2, 4])
def test_bad_input_module_not_on_device_ids0(replicas):
    # As the test above, on another module; and once the tensor is fixed, the same DataParallel works.
    net = meta_buffer_net()
    dp = torch_dp.DataParallel(net, cpus(replicas))
    expected = (
        "module must have its parameters and buffers on device cpu (device_ids[0]) "
        "but found one of them on device: meta"
    )
    raises_and_leaves_module_unchanged(net, lambda: dp(torch.randn(4, 5)), RuntimeError, expected)
    raises_and_leaves_module_unchanged(
        net, lambda: torch_dp.data_parallel(net, torch.randn(4, 5), cpus(replicas)), RuntimeError, expected
    )
    net.fc1.scale = torch.ones(5)  # fixed: the same DataParallel works
    x = torch.randn(4, 5)
    torch.testing.assert_close(dp(x), net(x))


def test_parameter_on_another_device_raises():
    net = nn.Linear(3, 2)
    net.bias = nn.Parameter(torch.empty(2, device="meta"))
    dp = torch_dp.DataParallel(net, cpus(2))
    message = (
        "module must have its parameters and buffers on device cpu (device_ids[0]) but found one of them on "
        "device: meta"
    )
    with pytest.raises(RuntimeError) as info:
        dp(torch.randn(4, 3))
    assert message in str(info.value)
    net.bias = nn.Parameter(torch.randn(2))  # fixed: works again
    x = torch.randn(4, 3)
    torch.testing.assert_close(dp(x), net(x))


def test_bad_input_module_on_meta_with_one_device():
    # With one device, DataParallel moves the module there (as upstream); a meta tensor cannot be moved, and
    # module.to would fail half-way. The error comes first and names the tensor.
    net = meta_buffer_net()
    raises_and_leaves_module_unchanged(
        net,
        lambda: torch_dp.DataParallel(net, cpus(1)),
        RuntimeError,
        "on device cpu (device_ids[0])",
        "buffer 'fc1.scale' is on device meta",
        "to_empty",
    )


# Without an accelerator the class calls the module directly unless device_ids names "cpu", as
# torch.nn.DataParallel ignores device_ids there; data_parallel has nothing to fall back on and raises.
FUNCTIONAL_ONLY = {
    "none": (None, RuntimeError, "device type could not be determined"),
    "empty": ([], ValueError, "device_ids is empty: give at least one device, e.g. device_ids=[0] or ['cpu']"),
    "int": (0, TypeError, "device_ids must be a sequence of devices, but got a single device 0"),
    "str": ("cuda", TypeError, "device_ids must be a sequence of devices, but got a single device 'cuda'"),
    "indices": ([0, 1], ValueError, "device index 0 was given, but no accelerator is available"),
    "negative": ([-1], ValueError, "invalid device index -1: device indices must be non-negative"),
    "float": ([1.5], TypeError, "a device must be an int index, a string such as 'cuda:0' or 'cpu', or a torch"),
}


@pytest.mark.parametrize("case", FUNCTIONAL_ONLY.values(), ids=FUNCTIONAL_ONLY.keys())
def test_bad_input_without_an_accelerator_functional_raises_where_the_class_calls_the_module(no_accelerator, case):
    device_ids, error, message = case
    net = batchnorm_net()
    before = state_of(net)
    with pytest.raises(error) as info:
        torch_dp.data_parallel(net, X, device_ids)
    assert message in str(info.value), f"{message!r} not in {str(info.value)!r}"
    assert_bitwise_unchanged(net, before)
    assert torch_dp.DataParallel(net, device_ids).device_ids == []  # the pass-through


def test_bad_input_without_an_accelerator_device_ids_are_ignored_as_upstream(no_accelerator):
    # torch.nn.DataParallel ignores device_ids on a machine without an accelerator and calls the module
    # directly, so device_ids=[0, 1] (or list(range(torch.cuda.device_count())) == []) runs unchanged on a
    # laptop; torch_dp keeps that. Only lists naming "cpu" select torch_dp's CPU replicas.
    for device_ids in ([], [0, 1], [-1], ["cuda:7"]):
        net = MLP()
        dp = torch_dp.DataParallel(net, device_ids)
        assert dp.device_ids == []
        x = torch.randn(4, 5)
        torch.testing.assert_close(dp(x), net(x))


@pytest.mark.cuda
def test_empty_device_ids_with_an_accelerator():
    with pytest.raises(ValueError, match="empty"):
        torch_dp.DataParallel(MLP(), [])


def test_different_batch_sizes_in_arguments_raise():
    # Found by scatter, before forward would see (and ignore) y.
    dp = torch_dp.DataParallel(batchnorm_net(), cpus(4))
    with pytest.raises(ValueError, match=r"args\[0\]: 8 .*kwargs\['y'\]: 2 "):
        dp(torch.randn(8, 5), y=torch.randn(2, 5))


def test_bad_input_module_kwargs_not_a_dict():
    net = batchnorm_net()
    before = state_of(net)
    with pytest.raises(TypeError) as info:
        torch_dp.data_parallel(net, X, cpus(2), module_kwargs=[torch.randn(8, 5)])
    assert str(info.value).startswith("module_kwargs must be a dict of keyword arguments, but got list: [tensor(")
    assert_bitwise_unchanged(net, before)


def test_bad_input_scatter_and_gather_arguments():
    # The functional steps check their arguments as data_parallel does, with the argument's own name.
    x = torch.randn(4, 2)
    for call in (
        lambda: torch_dp.scatter(x, cpus(2), dim=0.5),
        lambda: torch_dp.scatter_kwargs((x,), {}, cpus(2), dim=0.5),
        lambda: torch_dp.gather([x, x], "cpu", dim=0.5),
    ):
        with pytest.raises(TypeError, match=r"^dim must be an int, but got float: 0\.5$"):
            call()
    with pytest.raises(TypeError, match=r"^kwargs must be a dict of keyword arguments, but got list: \[1\]$"):
        torch_dp.scatter_kwargs((x,), [1], cpus(2))
    with pytest.raises(TypeError, match=r"^target_gpus must be a sequence of devices, but got a single device 'cpu'$"):
        torch_dp.scatter(x, "cpu")


# ---- chunk_sizes: at construction, and a batch they do not fit -----------------------------------------------


def test_bad_input_chunk_sizes_do_not_fit_the_batch():
    net = MLP()
    dp = torch_dp.DataParallel(net, cpus(2), chunk_sizes=[3, 1])
    raises_and_leaves_module_unchanged(
        net,
        lambda: dp(torch.randn(5, 5)),
        ValueError,
        "chunk_sizes=[3, 1], which split exactly 4 rows along dim 0",
        "args[0] has 5 along dim 0",
        "drop_last=True",
    )
    raises_and_leaves_module_unchanged(
        net, lambda: dp(torch.randn(4, 5), mask=torch.ones(3)), ValueError, "kwargs['mask'] has 3 along dim 0"
    )
    x = torch.randn(4, 5)  # a fitting batch still works
    torch.testing.assert_close(dp(x), net(x))


@pytest.mark.parametrize(
    "sizes, error, fragments",
    [
        ([4], ValueError, ["one size per device: 2 devices, but got 1 sizes [4]"]),
        ([3, -1], ValueError, ["non-negative and not all 0, but got [3, -1]"]),
        ([0, 0], ValueError, ["non-negative and not all 0"]),
        ([0, 4], ValueError, ["chunk_sizes[0] must not be 0, but got [0, 4]", "the module itself", "at least one row"]),
        ([2.0, 2], TypeError, ["must hold ints", "[2.0, 2]"]),
        ([True, 3], TypeError, ["must hold ints"]),
        (4, TypeError, ["sequence of ints, one per device, but got 4"]),
        ("22", TypeError, ["sequence of ints"]),
    ],
    ids=["count", "negative", "all-zero", "first-zero", "float", "bool", "int", "str"],
)
def test_bad_input_chunk_sizes(sizes, error, fragments):
    net = MLP()
    raises_and_leaves_module_unchanged(
        net, lambda: torch_dp.DataParallel(net, cpus(2), chunk_sizes=sizes), error, *fragments
    )


# ---- issuing: an unknown way, and serial issuing with SyncBatchNorm ------------------------------------------


def test_bad_input_issuing():
    net = MLP()
    raises_and_leaves_module_unchanged(
        net,
        lambda: torch_dp.DataParallel(net, cpus(2), issuing="fast"),
        ValueError,
        "issuing must be one of 'auto', 'threads', 'serial', but got 'fast'",
    )
    raises_and_leaves_module_unchanged(
        net, lambda: torch_dp.DataParallel(net, cpus(2), issuing=None), ValueError, "but got None"
    )


def test_serial_issuing_refuses_sync_batchnorm_and_auto_uses_threads():
    net = torch_dp.convert_sync_batchnorm(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    x = torch.randn(8, 5)
    dp = torch_dp.DataParallel(net, cpus(2), issuing="serial")
    raises_and_leaves_module_unchanged(
        net,
        lambda: dp(x),
        RuntimeError,
        "issuing='serial' runs replicas one after another",
        "SyncBatchNorm layers",
        "use issuing='auto' or 'threads'",
    )
    out = torch_dp.DataParallel(net, cpus(2), issuing="auto")(x)  # would hang if the replicas ran serially
    # and the replicas met: BatchNorm over the whole batch, not per chunk
    torch.testing.assert_close(
        out, nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, training=True)
    )
