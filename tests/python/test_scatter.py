"""torch_dp.scatter / torch_dp.scatter_kwargs: torch.chunk sizes, nested structures, views, errors, gradients."""

import collections

import pytest
import torch

import torch_dp
from helpers import cpus

Pair = collections.namedtuple("Pair", ["tensor", "label"])


# ---- chunk sizes ---------------------------------------------------------------------------------------------

CHUNK_TABLE = [
    (30, 2, [15, 15]),
    (30, 3, [10, 10, 10]),
    (30, 4, [8, 8, 8, 6]),
    (30, 8, [4, 4, 4, 4, 4, 4, 4, 2]),  # seven of 4 and one of 2: torch.chunk, not an even split
    (10, 4, [3, 3, 3, 1]),
    (10, 8, [2, 2, 2, 2, 2]),  # five of 2: only five replicas
    (6, 4, [2, 2, 2]),  # three chunks of 2: the fourth device idles
    (5, 4, [2, 2, 1]),
    (2, 4, [1, 1]),
    (1, 4, [1]),
]


@pytest.mark.parametrize("rows,devices,sizes", CHUNK_TABLE, ids=[f"{r}on{d}" for r, d, _ in CHUNK_TABLE])
def test_chunk_table(rows, devices, sizes):
    x = torch.randn(rows, 3)
    chunks = torch_dp.scatter(x, cpus(devices))
    assert isinstance(chunks, tuple)
    assert [c.shape[0] for c in chunks] == sizes
    assert all(c.shape[1:] == x.shape[1:] for c in chunks)
    torch.testing.assert_close(torch.cat(chunks), x, rtol=0, atol=0)
    # scatter_kwargs gives one (args, kwargs) pair per chunk
    args, kwargs = torch_dp.scatter_kwargs((x,), {}, cpus(devices))
    assert [a[0].shape[0] for a in args] == sizes
    assert kwargs == tuple({} for _ in sizes)


def test_chunk_sizes_follow_torch_chunk():
    for rows in range(0, 18):
        for devices in range(1, 9):
            x = torch.randn(rows, 2)
            expected = [c.shape[0] for c in torch.chunk(x, devices)]
            assert [c.shape[0] for c in torch_dp.scatter(x, cpus(devices))] == expected, (rows, devices)


@pytest.mark.parametrize("dim", [2, -1])
def test_scatter_along_other_dim(dim):
    x = torch.randn(3, 10, 2).transpose(1, 2)  # non-contiguous, split along the last dim
    chunks = torch_dp.scatter(x, cpus(4), dim=dim)
    assert [c.shape[-1] for c in chunks] == [3, 3, 3, 1]
    torch.testing.assert_close(torch.cat(chunks, dim=-1), x, rtol=0, atol=0)


def test_non_contiguous_input():
    x = torch.randn(5, 12).t()
    chunks = torch_dp.scatter(x, cpus(3))
    assert [c.shape[0] for c in chunks] == [4, 4, 4]
    torch.testing.assert_close(torch.cat(chunks), x, rtol=0, atol=0)


# ---- views ---------------------------------------------------------------------------------------------------


def test_chunks_on_the_same_device_are_views():
    x = torch.randn(30, 3, dtype=torch.float64)
    chunks = torch_dp.scatter(x, cpus(4))
    offset = 0
    for chunk in chunks:
        assert chunk.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        assert chunk.data_ptr() == x.data_ptr() + offset * x.stride(0) * x.element_size()
        offset += chunk.shape[0]
    # writing through a chunk writes the input
    chunks[2][0, 0] = 1234.5
    assert x[16, 0].item() == 1234.5


def test_one_chunk_where_the_input_is_is_the_input():
    """Note [One chunk where the input is]: a one-device DataParallel hands its module the input itself, as a
    direct call does."""
    x = torch.randn(6, 2, requires_grad=True)
    assert torch_dp.scatter(x, cpus(1))[0] is x
    assert torch_dp._C.scatter(x, [torch.device("cpu")], [6], 0)[0] is x
    seen = []

    class Record(torch.nn.Module):
        def forward(self, t):
            seen.append(t)
            return t * 2

    torch_dp.DataParallel(Record(), ["cpu"])(x).sum().backward()
    assert seen[0] is x
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_kwargs_chunks_are_views_too():
    x = torch.randn(8, 2)
    _, kwargs = torch_dp.scatter_kwargs((), {"x": x}, cpus(4))
    assert [kw["x"].data_ptr() - x.data_ptr() for kw in kwargs] == [i * 2 * 2 * x.element_size() for i in range(4)]


# ---- nested structures ---------------------------------------------------------------------------------------


