"""torch_dp.PackageDataParallel against the eager model and torch._inductor.aoti_load_package on the whole batch,
over CPU device lists, and its errors.

The packages are compiled once and kept in a cache folder keyed by the torch version (~/.cache/torch_dp/
exported-<version>, or $TORCH_DP_EXPORTED_DIR, which scripts/test.sh sets): examples/python/export_model.py writes
the model of the examples, and this module adds a model with nested inputs and outputs. A missing file is compiled
again (half a minute each on two CPU cores); a present one costs nothing."""

import os
import threading
import zipfile

import pytest
import torch
from torch import nn

import torch_dp
from exported import cache_dir, compile_package, eager_model, exported_files
from helpers import cpus, run_in_threads


class TreeModel(nn.Module):
    """Nested inputs and outputs: a tuple and a keyword argument in, a dict and a tuple out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, pair, *, extra):
        a, b = pair
        h = self.fc(a) + b
        return {"h": h, "rows": (extra * self.scale, h.sum(1))}


def _tree_package(directory):
    path = os.path.join(directory, "tree.pt2")
    if not os.path.exists(path):
        torch.manual_seed(1)
        model = TreeModel().eval()
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        example = ((torch.randn(6, 8), torch.randn(6, 4)),)
        shapes = {"pair": ({0: batch}, {0: batch}), "extra": {0: batch}}
        staging = path + f".{os.getpid()}.tmp.pt2"
        with torch.no_grad():
            exported = torch.export.export(model, example, {"extra": torch.randn(6, 3)}, dynamic_shapes=shapes)
            compile_package(exported, staging)
        torch.save(model.state_dict(), path + ".state.pt")
        os.replace(staging, path)
    model = TreeModel().eval()
    model.load_state_dict(torch.load(path + ".state.pt"))
    return path, model


@pytest.fixture(scope="session")
def exported():
    """(folder, eager model): export_model.py's files, and its model with the package's weights."""
    directory = exported_files(cache_dir())
    return directory, eager_model(directory)


@pytest.fixture(scope="session")
def package(exported):
    return os.path.join(exported[0], "model.pt2")


@pytest.fixture(scope="session")
def loaded(package):
    """The package unwrapped: one loader, on the whole batch."""
    return torch._inductor.aoti_load_package(package)


@pytest.fixture(scope="session")
def tree(exported):
    return _tree_package(exported[0])


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("batch", [10, 7, 1], ids=lambda n: f"batch{n}")
def test_matches_the_eager_model_and_one_loader(exported, package, loaded, replicas, batch):
    pdp = torch_dp.PackageDataParallel(package, cpus(replicas))
    x = torch.randn(batch, 8)
    with torch.no_grad():
        expected = exported[1](x)
    output = pdp(x)
    _assert_close(output, expected)
    _assert_close(output, loaded(x))
    assert output.device == torch.device("cpu") and not output.requires_grad


def test_rows_stay_in_order(package, loaded):
    # Rows that differ by position only: a gather in the wrong order, or a chunk run by the wrong loader, moves them.
    pdp = torch_dp.PackageDataParallel(package, cpus(3))
    x = torch.arange(11 * 8, dtype=torch.float32).reshape(11, 8) / 10
    _assert_close(pdp(x), loaded(x))


def test_the_batch_written_by_export_model(exported, package):
    directory = exported[0]
    x = torch.load(os.path.join(directory, "input.pt"))
    pdp = torch_dp.PackageDataParallel(package, cpus(3))
    _assert_close(pdp(x), torch.load(os.path.join(directory, "expected.pt")))


@pytest.mark.parametrize("sizes", [[4, 0, 6], [0, 4, 6], [0, 0, 10]])
def test_chunk_sizes_with_a_zero(package, loaded, sizes):
    """A device given 0 rows runs nothing; unlike DataParallel's, the first may too (no loader is the model itself)."""
    pdp = torch_dp.PackageDataParallel(package, cpus(3), chunk_sizes=sizes)
    x = torch.randn(10, 8)
    _assert_close(pdp(x), loaded(x))
    with pytest.raises(RuntimeError):
        pdp(torch.randn(9, 8))  # does not add up to the chunk sizes


@pytest.mark.parametrize("issuing", ["threads", "serial", "auto"])
def test_issuing(package, loaded, issuing):
    pdp = torch_dp.PackageDataParallel(package, cpus(2), issuing=issuing)
    x = torch.randn(9, 8)
    for _ in range(4):  # "auto" measures over its first calls
        _assert_close(pdp(x), loaded(x))


