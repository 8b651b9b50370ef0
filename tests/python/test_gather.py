"""torch_dp.gather: concatenation, nested outputs, None and scalar leaves, output devices, errors, gradients."""

import collections
import warnings

import pytest
import torch

import torch_dp

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