def test_nested_args_keep_types_and_pass_leaves_by_identity():
    x = torch.randn(8, 3)
    y = torch.randn(8)
    marker = object()
    text = "unchanged"
    inputs = (x, [y, text], {"tensor": x, "object": marker, "number": 7}, Pair(y, "label"), None)
    replicas = torch_dp.scatter(inputs, cpus(4))
    assert isinstance(replicas, list) and len(replicas) == 4
    for i, replica in enumerate(replicas):
        rows = slice(2 * i, 2 * i + 2)
        assert type(replica) is tuple and len(replica) == 5
        torch.testing.assert_close(replica[0], x[rows], rtol=0, atol=0)
        assert type(replica[1]) is list
        torch.testing.assert_close(replica[1][0], y[rows], rtol=0, atol=0)
        assert replica[1][1] is text
        assert type(replica[2]) is dict and list(replica[2]) == ["tensor", "object", "number"]
        torch.testing.assert_close(replica[2]["tensor"], x[rows], rtol=0, atol=0)
        assert replica[2]["object"] is marker
        assert replica[2]["number"] == 7
        assert type(replica[3]) is Pair
        torch.testing.assert_close(replica[3].tensor, y[rows], rtol=0, atol=0)
        assert replica[3].label == "label"
        assert replica[4] is None


def test_ordered_dict_keeps_its_type():
    x = torch.randn(4, 2)
    replicas = torch_dp.scatter(collections.OrderedDict([("b", x), ("a", 1)]), cpus(2))
    assert [type(r) for r in replicas] == [collections.OrderedDict] * 2
    assert [list(r) for r in replicas] == [["b", "a"]] * 2


def test_structure_without_tensors_goes_to_every_device():
    marker = [1, 2]
    replicas = torch_dp.scatter(marker, cpus(3))
    assert len(replicas) == 3 and all(r is marker for r in replicas)
    args, kwargs = torch_dp.scatter_kwargs((marker,), {"flag": True}, cpus(3))
    assert len(args) == 3 and all(a[0] is marker for a in args)
    assert kwargs == ({"flag": True},) * 3


def test_no_arguments_give_no_replicas():
    assert torch_dp.scatter_kwargs((), {}, cpus(4)) == ((), ())
    assert torch_dp.scatter_kwargs((), None, cpus(4)) == ((), ())


def test_scatter_kwargs_splits_args_and_kwargs():
    x = torch.randn(10, 3)
    mask = torch.randn(10) > 0
    marker = object()
    args, kwargs = torch_dp.scatter_kwargs((x, "mode"), {"mask": mask, "extra": marker}, cpus(4))
    assert isinstance(args, tuple) and isinstance(kwargs, tuple)
    assert len(args) == len(kwargs) == 4
    bounds = [(0, 3), (3, 6), (6, 9), (9, 10)]
    for (lo, hi), a, kw in zip(bounds, args, kwargs):
        assert type(a) is tuple and len(a) == 2
        torch.testing.assert_close(a[0], x[lo:hi], rtol=0, atol=0)
        assert a[1] == "mode"
        assert set(kw) == {"mask", "extra"}
        assert torch.equal(kw["mask"], mask[lo:hi])
        assert kw["extra"] is marker


def test_kwargs_only():
    x = torch.randn(6, 2)
    args, kwargs = torch_dp.scatter_kwargs((), {"x": x}, cpus(4))
    assert args == ((), (), ())
    assert [kw["x"].shape[0] for kw in kwargs] == [2, 2, 2]


# ---- errors --------------------------------------------------------------------------------------------------


def test_different_chunk_counts_raise_naming_both_tensors():
    with pytest.raises(ValueError) as info:
        torch_dp.scatter_kwargs((torch.randn(30, 3),), {"y": torch.randn(6)}, cpus(4))
    message = str(info.value)
    assert "args[0]: 30 along dim 0 -> 4 chunks" in message
    assert "kwargs['y']: 6 along dim 0 -> 3 chunks" in message


def test_different_chunk_counts_in_positional_args_raise():
    with pytest.raises(ValueError, match=r"args\[0\]: 8 .* -> 4 chunks; args\[1\]: 2 .* -> 2 chunks"):
        torch_dp.scatter_kwargs((torch.randn(8, 3), torch.randn(2, 3)), {}, cpus(4))
    with pytest.raises(ValueError, match=r"\[0\]: 8 along dim 0 -> 4 chunks; \[1\]\['a'\]: 2 along dim 0"):
        torch_dp.scatter((torch.randn(8), {"a": torch.randn(2)}), cpus(4))


def test_different_sizes_with_equal_chunk_counts_are_fine():
    args, _ = torch_dp.scatter_kwargs((torch.randn(8, 1), torch.randn(7, 1)), {}, cpus(4))
    assert [(a[0].shape[0], a[1].shape[0]) for a in args] == [(2, 2), (2, 2), (2, 2), (2, 1)]


