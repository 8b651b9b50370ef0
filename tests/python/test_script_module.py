"""torch_dp.DataParallel over TorchScript modules (torch.jit.script, torch.jit.load), on CPU replica lists, against
the eager module through the independent ChunkedReference (torch.nn.DataParallel's semantics computed by hand):
outputs, gradients, BatchNorm statistics and parameters after several optimizer steps (fused ones included), every
change to the module seen by the next forward, the replicas' copies on other devices (copying())."""

import copy

import pytest
import torch
from torch import nn

import torch_dp
from helpers import cpus
from reference import ChunkedReference, copying

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


class Net(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.fc2(torch.relu(self.bn(self.fc1(x))))


class Pairs(nn.Module):
    """Tuple input, a keyword argument with a default, a dict output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor], shift: float = 0.0, extra: torch.Tensor | None = None):
        a, b = pair
        out = a * self.w + b + shift
        if extra is not None:
            out = out + extra
        return {"out": out, "rows": out.sum(1)}


def scripted_and_eager(module):
    """A ScriptModule and an eager copy with the same weights."""
    eager = copy.deepcopy(module)
    return torch.jit.script(module), eager


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("rows", [7, 2])
def test_forward_matches_eager(n, rows):
    torch.manual_seed(0)
    script, eager = scripted_and_eager(Net().double().eval())
    dp = torch_dp.DataParallel(script, device_ids=cpus(n))
    x = torch.randn(rows, 4, dtype=torch.double)
    torch.testing.assert_close(dp(x), eager(x), rtol=1e-12, atol=1e-12)


def test_loaded_module(tmp_path):
    torch.manual_seed(1)
    script, eager = scripted_and_eager(Net().double().eval())
    script.save(str(tmp_path / "net.pt"))
    dp = torch_dp.DataParallel(torch.jit.load(str(tmp_path / "net.pt")), device_ids=cpus(3))
    x = torch.randn(8, 4, dtype=torch.double)
    torch.testing.assert_close(dp(x), eager(x), rtol=1e-12, atol=1e-12)


def test_tuple_input_kwargs_dict_output_and_chunk_sizes():
    torch.manual_seed(2)
    script, eager = scripted_and_eager(Pairs().double())
    dp = torch_dp.DataParallel(script, device_ids=cpus(3), chunk_sizes=[2, 0, 3])
    a, b, extra = (torch.randn(5, 3, dtype=torch.double) for _ in range(3))
    out = dp((a, b), shift=0.5, extra=extra)
    expected = eager((a, b), shift=0.5, extra=extra)
    assert set(out) == {"out", "rows"}
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("copies", [False, True], ids=["shared", "copies"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_training_matches_reference(copies, fused):
    """Several Adam steps (fused=True writes parameters without moving their version counters): outputs, input and
    parameter gradients, BatchNorm statistics and parameters as torch.nn.DataParallel's rules give them."""
    torch.manual_seed(3)
    script, eager = scripted_and_eager(Net().double())
    reference = ChunkedReference(eager, 3)
    dp = torch_dp.DataParallel(script, device_ids=cpus(3))
    if copies:
        copying(dp)
    optimizer = torch.optim.Adam(script.parameters(), lr=0.05, fused=fused)
    reference_optimizer = torch.optim.Adam(eager.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(8, 4, dtype=torch.double, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = dp(x), reference(x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
        for p, q in zip(script.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for p, q in zip(script.state_dict().values(), eager.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("copies", [False, True], ids=["shared", "copies"])
def test_changes_are_seen(copies):
    """Each change is made to the ScriptModule and to an independent eager twin, which the reference runs."""
    torch.manual_seed(4)
    script, eager = scripted_and_eager(Net().double().eval())
    dp = torch_dp.DataParallel(script, device_ids=cpus(3))
    if copies:
        copying(dp)
    x = torch.randn(6, 4, dtype=torch.double)

    def check(what):
        with torch.no_grad():
            torch.testing.assert_close(dp(x), ChunkedReference(eager, 3)(x), rtol=1e-12, atol=1e-12, msg=what)

    check("before any change")
    with torch.no_grad():
        for module in (script, eager):
            module.fc1.weight.data.mul_(-2)
    check("an edit through .data")
    script.scale = eager.scale = 3.0
    check("a plain attribute")
    bias = torch.randn(3, dtype=torch.double)
    script.fc2.bias = nn.Parameter(bias.clone())
    eager.fc2.bias = nn.Parameter(bias.clone())
    check("a replaced parameter")
    for module in (script, eager):
        module.bn.running_mean.fill_(0.7)
    check("a buffer edited in place")
    script.train()
    eager.train()
    check("train()")
    script.eval()
    eager.eval()
    check("eval()")


def test_replica_error_names_the_replica():
    class Picky(nn.Module):
        def forward(self, x):
            if bool(x[0, 0] > 100.0):
                raise ValueError("row out of range")
            return x * 2

    dp = torch_dp.DataParallel(torch.jit.script(Picky()), device_ids=cpus(3))
    x = torch.zeros(6, 2)
    x[4, 0] = 1000.0
    with pytest.raises(Exception, match=r"(?s)in replica 2 on device cpu.*row out of range"):
        dp(x)
    torch.testing.assert_close(dp(torch.ones(6, 2)), torch.full((6, 2), 2.0))


def test_replicate_function():
    torch.manual_seed(5)
    script = torch.jit.script(Net().double().eval())
    replicas = torch_dp.replicate(script, cpus(2))
    assert replicas[0] is script
    x = torch.randn(3, 4, dtype=torch.double)
    torch.testing.assert_close(replicas[1](x), script(x), rtol=0, atol=0)


class Outer(nn.Module):
    """An eager model around a scripted backbone, the backbone used twice."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.jit.script(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh()))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.backbone(x)) + self.head(self.backbone(x * 0.5))


@pytest.mark.parametrize("copies", [False, True], ids=["shared", "copies"])
def test_scripted_submodule_trains_like_reference(copies):
    torch.manual_seed(6)
    model = Outer().double()
    # The reference runs an all-eager twin with model's weights.
    eager = Outer().double()
    eager.backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh()).double()
    eager.load_state_dict(model.state_dict())
    dp = torch_dp.DataParallel(model, device_ids=cpus(3))
    if copies:
        copying(dp)
    reference = ChunkedReference(eager, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.double)
        y, y_ref = dp(x), reference(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for (name, p), q in zip(model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10, msg=f"{name} after step {step}")
    model.backbone.eval()
    eager.backbone.eval()
    x = torch.randn(5, 4, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(dp(x), reference(x), rtol=1e-10, atol=1e-10)


@pytest.mark.cuda(1)
@pytest.mark.parametrize("copies", [False, True], ids=["shared", "copies"])
def test_cuda_training_matches_reference(copies):
    """On [0, 0] (copies: [0, 1] with two GPUs, else [0, 0] with copied replicas)."""
    torch.manual_seed(7)
    two = torch.cuda.device_count() > 1
    device_ids = [0, 1] if copies and two else [0, 0]
    script, eager = scripted_and_eager(Net().double().cuda())
    dp = torch_dp.DataParallel(script, device_ids=device_ids)
    if copies and not two:
        copying(dp)
    reference = ChunkedReference(eager, 2)
    for _ in range(3):
        x = torch.randn(8, 4, dtype=torch.double, device="cuda")
        y, y_ref = dp(x), reference(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        with torch.no_grad():
            for p, q in zip(script.parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad = q.grad = None
