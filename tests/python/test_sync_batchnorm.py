"""torch_dp.SyncBatchNorm: batch statistics over every replica of a DataParallel forward.

Through DataParallel, a model whose BatchNorm layers were converted must compute what the unconverted model
computes on the whole batch, unwrapped: outputs, input and parameter gradients, and running statistics after
SGD steps (Note [Synchronized batch norm])."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dp
from helpers import conv_bn_net as convnet, cpus, run_with_timeout
from reference import copying


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


def assert_trains_like_whole_batch(make_model, make_input, device_ids, steps=3, copy_everything=False, **dp_options):
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
        torch.testing.assert_close(out, out_ref, msg=lambda m, step=step: f"step {step} outputs: {m}")
        out.square().sum().backward()
        out_ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, msg=lambda m, step=step: f"step {step} input grads: {m}")
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(
                p.grad, p_ref.grad, msg=lambda m, step=step, name=name: f"step {step} {name}.grad: {m}"
            )
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
            torch.testing.assert_close(b, b_ref, msg=lambda m, step=step, name=name: f"step {step} {name}: {m}")
    return model, dp


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_trains_like_batchnorm_on_the_whole_batch(replicas):
    # 10 rows over 3 or 4 replicas: chunks of unequal size.
    assert_trains_like_whole_batch(
        convnet, lambda: torch.randn(10, 3, 6, 6, dtype=torch.double, requires_grad=True), cpus(replicas)
    )


def test_trains_like_batchnorm_with_copied_replicas():
    assert_trains_like_whole_batch(
        convnet, lambda: torch.randn(9, 3, 6, 6, dtype=torch.double, requires_grad=True), cpus(3), copy_everything=True
    )


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
    ids=["cumulative-average", "no-affine", "no-running-stats"],
)
def test_trains_like_batchnorm_with_options(options):
    assert_trains_like_whole_batch(
        lambda: convnet(**options), lambda: torch.randn(8, 3, 6, 6, dtype=torch.double, requires_grad=True), cpus(3)
    )


def test_1d_and_3d_inputs_and_a_layer_called_twice():
    assert_trains_like_whole_batch(
        sequence_net, lambda: torch.randn(7, 3, 8, dtype=torch.double, requires_grad=True), cpus(3)
    )


def test_a_device_with_an_empty_chunk_leaves_the_others_synchronized():
    assert_trains_like_whole_batch(
        convnet, lambda: torch.randn(6, 3, 6, 6, dtype=torch.double, requires_grad=True), cpus(3), chunk_sizes=[4, 0, 2]
    )


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
    # A mean of ~100 and a spread of ~1: rounded to bfloat16 (steps of 0.5 there), the mean or the shift would be
    # off by up to 0.25, a quarter of the output's scale. In float32 the output is BatchNorm's in float32, rounded.
    x = (torch.randn(16, 4) + 100.3).bfloat16()
    out = dp(x)
    assert out.dtype == torch.bfloat16
    expected = reference(x.float()).bfloat16()
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-3, rtol=2**-7)  # at most one bfloat16 step


def test_plain_batchnorm_outside_a_data_parallel_forward():
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3).double()
    layer = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(layer, torch_dp.SyncBatchNorm)
    x = torch.randn(4, 3, 5, 5, dtype=torch.double)
    torch.testing.assert_close(layer(x), reference(x))  # unwrapped
    torch.testing.assert_close(torch_dp.DataParallel(layer, cpus(1))(x), reference(x))  # one replica
    # torch_dp.data_parallel keeps an engine per module, as DataParallel does, so its replicas synchronize too:
    # the batch's statistics, not each chunk's.
    per_chunk = torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.chunk(2)])
    fresh = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    output = torch_dp.data_parallel(fresh, x, cpus(2))
    torch.testing.assert_close(output, reference(x))
    assert not torch.allclose(output, per_chunk)


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
    for layer in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3)):
        assert type(torch_dp.convert_sync_batchnorm(layer)) is torch_dp.SyncBatchNorm


def test_bad_input_too_few_values_over_all_replicas():
    # One row runs one replica (a device with an empty chunk runs none): BatchNorm's own error.
    dp = torch_dp.DataParallel(torch_dp.convert_sync_batchnorm(nn.BatchNorm1d(3)), cpus(2))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        dp(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        torch_dp.convert_sync_batchnorm(nn.BatchNorm1d(3))(torch.randn(3))


# ---- BatchNorm subclasses ---------------------------------------------------------------------------------------
# BatchNormAct2d and SyncBatchNormAct follow timm.layers.norm_act (timm is not a test dependency): BatchNorm with a
# fused activation (and optional drop) that inherits from BatchNorm2d, so that checkpoints of separate BN + act
# layers load into it, and whose forward calls F.batch_norm itself; EfficientNet and many timm models use it.


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        apply_act=True,
        act_layer=nn.ReLU,
        act_kwargs=None,
        inplace=True,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace, **(act_kwargs or {})) if apply_act else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class SyncBatchNormAct(nn.SyncBatchNorm):
    # What timm's convert_sync_batchnorm makes of a BatchNormAct2d: nn.SyncBatchNorm, then drop and act.
    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def timm_convert_sync_batchnorm(module):
    """timm.layers.convert_sync_batchnorm: BatchNormAct2d -> SyncBatchNormAct keeping act and drop."""
    converted = module
    if isinstance(module, BatchNormAct2d):
        converted = SyncBatchNormAct(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        converted.act, converted.drop = module.act, module.drop
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        converted.add_module(name, timm_convert_sync_batchnorm(child))
    return converted


def efficientnet_like(**bn_options):
    # An MBConv-like block: SiLU, ReLU6 and no activation (a projection), in place as timm builds them.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        BatchNormAct2d(6, act_layer=nn.SiLU, **bn_options),
        nn.Conv2d(6, 6, 3, groups=6, bias=False),
        BatchNormAct2d(6, act_layer=nn.ReLU6, **bn_options),
        nn.Conv2d(6, 4, 1, bias=False),
        BatchNormAct2d(4, apply_act=False, **bn_options),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).double()


def efficientnet_input():
    return torch.randn(10, 3, 8, 8, dtype=torch.double, requires_grad=True)


def with_running_statistics(model):
    """`model` in eval mode, its BatchNorm buffers far from their initial values (as after training)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize(
    "replicas, options", [(2, {}), (3, {}), (3, dict(momentum=None))], ids=["2cpu", "3cpu", "3cpu-cumulative-average"]
)
def test_batchnorm_act_trains_like_batchnorm_act_on_the_whole_batch(replicas, options):
    model, _ = assert_trains_like_whole_batch(lambda: efficientnet_like(**options), efficientnet_input, cpus(replicas))
    assert all(isinstance(model[i], BatchNormAct2d) for i in (1, 3, 5))


