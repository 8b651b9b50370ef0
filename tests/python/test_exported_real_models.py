"""torch_dp's exported-model support on real third-party models: tiny Hugging Face transformers (random weights, no
downloads) traced with torch.jit.trace and run by torch_dp.DataParallel, and one exported with torch.export and
compiled with AOTInductor, run by torch_dp.PackageDataParallel. Each is compared with the unwrapped traced module /
loaded package on the whole batch.

The package is compiled once and kept in the cache folder test_package_data_parallel.py uses
(~/.cache/torch_dp/exported-<torch version>, or $TORCH_DP_EXPORTED_DIR), under a name keyed by the transformers
version; a present file costs nothing, a missing one about 20 s on two CPU cores."""

import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dp
from exported import compile_package
from helpers import cpus
from tiny_transformers import bert_config, gpt2_config, t5_config

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 100


def _bert_config(**overrides):
    # transformers 5 no longer makes torchscript=True imply tuple outputs: return_dict=False says so.
    return bert_config(**{"vocab_size": VOCAB, "torchscript": True, "return_dict": False, **overrides})


def _batch(n=6, length=10):
    ids = torch.randint(0, VOCAB, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 3 :] = 0  # padding in some rows, so that rows differ in more than their tokens
    return ids, mask


def _trace(model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kwargs:
            return torch.jit.trace(model, example_kwarg_inputs=kwargs, strict=False)
        return torch.jit.trace(model, args)


def _max_diff(actual, expected):
    """The largest difference over matching leaves, after checking that the structures match."""
    actual_leaves, actual_spec = torch.utils._pytree.tree_flatten(actual)
    expected_leaves, expected_spec = torch.utils._pytree.tree_flatten(expected)
    assert actual_spec == expected_spec
    for a, e in zip(actual_leaves, expected_leaves):
        assert a.shape == e.shape and a.dtype == e.dtype
    return max((a - e).abs().max().item() for a, e in zip(actual_leaves, expected_leaves))


@pytest.mark.parametrize("replicas", [2, 3])
def test_traced_bert_inference(replicas):
    """BertModel's (sequence, pooled) tuple, positional and keyword arguments, batches of 6, 2 and 1 rows."""
    ids, mask = _batch()
    traced = _trace(transformers.BertModel(_bert_config()).eval(), ids, mask)
    dp = torch_dp.DataParallel(traced, device_ids=cpus(replicas))
    with torch.no_grad():
        for rows in (6, 2, 1):  # 2 and 1: fewer rows than devices
            expected = traced(ids[:rows], mask[:rows])
            assert isinstance(expected, tuple) and len(expected) == 2
            assert _max_diff(dp(ids[:rows], mask[:rows]), expected) < 1e-5
            assert _max_diff(dp(ids[:rows], attention_mask=mask[:rows]), expected) < 1e-5
            assert _max_diff(dp(input_ids=ids[:rows], attention_mask=mask[:rows]), expected) < 1e-5


@pytest.mark.parametrize("replicas", [2, 3])
def test_traced_bert_training(replicas):
    """A few SGD steps (momentum) in float64 on BertForSequenceClassification traced with its labels: the gathered
    per-replica mean losses, averaged, are the whole batch's (equal chunks); losses and parameters match the traced
    module trained on the whole batch."""
    ids, mask = _batch()
    labels = torch.randint(0, 3, (6,))
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model = transformers.BertForSequenceClassification(_bert_config(num_labels=3)).double().train()
    reference = _trace(copy.deepcopy(model), **inputs)
    traced = _trace(copy.deepcopy(model), **inputs)
    dp = torch_dp.DataParallel(traced, device_ids=cpus(replicas))
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    dp_opt = torch.optim.SGD(dp.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        reference_opt.zero_grad()
        dp_opt.zero_grad()
        expected, expected_logits = reference(**inputs)
        losses, logits = dp(**inputs)
        assert losses.shape == (replicas,)
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-12)
        loss = losses.mean()
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
        expected.backward()
        loss.backward()
        reference_opt.step()
        dp_opt.step()
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), traced.parameters()))
    assert moved > 1e-3  # the steps changed something
    for (name, a), (_, b) in zip(reference.named_parameters(), traced.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


def test_eager_head_over_traced_encoder_training():
    """An eager model whose encoder is a traced BertModel, trained with a loss on the gathered output (float64):
    matches the same model trained on the whole batch."""

    class Classifier(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.norm = nn.LayerNorm(32)
            self.fc = nn.Linear(32, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.fc(self.norm(self.encoder(input_ids, attention_mask)[1]))

    ids, mask = _batch()
    labels = torch.randint(0, 3, (6,))
    bert = transformers.BertModel(_bert_config()).double().train()
    reference = Classifier(_trace(copy.deepcopy(bert), ids, mask)).double()
    model = Classifier(_trace(copy.deepcopy(bert), ids, mask)).double()
    model.load_state_dict(reference.state_dict())
    dp = torch_dp.DataParallel(model, device_ids=cpus(3))
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    dp_opt = torch.optim.SGD(dp.parameters(), lr=0.1)
    for _ in range(3):
        reference_opt.zero_grad()
        dp_opt.zero_grad()
        expected = F.cross_entropy(reference(ids, attention_mask=mask), labels)
        loss = F.cross_entropy(dp(ids, attention_mask=mask), labels)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
        expected.backward()
        loss.backward()
        reference_opt.step()
        dp_opt.step()
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)


def test_traced_gpt2_and_t5_dict_outputs():
    """return_dict=True models traced with strict=False return dicts; DataParallel gathers them key by key."""
    ids, mask = _batch()
    gpt2 = transformers.GPT2LMHeadModel(gpt2_config(vocab_size=VOCAB, use_cache=False)).eval()
    t5 = transformers.T5ForConditionalGeneration(t5_config(vocab_size=VOCAB, d_kv=16, use_cache=False)).eval()
    cases = [
        (gpt2, {"input_ids": ids, "attention_mask": mask}, ["logits"]),
        (
            t5,
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5]},
            ["logits", "encoder_last_hidden_state"],
        ),
    ]
    for model, inputs, keys in cases:
        traced = _trace(model, **inputs)
        with torch.no_grad():
            expected = traced(**inputs)
            assert list(expected) == keys
            for replicas in (2, 3):
                output = torch_dp.DataParallel(traced, device_ids=cpus(replicas))(**inputs)
                assert type(output) is dict and list(output) == keys
                assert _max_diff(output, expected) < 1e-5


