"""torch_dp.gather: concatenation, nested outputs, None and scalar leaves, output devices, errors, gradients."""

import collections
import copy
import warnings

import pytest
import torch

import torch_dp
from reference import ChunkedReference

Output = collections.namedtuple("Output", ["logits", "aux"])


def test_tensors_are_concatenated():
    parts = [torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 4)]
    out = torch_dp.gather(parts, "cpu")
    assert out.shape == (8, 4)
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)
    # a new tensor, not a view of one of the parts
    assert all(out.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for p in parts)


@pytest.mark.parametrize("dim", [1, -1])
def test_gather_along_other_dim(dim):
    parts = [torch.randn(3, 2), torch.randn(3, 5)]
    out = torch_dp.gather(parts, "cpu", dim=dim)
    torch.testing.assert_close(out, torch.cat(parts, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("target", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_cpu_targets(target):
    parts = [torch.randn(2, 3), torch.randn(1, 3)]
    out = torch_dp.gather(parts, target)
    assert out.device == torch.device("cpu")
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="without an accelerator, None means the CPU")
def test_none_target_is_the_cpu_without_accelerator():
    out = torch_dp.gather([torch.randn(2, 3), torch.randn(2, 3)], None)
    assert out.device == torch.device("cpu")


def test_minus_one_means_cpu_with_a_future_warning():
    parts = [torch.randn(2, 3), torch.randn(2, 3)]
    with pytest.warns(FutureWarning, match="Using -1 to represent CPU tensor is deprecated"):
        out = torch_dp.gather(parts, -1)
    assert out.device == torch.device("cpu")
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)


def test_channels_last_is_preserved():
    parts = [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last) for _ in range(3)]
    out = torch_dp.gather(parts, "cpu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)


# ---- nested outputs ------------------------------------------------------------------------------------------


def test_nested_outputs_keep_their_types():
    def replica_output(rows):
        t = torch.randn(rows, 2)
        return {
            "list": [t, t * 2],
            "tuple": (t + 1,),
            "ordered": collections.OrderedDict([("z", t), ("a", t - 1)]),
            "named": Output(t * 3, [t * 4]),
            "none": None,
        }

    outputs = [replica_output(3), replica_output(3), replica_output(1)]
    out = torch_dp.gather(outputs, "cpu")
    assert type(out) is dict and list(out) == ["list", "tuple", "ordered", "named", "none"]
    assert type(out["list"]) is list and len(out["list"]) == 2
    assert type(out["tuple"]) is tuple and len(out["tuple"]) == 1
    assert type(out["ordered"]) is collections.OrderedDict and list(out["ordered"]) == ["z", "a"]
    assert type(out["named"]) is Output and type(out["named"].aux) is list
    assert out["none"] is None

    def cat(get):
        return torch.cat([get(o) for o in outputs])

    torch.testing.assert_close(out["list"][0], cat(lambda o: o["list"][0]), rtol=0, atol=0)
    torch.testing.assert_close(out["list"][1], cat(lambda o: o["list"][1]), rtol=0, atol=0)
    torch.testing.assert_close(out["tuple"][0], cat(lambda o: o["tuple"][0]), rtol=0, atol=0)
    torch.testing.assert_close(out["ordered"]["z"], cat(lambda o: o["ordered"]["z"]), rtol=0, atol=0)
    torch.testing.assert_close(out["ordered"]["a"], cat(lambda o: o["ordered"]["a"]), rtol=0, atol=0)
    torch.testing.assert_close(out["named"].logits, cat(lambda o: o["named"].logits), rtol=0, atol=0)
    torch.testing.assert_close(out["named"].aux[0], cat(lambda o: o["named"].aux[0]), rtol=0, atol=0)


def test_top_level_tuple_and_namedtuple():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out = torch_dp.gather([(a, b), (b, a)], "cpu")
    assert type(out) is tuple
    torch.testing.assert_close(out[0], torch.cat([a, b]), rtol=0, atol=0)
    torch.testing.assert_close(out[1], torch.cat([b, a]), rtol=0, atol=0)
    named = torch_dp.gather([Output(a, b), Output(b, a)], "cpu")
    assert type(named) is Output
    torch.testing.assert_close(named.aux, torch.cat([b, a]), rtol=0, atol=0)


def test_none_outputs():
    assert torch_dp.gather([None, None, None], "cpu") is None
    out = torch_dp.gather([(torch.ones(1), None), (torch.zeros(2), None)], "cpu")
    assert out[1] is None
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=0)