def test_batchnorm_act_keeps_its_activation_in_eval_mode():
    reference = with_running_statistics(efficientnet_like())
    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    x = torch.randn(9, 3, 8, 8, dtype=torch.double)
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(torch_dp.DataParallel(model, cpus(3))(x), reference(x))


@pytest.mark.parametrize("replicas", [2, 3])
def test_timm_sync_batchnorm_act_trains_like_batchnorm_act_on_the_whole_batch(replicas):
    # timm's own converter first; nn.SyncBatchNorm alone does not synchronize replicas, torch_dp's then does.
    model, _ = assert_trains_like_whole_batch(
        lambda: timm_convert_sync_batchnorm(efficientnet_like()), efficientnet_input, cpus(replicas)
    )
    assert all(isinstance(model[i], SyncBatchNormAct) for i in (1, 3, 5))
    reference = timm_convert_sync_batchnorm(with_running_statistics(efficientnet_like()))
    x = torch.randn(9, 3, 8, 8, dtype=torch.double)
    converted = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    torch.testing.assert_close(torch_dp.DataParallel(converted, cpus(replicas))(x), reference(x))


class ScaledBatchNorm1d(nn.BatchNorm1d):
    """A subclass that adds to BatchNorm's forward through super()."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


class AtenBatchNorm1d(nn.BatchNorm1d):
    """A subclass that calls the ATen op itself, with the cumulative average whatever its momentum says."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.training else 0.0
        return torch.batch_norm(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.training, factor, self.eps, False
        ).tanh()


def test_other_subclasses_train_like_themselves_on_the_whole_batch():
    def make_model():
        return nn.Sequential(nn.Linear(4, 5), ScaledBatchNorm1d(5), nn.Linear(5, 3), AtenBatchNorm1d(3)).double()

    model, _ = assert_trains_like_whole_batch(
        make_model, lambda: torch.randn(10, 4, dtype=torch.double, requires_grad=True), cpus(3)
    )
    assert isinstance(model[1], ScaledBatchNorm1d) and isinstance(model[3], AtenBatchNorm1d)


def test_converted_subclass_keeps_its_class_state_and_copies():
    model = efficientnet_like()
    model[1].running_mean.fill_(0.5)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    converted = torch_dp.convert_sync_batchnorm(model)
    layer = converted[1]
    assert isinstance(layer, BatchNormAct2d) and isinstance(layer, torch_dp.SyncBatchNorm)
    assert isinstance(layer.act, nn.SiLU) and type(layer).__name__ == "BatchNormAct2d"
    assert list(converted.state_dict()) == keys
    assert all(p is params[name] for name, p in converted.named_parameters())
    assert torch.equal(layer.running_mean, torch.full((6,), 0.5, dtype=torch.double))
    assert torch_dp.convert_sync_batchnorm(converted) is converted and type(converted[1]) is type(layer)
    # Copies and pickles (torch.save of the whole model) keep the class and synchronize on their own.
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(converted), torch.load(buffer, weights_only=False)):
        assert type(copied[1]) is type(layer)
        assert copied[1]._torch_dp_sync_token is not layer._torch_dp_sync_token
        reference = efficientnet_like()
        reference.load_state_dict(copied.state_dict())
        x = efficientnet_input()
        torch.testing.assert_close(torch_dp.DataParallel(copied, cpus(2))(x), reference(x))