def test_saved_and_reloaded_traced_bert_and_state_dict():
    """torch.jit.save/load round trip, nn.DataParallel's state_dict keys, load_state_dict through the wrapper, and
    eval()/train() seen by the replicas."""
    ids, mask = _batch()
    traced = _trace(transformers.BertModel(_bert_config()).eval(), ids, mask)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    dp = torch_dp.DataParallel(loaded, device_ids=cpus(3))
    with torch.no_grad():
        assert _max_diff(dp(ids, attention_mask=mask), traced(ids, mask)) < 1e-5
    assert list(dp.state_dict()) == list(nn.DataParallel(loaded).state_dict())
    assert all(key.startswith("module.") for key in dp.state_dict())

    other = _trace(transformers.BertModel(_bert_config()).eval(), ids, mask)
    other_dp = torch_dp.DataParallel(other, device_ids=cpus(2))
    with torch.no_grad():
        assert _max_diff(other_dp(ids, mask), traced(ids, mask)) > 1e-2  # other weights
        other_dp.load_state_dict(dp.state_dict())
        assert _max_diff(other_dp(ids, mask), traced(ids, mask)) < 1e-5

    dp.module.train()
    assert loaded.training and dp.training
    dp.eval()
    assert not loaded.training
    with torch.no_grad():
        assert _max_diff(dp(ids, mask), traced(ids, mask)) < 1e-5


def test_traced_bert_replica_error_names_the_replica():
    ids, mask = _batch()
    traced = _trace(transformers.BertModel(_bert_config()).eval(), ids, mask)
    dp = torch_dp.DataParallel(traced, device_ids=cpus(2))
    with (
        torch.no_grad(),
        pytest.raises(
            RuntimeError, match=r"(?s)in replica 0 on device cpu.*missing value for argument 'attention_mask'"
        ),
    ):
        dp(ids)


# AOTInductor package


def _cache_dir():
    default = os.path.join(os.path.expanduser("~"), ".cache", "torch_dp", f"exported-{torch.__version__}")
    return os.environ.get("TORCH_DP_EXPORTED_DIR") or default


@pytest.fixture(scope="session")
def bert_package():
    """A BertForSequenceClassification package, batch dimension dynamic (min 1), input_ids positional and
    attention_mask a keyword: compiled once into the cache folder."""
    directory = _cache_dir()
    path = os.path.join(directory, f"hf-bert-{transformers.__version__}.pt2")
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(
            _bert_config(num_hidden_layers=1, num_labels=3, torchscript=False)
        ).eval()
        ids, mask = _batch()
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        staging = path + f".{os.getpid()}.tmp.pt2"
        with torch.no_grad():
            exported = torch.export.export(
                model,
                (ids,),
                {"attention_mask": mask},
                dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}},
            )
            compile_package(exported, staging)
        os.replace(staging, path)
    return path


@pytest.mark.parametrize("replicas", [2, 3])
def test_bert_package(bert_package, replicas):
    """PackageDataParallel called like the exported module (keyword attention_mask, tuple output), against the
    loaded package on the whole batch; batches of 6, 2 and 1 rows."""
    loaded = torch._inductor.aoti_load_package(bert_package)
    pdp = torch_dp.PackageDataParallel(bert_package, device_ids=cpus(replicas))
    ids, mask = _batch(6)
    with torch.no_grad():
        for rows in (6, 2, 1):
            expected = loaded(ids[:rows], attention_mask=mask[:rows])
            assert isinstance(expected, tuple) and expected[0].shape == (rows, 3)
            assert _max_diff(pdp(ids[:rows], attention_mask=mask[:rows]), expected) < 1e-5
    assert pdp.num_loads == replicas
    with pytest.raises(TypeError, match="takes arguments structured as"):
        pdp(ids, mask)  # attention_mask was exported as a keyword