# Note [Which tensors set the batch]: a tensor that holds one value per replica may give more chunks than the batch
# and is cut to the replicas that run, as upstream; rows of any other tensor are never dropped.


@pytest.mark.parametrize(
    "rows, devices, per_replica",
    [
        (1, 2, lambda n: torch.tensor(7.0).unsqueeze(0).expand(n, -1)),  # expanded: stride 0
        (9, 4, lambda n: torch.tensor(7.0).unsqueeze(0).expand(n, -1) / 1),  # Trainer's num_items_in_batch: dense
        (3, 4, lambda n: torch.full((n, 2), 3.0)),
        (2, 4, lambda n: torch.randn(1, 2).expand(6, 2)),  # stride 0, not one row per device
        (1, 3, lambda n: torch.empty(0, 2)),  # no rows at all
    ],
    ids=["expanded-1on2", "equal-rows-9on4", "equal-rows-3on4", "expanded-6-rows", "empty"],
)
def test_tensors_holding_one_value_per_replica_are_cut_to_the_batch(rows, devices, per_replica):
    x = torch.randn(rows, 3)
    value = per_replica(devices)
    args, kwargs = torch_dp.scatter_kwargs((x,), {"num_items_in_batch": value}, cpus(devices))
    batch = [len(c) for c in x.chunk(devices)]
    assert [a[0].shape[0] for a in args] == batch
    cut = torch_dp.scatter(value, cpus(devices))[: len(batch)]  # upstream: the first chunks, one per replica
    assert len(kwargs) == len(batch)
    for kw, expected in zip(kwargs, cut):
        assert torch.equal(kw["num_items_in_batch"], expected)
    # Positional too, in either order, and through DataParallel's forward.
    args, _ = torch_dp.scatter_kwargs((value, x), {}, cpus(devices))
    assert [a[1].shape[0] for a in args] == batch
    net = Recorder()
    torch_dp.DataParallel(net, cpus(devices))(x[:, :2], scale=value)
    assert sorted(net.calls, reverse=True) == batch


def test_tensors_with_distinct_rows_are_never_cut():
    with pytest.raises(
        ValueError,
        match=r"args\[0\]: 1 along dim 0 -> 1 chunks; kwargs\['n'\]: 2 along dim 0 -> 2 "
        r"chunks\. Give all tensor arguments the same size.*one value per replica",
    ):
        torch_dp.scatter_kwargs((torch.randn(1, 3),), {"n": torch.tensor([[1.0], [2.0]])}, cpus(2))
    # Equal rows, but not one per device (4 rows on 2 devices): a batch of its own.
    with pytest.raises(ValueError, match="different numbers of chunks"):
        torch_dp.scatter_kwargs((torch.randn(1, 3),), {"n": torch.ones(4, 1)}, cpus(2))
    # An expanded tensor with fewer chunks than the batch: the batch's rows would be lost.
    with pytest.raises(ValueError, match=r"args\[0\]: 8 along dim 0 -> 4 chunks; args\[1\]: 2 along dim 0 -> 2"):
        torch_dp.scatter_kwargs((torch.randn(8, 3), torch.ones(1).expand(2)), {}, cpus(4))


def test_zero_dim_tensor_raises():
    with pytest.raises(RuntimeError, match="0-dim"):
        torch_dp.scatter(torch.tensor(1.0), cpus(2))
    with pytest.raises(RuntimeError, match="0-dim"):
        torch_dp.scatter_kwargs((torch.randn(4, 2),), {"scale": torch.tensor(2.0)}, cpus(2))


def test_no_devices_raise():
    with pytest.raises(RuntimeError, match="at least one device"):
        torch_dp.scatter(torch.randn(4), [])


@pytest.mark.parametrize(
    "devices,error",
    [(["cpu", -1], ValueError), (["cpu", 1.5], TypeError), ("cpu", TypeError), (["nonsense"], ValueError)],
    ids=["negative", "float", "single-string", "unknown-name"],
)
def test_invalid_devices_raise(devices, error):
    with pytest.raises(error):
        torch_dp.scatter(torch.randn(4, 2), devices)
    with pytest.raises(error):
        torch_dp.scatter_kwargs((torch.randn(4, 2),), {}, devices)


# ---- autograd ------------------------------------------------------------------------------------------------


def test_chunks_carry_autograd_history():
    x = torch.randn(6, 2, requires_grad=True)
    chunks = torch_dp.scatter(x, cpus(3))
    assert all(c.requires_grad and c.grad_fn is not None for c in chunks)
    weights = [1.0, 10.0, 100.0]
    sum(w * c.sum() for w, c in zip(weights, chunks)).backward()
    expected = torch.tensor([1.0, 1.0, 10.0, 10.0, 100.0, 100.0]).unsqueeze(1).expand(6, 2)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("devices", [1, 3, 4, 8])