def test_loaders_are_kept_between_calls(package, loaded):
    pdp = torch_dp.PackageDataParallel(package, cpus(2))
    assert pdp.num_loads == 2
    for batch in (6, 3, 1, 6):
        x = torch.randn(batch, 8)
        _assert_close(pdp(x), loaded(x))
    assert pdp.num_loads == 2


def test_device_forms(package, loaded):
    x = torch.randn(5, 8)
    for device_ids in (["cpu", "cpu"], [torch.device("cpu")] * 2, ("cpu", torch.device("cpu"))):
        pdp = torch_dp.PackageDataParallel(package, device_ids, output_device="cpu")
        assert pdp.device_ids == [torch.device("cpu")] * 2
        _assert_close(pdp(x), loaded(x))
    # None: a CPU package runs on the CPU.
    pdp = torch_dp.PackageDataParallel(package)
    assert pdp.device_ids == [torch.device("cpu")]
    _assert_close(pdp(x), loaded(x))
    assert "cpu" in repr(pdp) and pdp.metadata["AOTI_DEVICE_KEY"] == "cpu"


def test_nested_arguments_and_outputs(tree):
    path, model = tree
    pdp = torch_dp.PackageDataParallel(path, cpus(3))
    loaded = torch._inductor.aoti_load_package(path)
    a, b, extra = torch.randn(7, 8), torch.randn(7, 4), torch.randn(7, 3)
    output = pdp((a, b), extra=extra)
    with torch.no_grad():
        expected = model((a, b), extra=extra)
    assert set(output) == {"h", "rows"} and isinstance(output["rows"], tuple)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output, loaded((a, b), extra=extra), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="takes arguments structured as"):
        pdp(a, extra=extra)


def test_concurrent_calls(package, loaded):
    pdp = torch_dp.PackageDataParallel(package, cpus(2))
    inputs = [torch.randn(5 + i, 8) for i in range(4)]
    results = [None] * 4

    def call(i):
        for _ in range(5):
            results[i] = pdp(inputs[i])

    run_in_threads(call, 4)
    for x, result in zip(inputs, results):
        _assert_close(result, loaded(x))


def test_the_gil_is_released_while_the_loaders_run(package):
    # Another Python thread runs while forward runs: a forward on a large batch in a thread, and this thread counts
    # until it ends. With the GIL held through forward, the count could not move between start and end.
    pdp = torch_dp.PackageDataParallel(package, cpus(2))
    x = torch.randn(200_000, 8)
    started = threading.Event()
    done = threading.Event()

    def run():
        started.set()
        for _ in range(3):
            pdp(x)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    count = 0
    while not done.is_set():
        count += 1
    thread.join()
    assert count > 0


def test_inference_only(package, loaded):
    pdp = torch_dp.PackageDataParallel(package, cpus(2))
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        pdp(x)
    with torch.no_grad():
        output = pdp(x)
    assert not output.requires_grad
    _assert_close(output, loaded(x.detach()))
    assert not pdp(torch.randn(4, 8)).requires_grad  # grad mode on, no input requiring grad: runs


def test_a_failing_replica_is_named(package):
    pdp = torch_dp.PackageDataParallel(package, cpus(2))
    with pytest.raises(RuntimeError, match="in replica 0 on device cpu") as info:
        pdp(torch.randn(4, 8, dtype=torch.float64))  # compiled for float32
    assert "Float" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*missing.pt2.*expected an AOTInductor package"):
        torch_dp.PackageDataParallel(tmp_path / "missing.pt2", cpus(2))


def test_not_a_package(tmp_path, exported):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_text("not a zip archive")
    with pytest.raises(ValueError, match="garbage.pt2' is not an AOTInductor package"):
        torch_dp.PackageDataParallel(garbage, cpus(2))
    with pytest.raises(ValueError, match="model.pt' is not an AOTInductor package.*ScriptDataParallel"):
        torch_dp.PackageDataParallel(os.path.join(exported[0], "model.pt"), cpus(2))


def test_a_package_that_does_not_load(tmp_path, package):
    # A package whose compiled library is damaged, as one compiled by another torch fails: the error names the file.
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, b"\0" * 64 if item.filename.endswith(".so") else data)
    with pytest.raises(RuntimeError, match="could not load the AOTInductor package '.*broken.pt2' on device cpu"):
        torch_dp.PackageDataParallel(broken, cpus(2))


