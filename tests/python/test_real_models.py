"""Hugging Face transformers models and Trainer through torch_dp.DataParallel on CPU replicas.

Each model is built from a tiny config (random weights, no download), in float64 and without dropout, and run
through DataParallel on 2 and 3 CPU replicas against the unwrapped model on the whole batch: outputs, the KV
caches that models return with their default use_cache=True (gathered as torch.nn.DataParallel gathers them),
gradients, a few optimizer steps and gradient checkpointing. Trainer runs a few steps through the DataParallel
it builds itself (under torch_dp.patch()) with a last batch smaller than the replica count."""

import contextlib
import copy
import warnings

import pytest
import torch

import torch_dp
from helpers import cpus
from reference import ChunkedReference
from tiny_transformers import bart_config, bert_config, gpt2_config, t5_config

transformers = pytest.importorskip("transformers", reason="transformers is not installed (scripts/lib/ensure_deps.sh)")

VOCAB = 64
BATCH = 6  # divisible by 2 and 3 replicas: each replica's mean loss then averages to the whole batch's
SEQ = 5


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        # Each replica's loss is a scalar: gathered into a vector, with upstream's warning.
        warnings.filterwarnings("ignore", message="Was asked to gather along dimension 0")
        yield


def gpt2():
    return transformers.GPT2LMHeadModel(gpt2_config(vocab_size=VOCAB))


def t5():
    return transformers.T5ForConditionalGeneration(t5_config(vocab_size=VOCAB))


def bart():
    return transformers.BartForConditionalGeneration(bart_config(vocab_size=VOCAB))


def bert():
    return transformers.BertForSequenceClassification(bert_config(vocab_size=VOCAB, num_labels=3))


def tokens(rows=BATCH, length=SEQ):
    return torch.randint(3, VOCAB, (rows, length))


def batch_for(name, rows=BATCH):
    if name == "bert":
        return {
            "input_ids": tokens(rows),
            "attention_mask": torch.ones(rows, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 3, (rows,)),
        }
    if name == "gpt2":
        ids = tokens(rows)
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": tokens(rows), "labels": tokens(rows, SEQ - 1)}  # encoder-decoder: T5, BART


MODELS = {"gpt2": gpt2, "t5": t5, "bart": bart, "bert": bert}


def make(name):
    torch.manual_seed(0)
    return MODELS[name]().double()


def cache_tensors(cache):
    """A cache's tensors in torch.nn.DataParallel's gather order: the tuples it iterates as, one per layer."""
    return [t for layer in cache for t in layer if t is not None]


def assert_same_outputs(out, expected):
    torch.testing.assert_close(out.logits, expected.logits)
    if getattr(expected, "cache", None) is not None:
        assert type(out.cache) is type(expected.cache)
        assert out.cache.get_seq_length() == expected.cache.get_seq_length()
        got, want = cache_tensors(out.cache), cache_tensors(expected.cache)
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def assert_same_grads(model, reference):
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("name", ["gpt2", "t5", "bart"])
def test_models_with_a_kv_cache_gather_it_as_upstream(name, replicas):
    # Default config: use_cache=True, so each replica returns a DynamicCache (GPT-2) or EncoderDecoderCache (T5,
    # BART), which torch.nn.DataParallel rebuilds from its gathered per-layer tuples.
    model = make(name).eval()
    assert model.config.use_cache
    dp = torch_dp.DataParallel(model, cpus(replicas))
    batch = batch_for(name)
    if name != "gpt2":  # with labels BART turns its cache off
        batch["decoder_input_ids"] = batch.pop("labels")
    with torch.no_grad():
        out = dp(**batch)
        expected = model(**batch)
    assert out.cache is not None
    assert_same_outputs(out, expected)
    # The gathered cache serves the next step of decoding, as the whole batch's does.
    with torch.no_grad():
        step = (
            {"input_ids": tokens(BATCH, 1)}
            if name == "gpt2"
            else {"input_ids": batch["input_ids"], "decoder_input_ids": tokens(BATCH, 1)}
        )
        following = model(**step, cache=out.cache)
        expected_following = model(**step, cache=expected.cache)
    torch.testing.assert_close(following.logits, expected_following.logits)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("name", ["gpt2", "t5", "bart", "bert"])
