"""Tiny Hugging Face transformers configs shared by the real-model tests (imported as `from tiny_transformers import
...`): random weights, no downloads, two layers of width 32, no dropout. Each builder returns a config whose
fields a test replaces or adds with keyword overrides (vocab_size, use_cache, torchscript, return_dict,
num_labels, d_kv, ...).

transformers is imported only when a builder is called, so that importing this module never fails: a test module
skips itself with pytest.importorskip("transformers") first."""

VOCAB = 64


def _config(name, *groups):
    """transformers.<name>(**options), options merged from the groups in order: the later ones win."""
    import transformers

    options = {}
    for group in groups:
        options.update(group)
    return getattr(transformers, name)(**options)


def gpt2_config(**overrides):
    sizes = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _config("GPT2Config", sizes, no_dropout, dict(bos_token_id=0, eos_token_id=0), overrides)


def t5_config(**overrides):
    sizes = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    tokens = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _config("T5Config", sizes, dict(dropout_rate=0.0), tokens, overrides)


def bart_config(**overrides):
    sizes = dict(vocab_size=VOCAB, d_model=32, max_position_embeddings=32)
    layers = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2)
    widths = dict(encoder_ffn_dim=64, decoder_ffn_dim=64)
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    tokens = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return _config("BartConfig", sizes, layers, widths, no_dropout, tokens, overrides)


def bert_config(**overrides):
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, max_position_embeddings=32)
    layers = dict(num_hidden_layers=2, num_attention_heads=2)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _config("BertConfig", sizes, layers, no_dropout, overrides)