def test_cuda_devices_for_a_cpu_package(package):
    # On a machine without CUDA too: the package's device type is checked before the devices are.
    with pytest.raises(ValueError, match="was compiled for cpu, but the devices asked for include cuda"):
        torch_dp.PackageDataParallel(package, ["cuda", "cuda"])
    with pytest.raises(ValueError, match="was compiled for cpu, but the devices asked for include cuda:1"):
        torch_dp.PackageDataParallel(package, ["cpu", torch.device("cuda", 1)])


def test_gpu_indices_for_a_cpu_package(package, two_fake_gpus):
    with pytest.raises(ValueError, match="was compiled for cpu, but the devices asked for include cuda:0"):
        torch_dp.PackageDataParallel(package, [0, 1])


class _RegisteredWithoutLoadableContext:
    """A pytree node type registered under a serialized name whose context JSON cannot read back."""


torch.utils._pytree.register_pytree_node(
    _RegisteredWithoutLoadableContext,
    lambda node: ([], None),
    lambda children, context: _RegisteredWithoutLoadableContext(),
    serialized_type_name="test_package_data_parallel.RegisteredWithoutLoadableContext",
)


@pytest.mark.parametrize(
    "type_name",
    ["my_models.OutputTypeNotRegisteredHere", "test_package_data_parallel.RegisteredWithoutLoadableContext"],
)
def test_an_output_structure_python_cannot_rebuild(package, monkeypatch, type_name):
    """A package whose output spec names a type this process cannot rebuild (not registered with pytree here, or
    registered with a context pytree cannot load): a TypeError that says what to do, when the object is made."""
    from torch_dp import package_data_parallel

    def call_spec_naming_the_type(self):
        in_spec, out_spec = original(self)
        return in_spec, out_spec.replace("null", f'"{type_name}"', 1)

    original = type(torch_dp.PackageDataParallel(package, cpus(1))._impl).call_spec.fget
    monkeypatch.setattr(package_data_parallel._C.PackageDataParallel, "call_spec", property(call_spec_naming_the_type))
    with pytest.raises(TypeError, match=r"outputs of .* cannot be rebuilt in Python .*return_dict=False"):
        torch_dp.PackageDataParallel(package, cpus(2))


def test_bad_arguments(package):
    with pytest.raises(ValueError, match="chunk_sizes must give one size per device"):
        torch_dp.PackageDataParallel(package, cpus(2), chunk_sizes=[1, 2, 3])
    with pytest.raises(ValueError, match="issuing must be one of"):
        torch_dp.PackageDataParallel(package, cpus(2), issuing="fast")
    with pytest.raises(ValueError, match="device_ids is empty"):
        torch_dp.PackageDataParallel(package, [])


@pytest.fixture(scope="session")
def cuda_package():
    return os.path.join(exported_files(cache_dir("cuda"), "--device", "cuda"), "model.pt2")


@pytest.mark.cuda(1)
def test_cuda_package_over_two_replicas(cuda_package):
    loaded = torch._inductor.aoti_load_package(cuda_package)
    pdp = torch_dp.PackageDataParallel(cuda_package, [0, 0])  # two loaders on GPU 0
    assert pdp.num_loads == 2
    for batch in (10, 7, 1):
        x = torch.randn(batch, 8, device="cuda:0")
        for _ in range(3):
            output = pdp(x)
            assert output.device == torch.device("cuda", 0)
            _assert_close(output, loaded(x))
    to_cpu = torch_dp.PackageDataParallel(cuda_package, [0, 0], output_device="cpu", chunk_sizes=[3, 2])
    x = torch.randn(5, 8, device="cuda:0")
    _assert_close(to_cpu(x), loaded(x).cpu())
    assert pdp.num_loads == 2


@pytest.mark.cuda(2)
def test_cuda_package_over_every_gpu(cuda_package):
    loaded = torch._inductor.aoti_load_package(cuda_package)
    ids = list(range(torch.cuda.device_count()))
    pdp = torch_dp.PackageDataParallel(cuda_package, ids)
    x = torch.randn(11, 8, device="cuda:0")
    _assert_close(pdp(x), loaded(x))


@pytest.mark.cuda(1)
def test_cuda_package_on_cpu_devices(cuda_package):
    with pytest.raises(ValueError, match="was compiled for cuda, but the devices asked for include cpu"):
        torch_dp.PackageDataParallel(cuda_package, cpus(2))