# ---- scalars -------------------------------------------------------------------------------------------------


def test_scalars_become_a_vector_with_a_warning():
    losses = [torch.tensor(1.5), torch.tensor(-2.0), torch.tensor(0.25)]
    with pytest.warns(UserWarning, match="all input tensors were scalars"):
        out = torch_dp.gather(losses, "cpu")
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.tensor([1.5, -2.0, 0.25]), rtol=0, atol=0)


def test_scalars_inside_a_structure():
    with pytest.warns(UserWarning, match="all input tensors were scalars"):
        out = torch_dp.gather([{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(3.0)}], "cpu")
    torch.testing.assert_close(out["loss"], torch.tensor([1.0, 3.0]), rtol=0, atol=0)


def test_no_scalar_warning_for_vectors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_dp.gather([torch.randn(1), torch.randn(1)], "cpu")


def test_scalar_gradients():
    losses = [torch.tensor(2.0, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    with pytest.warns(UserWarning):
        out = torch_dp.gather(losses, "cpu")
    (out * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    assert [loss.grad.shape for loss in losses] == [torch.Size([])] * 3
    assert [loss.grad.item() for loss in losses] == [1.0, 2.0, 3.0]


# ---- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outputs",
    [
        [{"x": torch.randn(2)}, {"y": torch.randn(2)}],
        [{"x": torch.randn(2)}, {"x": torch.randn(2), "y": torch.randn(2)}],
        [[torch.randn(2)], [torch.randn(2), torch.randn(2)]],
        [(torch.randn(2),), [torch.randn(2)]],
        [[torch.randn(2)], torch.randn(2)],
        [torch.randn(2), [torch.randn(2)]],
    ],
    ids=["dict-keys", "dict-size", "list-length", "tuple-vs-list", "list-vs-tensor", "tensor-vs-list"],
)
def test_mismatched_structures_raise_value_error(outputs):
    with pytest.raises(ValueError, match="replica 1"):
        torch_dp.gather(outputs, "cpu")


def test_non_tensor_leaves_raise_type_error():
    with pytest.raises(TypeError, match=r"int values at output\[1\].*only gather tensors"):
        torch_dp.gather([(torch.randn(2), 1), (torch.randn(2), 2)], "cpu")
    with pytest.raises(TypeError, match=r"str values at output\['name'\]"):
        torch_dp.gather([{"name": "a"}, {"name": "b"}], "cpu")


class LayerCache:
    """Iterates as one (key, value, extra) tuple per layer and is built from such an iterable, as Hugging Face's
    caches are (DynamicCache(ddp_cache_data)), for DataParallel's gather."""

    def __init__(self, layers=()):
        self.layers = [tuple(layer) for layer in layers]

    def __iter__(self):
        return iter(self.layers)


class CacheModel(torch.nn.Module):
    """Returns its output and a LayerCache of two layers, each layer's key and value computed from the input."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3).double()

    def forward(self, x):
        y = self.fc(x)
        return {"y": y, "cache": LayerCache([(y * (i + 1), y - i, None) for i in range(2)])}


def test_objects_are_rebuilt_from_their_gathered_parts():
    # torch.nn.DataParallel's rule, type(out)(map(gather_map, zip(*outputs))), which Hugging Face's caches rely on.
    net = CacheModel()
    x = torch.randn(7, 3, dtype=torch.double, requires_grad=True)
    out = torch_dp.DataParallel(net, ["cpu"] * 3)(x)
    expected = net(x)
    assert type(out["cache"]) is LayerCache and len(out["cache"].layers) == 2
    for layer, expected_layer in zip(out["cache"], expected["cache"]):
        torch.testing.assert_close(layer[0], expected_layer[0])
        torch.testing.assert_close(layer[1], expected_layer[1])
        assert layer[2] is None
    out["cache"].layers[1][0].sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected["cache"].layers[1][0].sum().backward()
    torch.testing.assert_close(grad, x.grad)
    gathered = torch_dp.gather([LayerCache([(torch.ones(2), None)]), LayerCache([(torch.zeros(1), None)])], "cpu")
    assert torch.equal(gathered.layers[0][0], torch.tensor([1.0, 1.0, 0.0])) and gathered.layers[0][1] is None


class Strict:
    """Iterable, but its constructor takes no iterable of parts."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __iter__(self):
        return iter((self.a, self.b))


@pytest.mark.parametrize(
    "outputs, error, fragments",
    [
        ([{"s": "a"}, {"s": "b"}], TypeError, ["hold str values at output['s']", "Return a tensor there"]),
        ([(1,), (2,)], TypeError, ["hold int values at output[0]", "int is not iterable"]),
        (
            [Strict(torch.ones(1), torch.ones(1))] * 2,
            TypeError,
            ["hold Strict values at output", "Strict(gathered parts) raised TypeError", "missing 1 required"],
        ),
        (
            [LayerCache([(torch.ones(1),)]), LayerCache([(torch.ones(1),)] * 2)],
            ValueError,
            ["LayerCache values at output hold different numbers of parts (1, 2 for replicas 0 to 1)"],
        ),
        ([LayerCache([(torch.ones(1), "k")])] * 2, TypeError, ["hold str values at output[0][1]"]),
        (
            [LayerCache([(torch.ones(1, 2),)]), LayerCache([(torch.ones(1, 3),)])],
            RuntimeError,
            ["at output[0][0]: gather: tensor at index 1 has invalid shape [1, 3]"],
        ),
        ([LayerCache(), (torch.ones(1),)], ValueError, ["replica 1 returned a different structure"]),
        (
            [{"c": LayerCache()}, {"c": None}],
            TypeError,
            ["LayerCache and NoneType values at output['c']", "every replica must return the same type there"],
        ),
    ],
    ids=[
        "str",
        "int",
        "constructor-rejects-parts",
        "different-lengths",
        "str-part",
        "part-shapes",
        "object-vs-tuple",
        "object-vs-none",
    ],
)
def test_objects_that_cannot_be_gathered_raise_naming_the_place(outputs, error, fragments):
    with pytest.raises(error) as info:
        torch_dp.gather(outputs, "cpu")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_shape_mismatch_raises():
    with pytest.raises(RuntimeError, match="invalid shape"):
        torch_dp.gather([torch.randn(2, 3), torch.randn(2, 4)], "cpu")


def test_no_outputs_raise():
    with pytest.raises(ValueError, match="at least one replica"):
        torch_dp.gather([], "cpu")


# ---- autograd ------------------------------------------------------------------------------------------------


def test_gradcheck_gather():
    parts = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (3, 3, 2)]
    assert torch.autograd.gradcheck(lambda *p: torch_dp.gather(list(p), "cpu"), parts)
    assert torch.autograd.gradgradcheck(lambda *p: torch_dp.gather(list(p), "cpu"), parts)
    assert torch.autograd.gradcheck(lambda *p: torch_dp.gather(list(p), "cpu", dim=1), [p.t() for p in parts])


def test_gradcheck_nested_gather():
    leaves = [torch.randn(2, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]

    def fn(a, b, c, d):
        out = torch_dp.gather([{"x": [a], "y": Output(b, None)}, {"x": [c], "y": Output(d, None)}], "cpu")
        return out["x"][0], out["y"].logits

    assert torch.autograd.gradcheck(fn, leaves)


def test_gradient_flows_back_to_each_part():
    parts = [torch.randn(2, 3, requires_grad=True), torch.randn(1, 3, requires_grad=True)]
    weights = torch.arange(9.0).view(3, 3)
    (torch_dp.gather(parts, "cpu") * weights).sum().backward()
    torch.testing.assert_close(parts[0].grad, weights[:2])
    torch.testing.assert_close(parts[1].grad, weights[2:])


# ---- bad input: each gets an error naming the problem and the expected value ----------------------------------
# (the table "Bad input and the errors it gets" in docs/errors.md). These are found in the replicas' outputs, so only
# after the forward ran: the module's state is then what one successful forward leaves.


class PerReplica(torch.nn.Module):
    """Returns ``self.make(replica, y)``: column 0 of each input row holds the index of the replica that gets it.
    Its BatchNorm is in training mode, so a forward that ran shows in the running statistics."""

    def __init__(self, make):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)
        self.make = make

    def forward(self, x):
        return self.make(int(x[0, 0]), self.bn(self.fc(x[:, 1:])))


def marked_batch(replicas, rows=2):
    x = torch.randn(replicas * rows, 4)
    x[:, 0] = torch.arange(replicas).repeat_interleave(rows)
    return x


def assert_same_bits(actual, expected):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def assert_gather_error(make, error, *fragments, replicas=3):
    """The class and the functional form raise the same error, and leave the module as one forward does: the
    parameters unchanged, the BatchNorm statistics updated by replica 0 exactly as by the module on chunk 0."""
    x = marked_batch(replicas)
    reference = PerReplica(make)
    nets = [copy.deepcopy(reference), copy.deepcopy(reference)]
    reference(x.chunk(replicas)[0])
    expected = reference.state_dict()
    dp = torch_dp.DataParallel(nets[0], ["cpu"] * replicas)
    raised = []
    calls = [lambda: dp(x), lambda: torch_dp.data_parallel(nets[1], x, ["cpu"] * replicas)]
    for net, call in zip(nets, calls):
        with pytest.raises(error) as info:
            call()
        raised.append(info.value)
        assert_same_bits(net.state_dict(), expected)
        assert net.bn.num_batches_tracked.item() == 1  # the forward ran: once, on replica 0's chunk
    assert type(raised[0]) is type(raised[1]) and str(raised[0]) == str(raised[1])
    for fragment in fragments:
        assert fragment in str(raised[0]), f"{fragment!r} not in {str(raised[0])!r}"
    nets[0].make = lambda replica, y: y  # and the next forward works
    x = marked_batch(replicas)
    expected_output = torch.cat([copy.deepcopy(nets[0])(chunk) for chunk in x.chunk(replicas)])
    torch.testing.assert_close(dp(x), expected_output)


def test_bad_input_non_tensor_outputs():
    assert_gather_error(
        lambda r, y: (y, "label"), TypeError, "hold str values at output[1]", "can only gather tensors (and None)"
    )
    assert_gather_error(
        lambda r, y: {"logits": y, "count": r},
        TypeError,
        "hold int values at output['count']",
        "Return a tensor there",
    )
    assert_gather_error(lambda r, y: object(), TypeError, "hold object values at output")


def test_bad_input_none_in_some_replicas_only():
    # nn.DataParallel returns None when replica 0 returned None, silently dropping the other replicas' tensors.
    assert_gather_error(
        lambda r, y: (y, None if r == 0 else y),
        ValueError,
        "at output[1] replica 0 returned None but replica 1 returned a tensor",
        "or every replica None",
    )
    assert_gather_error(
        lambda r, y: {"aux": None if r == 2 else y},
        ValueError,
        "at output['aux'] replica 2 returned None but replica 0 returned a tensor",
    )


def test_none_in_every_replica_is_gathered_as_none():
    net = PerReplica(lambda r, y: (y, None))
    reference = ChunkedReference(copy.deepcopy(net), 3)  # upstream's semantics, computed chunk by chunk
    x = marked_batch(3)
    out = torch_dp.DataParallel(net, ["cpu"] * 3)(x)
    expected = reference(x)
    assert out[1] is None and expected[1] is None
    torch.testing.assert_close(out[0], expected[0])


def test_bad_input_dicts_with_different_keys():
    assert_gather_error(
        lambda r, y: {"a": y} if r == 0 else {"b": y},
        ValueError,
        "replica 1 returned a different structure than replica 0",
        "dicts must have the same keys",
        "['a']",
        "['b']",
    )
    assert_gather_error(
        lambda r, y: {"a": y, "extra": y} if r == 2 else {"a": y},
        ValueError,
        "replica 2 returned a different structure than replica 0",
        "['a', 'extra']",
    )


def test_bad_input_replica_returns_a_tensor_without_data():
    # A tensor on another device than its replica's is copied to output_device like any other, as upstream does.
    # One that holds no data (here a meta tensor, standing in for a wrong device on a CPU-only machine) cannot
    # be: gather names the replica instead of failing inside the copy.
    assert_gather_error(
        lambda r, y: y.to("meta") if r == 2 else y,
        RuntimeError,
        "tensor at index 2 (replica 2's output) is on device meta",
        "no data to copy to cpu",
        "expected a tensor with data, on its replica's device",
    )
    assert_gather_error(
        lambda r, y: Output(y, y.to("meta") if r == 1 else y),
        RuntimeError,
        "at output.aux: gather: tensor at index 1 (replica 1's output) is on device meta",
    )


def test_bad_input_outputs_that_do_not_concatenate():
    assert_gather_error(
        lambda r, y: y.double() if r == 1 else y,
        RuntimeError,
        "expected all tensors to have the same dtype, but tensor at index 1 is Double and tensor at index 0 is Float",
    )
    assert_gather_error(
        lambda r, y: y[:, :1] if r == 2 else y,
        RuntimeError,
        "tensor at index 2 has invalid shape [2, 1], but expected the shape of tensor 0, [2, 2]",
    )


# ---- property: scatter then gather is the identity, values and gradients --------------------------------------

try:
    import hypothesis
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover - hypothesis is installed by scripts/lib/ensure_deps.sh
    hypothesis = None

Named = collections.namedtuple("Named", ["left", "right"])
DTYPES = [torch.float32, torch.float64, torch.int64]


if hypothesis is not None:

    @st.composite
    def trees(draw):
        """(builder, dim, batch): builder(make_tensor) builds a random nested structure of tuples, lists, dicts,
        OrderedDicts and namedtuples holding tensors (all of size ``batch`` along ``dim``) and non-tensors."""
        dim = draw(st.integers(0, 1))
        batch = draw(st.integers(0, 9))
        tensor_spec = st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(1, 3), min_size=dim, max_size=2),  # the other sizes; rank >= dim + 1
        )
        leaf = st.one_of(
            tensor_spec.map(lambda spec: ("tensor", spec)),
            st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats(allow_nan=False)).map(
                lambda value: ("value", value)
            ),
        )
        keys = st.text("abcxyz", min_size=1, max_size=3)
        shape = st.recursive(
            leaf,
            lambda children: st.one_of(
                st.lists(children, max_size=3).map(lambda c: ("list", c)),
                st.lists(children, max_size=3).map(lambda c: ("tuple", c)),
                st.dictionaries(keys, children, max_size=3).map(lambda c: ("dict", c)),
                st.dictionaries(keys, children, max_size=3).map(lambda c: ("ordered", c)),
                st.tuples(children, children).map(lambda c: ("named", c)),
            ),
            max_leaves=8,
        )
        return draw(shape), dim, batch

    def build(node, dim, batch, make):
        kind, body = node
        if kind == "tensor":
            dtype, others = body
            sizes = list(others)
            sizes.insert(dim, batch)
            return make(sizes, dtype)
        if kind == "value":
            return body
        if kind == "list":
            return [build(c, dim, batch, make) for c in body]
        if kind == "tuple":
            return tuple(build(c, dim, batch, make) for c in body)
        if kind == "dict":
            return {k: build(c, dim, batch, make) for k, c in body.items()}
        if kind == "ordered":
            return collections.OrderedDict((k, build(c, dim, batch, make)) for k, c in body.items())
        return Named(*(build(c, dim, batch, make) for c in body))

    @settings(
        max_examples=1000,
        deadline=None,
        database=None,  # CI writes no .hypothesis folder; a failure prints the example to reproduce it
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(tree=trees(), replicas=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
    def test_property_scatter_then_gather_round_trips_values_and_gradients(tree, replicas, seed):
        import torch.utils._pytree as pytree

        node, dim, batch = tree
        generator = torch.Generator().manual_seed(seed)

        def make(sizes, dtype):
            if dtype == torch.int64:
                return torch.randint(-100, 100, sizes, generator=generator)
            return torch.randn(sizes, generator=generator, dtype=dtype).requires_grad_(dtype == torch.float64)

        inputs = build(node, dim, batch, make)
        devices = ["cpu"] * replicas
        leaves, spec = pytree.tree_flatten(inputs)
        tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        parts = torch_dp.scatter(inputs, devices, dim)

        if isinstance(inputs, torch.Tensor):
            parts = [parts[i] for i in range(len(parts))]  # a lone tensor scatters into a tuple of chunks
        if not tensor_positions:
            assert len(parts) == replicas and all(part is inputs for part in parts)  # passed as they are
            return

        # The split: torch.chunk's sizes, the structure kept, non-tensors passed by identity to every replica.
        expected_sizes = torch_dp._C.chunk_sizes(batch, replicas)
        assert len(parts) == len(expected_sizes)
        for part, size in zip(parts, expected_sizes):
            part_leaves, part_spec = pytree.tree_flatten(part)
            assert part_spec == spec
            for i, (leaf, original) in enumerate(zip(part_leaves, leaves)):
                if i in tensor_positions:
                    assert leaf.dtype == original.dtype and leaf.size(dim) == size
                    assert (
                        leaf.shape[:dim] == original.shape[:dim] and leaf.shape[dim + 1 :] == original.shape[dim + 1 :]
                    )
                else:
                    assert leaf is original

        # Each replica scales its chunk by (replica + 1); gather concatenates back. Non-tensors become None
        # (gather only takes tensors and None), so the gathered structure is the input's with None there.
        def replica_output(r, part):
            part_leaves = pytree.tree_flatten(part)[0]
            out = [leaf * (r + 1) if isinstance(leaf, torch.Tensor) else None for leaf in part_leaves]
            return pytree.tree_unflatten(out, spec)

        outputs = [replica_output(r, part) for r, part in enumerate(parts)]
        gathered = torch_dp.gather(outputs, "cpu", dim)
        gathered_leaves, gathered_spec = pytree.tree_flatten(gathered)
        assert gathered_spec == spec

        factor_1d = torch.cat([torch.full((size,), float(r + 1)) for r, size in enumerate(expected_sizes)])
        weights = []
        for i, leaf in enumerate(leaves):
            got = gathered_leaves[i]
            if i not in tensor_positions:
                assert got is None
                continue
            view = [1] * leaf.dim()
            view[dim] = batch
            factor = factor_1d.view(view)
            assert got.dtype == leaf.dtype and got.shape == leaf.shape
            torch.testing.assert_close(got, (leaf.detach() * factor.to(leaf.dtype)), rtol=0, atol=0)
            if leaf.dtype == torch.float64:
                assert got.requires_grad
                weight = torch.randn(leaf.shape, generator=generator, dtype=torch.float64)
                weights.append((leaf, got, weight, factor.double()))

        # Gradients: d/dx sum(w * gathered) = w * factor, through gather's and scatter's backward.
        if weights:
            loss = sum((got * weight).sum() for _, got, weight, _ in weights)
            grads = torch.autograd.grad(loss, [leaf for leaf, _, _, _ in weights], allow_unused=True)
            for (leaf, _, weight, factor), grad in zip(weights, grads):
                expected = weight * factor
                if grad is None:  # an empty batch has no path from the leaf to the loss
                    assert leaf.numel() == 0
                else:
                    torch.testing.assert_close(grad, expected, rtol=0, atol=0)

else:  # pragma: no cover

    @pytest.mark.skip(reason="needs hypothesis (pip install hypothesis)")
    def test_property_scatter_then_gather_round_trips_values_and_gradients():
        pass