def test_lazy_batchnorm_synchronizes_once_initialized():
    linear = nn.Linear(4, 5)
    reference = nn.Sequential(linear, nn.LazyBatchNorm1d())
    model = torch_dp.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(linear), nn.LazyBatchNorm1d()))
    x = torch.randn(10, 4)
    torch.testing.assert_close(model(x[:3]), reference(x[:3]))  # initializes both
    assert type(model[1]) is torch_dp.SyncBatchNorm
    torch.testing.assert_close(torch_dp.DataParallel(model, cpus(3))(x), reference(x))
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)


def test_subclass_without_the_batchnorm_op_keeps_its_forward_and_is_named_in_a_warning():
    class ManualBatchNorm1d(nn.BatchNorm1d):
        """Normalizes by hand, without the batch-norm op: nothing torch_dp can synchronize."""

        def forward(self, x):
            return (x - x.mean(0)) / (x.var(0, unbiased=False) + self.eps).sqrt() * self.weight + self.bias

    layer = ManualBatchNorm1d(3)
    dp = torch_dp.DataParallel(torch_dp.convert_sync_batchnorm(layer), cpus(2))
    x = torch.randn(8, 3)
    with pytest.warns(UserWarning, match="ManualBatchNorm1d.forward does not call the batch-norm op"):
        out = dp(x)
    torch.testing.assert_close(out, torch.cat([ManualBatchNorm1d.forward(layer, c) for c in x.chunk(2)]))


def test_subclass_that_refuses_to_be_subclassed_stays_unconverted_with_a_warning():
    class Registered(nn.BatchNorm1d):
        def __init_subclass__(cls, *, tag, **kwargs):
            super().__init_subclass__(**kwargs)

    with pytest.warns(UserWarning, match="left .*Registered unconverted"):
        layer = torch_dp.convert_sync_batchnorm(Registered(3))
    assert type(layer) is Registered


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


@pytest.mark.parametrize("failing", [0, 2])
def test_a_failing_replica_releases_the_waiting_ones(failing):
    net = Faulty()
    dp = torch_dp.DataParallel(net, cpus(3))
    net.plan = {failing: "raise"}
    with pytest.raises(KeyError, match=f"Caught KeyError in replica {failing} on device cpu"):
        run_with_timeout(lambda: dp(faulty_batch(3)))
    net.plan = {}
    x = faulty_batch(3)
    torch.testing.assert_close(
        run_with_timeout(lambda: dp(x)),
        nn.functional.batch_norm(x, None, None, net.bn.weight.detach(), net.bn.bias.detach(), training=True),
    )


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
    x = faulty_batch(3)  # and the next forward normalizes with the whole batch's statistics again
    torch.testing.assert_close(
        run_with_timeout(lambda: dp(x)),
        nn.functional.batch_norm(x, None, None, net.bn.weight.detach(), net.bn.bias.detach(), training=True),
    )


@pytest.mark.parametrize("compiled", ["whole", "layer"])
def test_inside_a_compiled_module_is_refused_before_any_replica_runs(compiled):
    """Compiled replicas take turns compiling, SyncBatchNorm's wait for each other inside the forward: together they
    would hang (Note [Compiled SyncBatchNorm]). A clear error naming the compiled module, the module unchanged;
    compiling only parts without SyncBatchNorm runs, with the unconverted model's results on the whole batch."""
    torch.manual_seed(0)
    reference = convnet()
    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    if compiled == "whole":
        wrapped, name = torch.compile(model, backend="eager"), "the module itself"
    else:
        model[1] = torch.compile(model[1], backend="eager")
        wrapped, name = model, "1"
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    dp = torch_dp.DataParallel(wrapped, cpus(2))
    with pytest.raises(RuntimeError, match=rf"SyncBatchNorm layers inside a torch.compile'd module \({name}\)"):
        run_with_timeout(lambda: dp(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    model = torch_dp.convert_sync_batchnorm(copy.deepcopy(reference))
    model[4] = torch.compile(model[4], backend="eager")  # a Linear: no SyncBatchNorm inside
    dp = torch_dp.DataParallel(model, cpus(2))
    torch.testing.assert_close(run_with_timeout(lambda: dp(x)), reference(x))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "device_ids",
    [[0, 0], [0, 0, 0, 0], pytest.param("all", marks=pytest.mark.cuda(2))],
    ids=["cuda00", "cuda0000", "all-gpus"],
)
def test_on_gpus(device_ids):
    if device_ids == "all":
        device_ids = list(range(torch.cuda.device_count()))
    assert_trains_like_whole_batch(
        lambda: convnet().cuda(),
        lambda: torch.randn(10, 3, 6, 6, dtype=torch.double, device="cuda", requires_grad=True),
        device_ids,
    )