def test_gradcheck_scatter(devices):
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch_dp.scatter(t, cpus(devices)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch_dp.scatter(t, cpus(devices)), (x,))


def test_gradcheck_scatter_kwargs_nested():
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def fn(a, b):
        args, kwargs = torch_dp.scatter_kwargs(([a, "tag"],), {"b": {"inner": b}}, cpus(3), dim=0)
        return tuple(arg[0][0] * (i + 1) for i, arg in enumerate(args)) + tuple(kw["b"]["inner"] for kw in kwargs)

    assert torch.autograd.gradcheck(fn, (x, y))


# ---- bad input: each gets an error naming the problem and the expected value, and leaves the module as it was --
# (the table "Bad input and the errors it gets" in docs/errors.md)


class Recorder(torch.nn.Module):
    """Records each call's batch size; takes any positional and keyword tensors."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)
        self.calls = []

    def forward(self, x, *rest, **kwargs):
        self.calls.append(x.shape[0])
        return self.fc(x)


def assert_raises_before_any_replica_ran(call, error, *fragments):
    net = Recorder()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dp = torch_dp.DataParallel(net, cpus(4))
    with pytest.raises(error) as info:
        call(dp)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    assert net.calls == []
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(8, 2)  # and the next forward works
    torch.testing.assert_close(dp(x), net.fc(x))


def test_bad_input_zero_dim_tensor():
    expected = ["cannot split a 0-dim (scalar) tensor along dim 0", "pass tensors with at least one dimension"]
    assert_raises_before_any_replica_ran(lambda dp: dp(torch.tensor(3.0)), RuntimeError, *expected)
    assert_raises_before_any_replica_ran(lambda dp: dp(torch.randn(8, 2), torch.tensor(3.0)), RuntimeError, *expected)
    assert_raises_before_any_replica_ran(
        lambda dp: dp(torch.randn(8, 2), scale={"s": torch.tensor(3.0)}), RuntimeError, *expected
    )


def test_bad_input_sizes_giving_different_chunk_counts():
    # nn.DataParallel silently drops the chunks beyond the smallest count (here 4 rows of x, half the batch).
    assert_raises_before_any_replica_ran(
        lambda dp: dp(torch.randn(8, 2), torch.randn(2, 2)),
        ValueError,
        "different numbers of chunks over 4 devices",
        "args[0]: 8 along dim 0 -> 4 chunks",
        "args[1]: 2 along dim 0 -> 2 chunks",
        "Give all tensor arguments the same size along dim 0",
    )
    assert_raises_before_any_replica_ran(
        lambda dp: dp(torch.randn(8, 2), mask=[torch.randn(3, 2)]),
        ValueError,
        "args[0]: 8 along dim 0 -> 4 chunks",
        "kwargs['mask'][0]: 3 along dim 0 -> 3 chunks",
    )


def test_bad_input_sizes_with_the_same_chunk_count_are_split_like_torch_chunk():
    # Different sizes that give the same number of chunks are not an error (as upstream): each is chunked.
    net = Recorder()
    torch_dp.DataParallel(net, cpus(4))(torch.randn(8, 2), torch.randn(7, 2))
    assert sorted(net.calls) == [2, 2, 2, 2]


@pytest.mark.parametrize(
    "sizes,fragments",
    [
        ([3, 4], ["the chunk sizes add up to 7 but the tensor has 8 elements along dim 0", "sizes [3, 4]"]),
        ([5, 5], ["the chunk sizes add up to 10 but the tensor has 8 elements along dim 0"]),
        ([8], ["expected one chunk size per device, but got 1 chunk sizes for 2 devices"]),
        ([2, 2, 4], ["expected one chunk size per device, but got 3 chunk sizes for 2 devices"]),
        ([10, -2], ["chunk sizes must be non-negative, but chunk 1 has size -2"]),
    ],
    ids=["short", "long", "too-few", "too-many", "negative"],
)
def test_bad_input_chunk_sizes_that_do_not_add_up(sizes, fragments):
    x = torch.randn(8, 3, requires_grad=True)
    before = x.detach().clone()
    with pytest.raises(RuntimeError) as info:
        torch_dp._C.scatter(x, [torch.device("cpu")] * 2, sizes, 0)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    assert torch.equal(x.detach(), before) and x.grad is None


def test_chunk_sizes_that_add_up_are_used_as_given():
    x = torch.randn(8, 3)
    chunks = torch_dp._C.scatter(x, [torch.device("cpu")] * 3, [5, 0, 3], 0)
    assert [c.shape[0] for c in chunks] == [5, 0, 3]
    torch.testing.assert_close(torch.cat(chunks), x, rtol=0, atol=0)