def test_training_steps_match_the_whole_batch(name, replicas):
    model = make(name).train()
    reference = copy.deepcopy(model)
    dp = torch_dp.DataParallel(model, cpus(replicas))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for _ in range(3):
        batch = batch_for(name)
        out = dp(**batch)
        expected = reference(**batch)
        assert out.loss.shape == (len(torch.arange(BATCH).chunk(replicas)),)  # one loss per replica, as upstream
        torch.testing.assert_close(out.loss.mean(), expected.loss)
        assert_same_outputs(out, expected)
        out.loss.mean().backward()
        expected.loss.backward()
        assert_same_grads(model, reference)
        optimizer.step()
        optimizer_ref.step()
        optimizer.zero_grad()
        optimizer_ref.zero_grad()
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_gradient_checkpointing(name):
    model = make(name).train()
    model.activation_checkpointing_enable()
    reference = copy.deepcopy(model)
    batch = batch_for(name)
    out = torch_dp.DataParallel(model, cpus(3))(**batch)
    expected = reference(**batch)
    torch.testing.assert_close(out.logits, expected.logits)
    out.loss.mean().backward()
    expected.loss.backward()
    assert_same_grads(model, reference)


def test_bert_with_a_chunk_size_of_0():
    # A device given 0 rows runs no replica (BERT cannot take an empty chunk: it reshapes with a -1).
    model = make("bert").eval()
    batch = batch_for("bert")
    out = torch_dp.DataParallel(model, cpus(3), chunk_sizes=[4, 0, 2])(**batch)
    expected = [model(**{k: v[rows] for k, v in batch.items()}) for rows in (slice(0, 4), slice(4, 6))]
    torch.testing.assert_close(out.logits, torch.cat([e.logits for e in expected]))
    torch.testing.assert_close(out.loss, torch.stack([e.loss for e in expected]))


# ---- Trainer --------------------------------------------------------------------------------------------------


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.ids = tokens(rows)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@contextlib.contextmanager
def data_parallel_as(wrapper):
    """Trainer builds `nn.DataParallel(model)` itself, without device_ids, which on a machine without an
    accelerator would call the model directly: under torch_dp.patch(), give that class CPU device ids."""
    torch_dp.patch()
    try:
        torch.nn.DataParallel = wrapper
        yield
    finally:
        torch_dp.unpatch()


def train(wrapper, replicas, per_device, rows, tmp_path):
    """Trains GPT-2 for two epochs with Trainer; returns it, the model, the logged losses and each replica call's
    (rows, num_items_in_batch)."""
    pytest.importorskip("accelerate", reason="Trainer needs accelerate (scripts/lib/ensure_deps.sh)")
    torch.manual_seed(0)
    dataset = TokenRows(rows)
    model = make("gpt2")
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((len(kwargs["input_ids"]), kwargs.get("num_items_in_batch"))),
        with_kwargs=True,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=per_device,
        num_train_epochs=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    _ = args.device
    args._n_gpu = replicas  # as transformers' own tests force it: Trainer then wraps the model in nn.DataParallel
    with data_parallel_as(wrapper):
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, model, losses, calls


@pytest.mark.parametrize(
    "replicas, per_device, rows, last_chunks",
    [(2, 2, 5, [1]), (4, 3, 21, [3, 3, 3])],
    ids=["last-batch-1-row-on-2", "last-batch-9-rows-on-4"],
)
def test_trainer_with_a_last_batch_smaller_than_the_replica_count(replicas, per_device, rows, last_chunks, tmp_path):
    # Trainer passes num_items_in_batch with one equal row per replica (expand(n_gpu, -1), divided, so no longer
    # expanded); on the last batch fewer replicas run than it has rows.
    class CpuDataParallel(torch_dp.DataParallel):
        def __init__(self, module, device_ids=None, output_device=None, dim=0):
            super().__init__(module, cpus(replicas) if device_ids is None else device_ids, output_device, dim)

    class Reference(ChunkedReference):  # torch.nn.DataParallel's semantics computed by hand
        def __init__(self, module):
            super().__init__(module, replicas)

    trainer, model, losses, calls = train(CpuDataParallel, replicas, per_device, rows, tmp_path)
    assert isinstance(trainer.model_wrapped, CpuDataParallel)
    assert trainer.state.global_step == 2 * -(-rows // (per_device * replicas)) == len(losses)
    assert sorted(n for n, _ in calls[-len(last_chunks) :]) == last_chunks  # the last batch's replicas
    assert all(items is not None and items.shape == (1, 1) for _, items in calls)  # one row per replica
    _, reference, reference_losses, _ = train(Reference, replicas, per_device, rows, tmp_path)
    torch.testing.assert_close(losses, reference_losses)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, p_ref, msg=name)
