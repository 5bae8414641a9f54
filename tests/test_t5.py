"""T5: parity with transformers on tiny random checkpoints, cache, soft prefix, tokenizer, errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from plug_jax.models import assets, t5
from plug_jax.models.loading import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = {
        # T5 v1.0: relu, tied head with d_model**-0.5 output scaling.
        "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
        # T5 v1.1 / Flan-T5: gated-gelu, untied head.
        "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
VOCAB = 96
BATCH, ENCODER_LENGTH, DECODER_LENGTH = 3, 24, 10


def _make_hf_checkpoint(variant: str, directory) -> "transformers.T5ForConditionalGeneration":
    torch.manual_seed(0)
    config = transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
            decoder_start_token_id=0, **VARIANTS[variant])
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if not VARIANTS[variant]["tie_word_embeddings"]:
            # transformers >= 5 always ties T5's head; untie it by hand (save_pretrained keeps it).
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
        for name, param in model.named_parameters():
            if "layer_norm" in name:  # initialized to ones: make loading them observable
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    checkpoints = {}
    for variant in VARIANTS:
        directory = tmp_path_factory.mktemp(variant.replace(".", "_"))
        checkpoints[variant] = (_make_hf_checkpoint(variant, directory), directory)
    return checkpoints


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, (BATCH, ENCODER_LENGTH))
    positions = np.arange(ENCODER_LENGTH)
    mask = np.stack([positions < ENCODER_LENGTH,          # full
                     positions < 15,                      # right-padded
                     positions >= ENCODER_LENGTH - 18])   # left-padded
    tokens = np.where(mask, tokens, 0)
    targets = rng.integers(2, VOCAB, (BATCH, DECODER_LENGTH))
    decoder_mask = np.arange(DECODER_LENGTH)[None] < np.array([[10], [6], [3]])
    targets = np.where(decoder_mask, targets, 0)
    return tokens, mask, targets, decoder_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(hf_checkpoints, variant):
    hf_model, directory = hf_checkpoints[variant]
    config, params = t5.load_t5(directory, dtype=jnp.float32)
    tied = VARIANTS[variant]["tie_word_embeddings"]
    assert (config.tie_word_embeddings, config.scale_decoder_outputs) == (tied, tied)
    assert config.num_decoder_layers == 3 and config.relative_attention_max_distance == 20

    tokens, mask, targets, decoder_mask = _inputs()
    decoder_tokens = np.asarray(t5.shift_right(jnp.asarray(targets), config.decoder_start_token_id))
    hf_decoder_tokens = hf_model._shift_right(torch.tensor(targets)).numpy()
    np.testing.assert_array_equal(decoder_tokens, hf_decoder_tokens)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                            decoder_input_ids=torch.tensor(decoder_tokens),
                            decoder_attention_mask=torch.tensor(decoder_mask))

    model = t5.T5(config)
    variables = {"params": params}
    logits = model.apply(variables, tokens, mask, decoder_tokens, decoder_mask)
    encoded, encoder_mask = model.apply(variables, tokens, mask, method=t5.T5.encode)
    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, DECODER_LENGTH, VOCAB)
    np.testing.assert_array_equal(encoder_mask, mask)
    encoded_diff = np.abs(np.asarray(encoded) - expected.encoder_last_hidden_state.numpy())[mask]
    logits_diff = np.abs(np.asarray(logits) - expected.logits.numpy())[decoder_mask]
    assert encoded_diff.max() < 1e-4, encoded_diff.max()
    assert logits_diff.max() < 1e-4, logits_diff.max()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = np.arange(-300, 301)
    ours = t5.relative_position_bucket(jnp.asarray(relative), bidirectional=bidirectional,
                                       num_buckets=num_buckets, max_distance=max_distance)
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
            max_distance=max_distance)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def _random_model(config: t5.T5Config, **kwargs):
    model = t5.T5(config, **kwargs)
    tokens, mask, targets, decoder_mask = _inputs()
    tokens, targets = tokens % config.vocab_size, targets % config.vocab_size
    params = model.init(jax.random.key(0), tokens, mask, targets, decoder_mask)["params"]
    return model, {"params": params}


def test_incremental_decoding_matches_teacher_forcing():
    config = t5.T5Config.tiny()
    model, variables = _random_model(config)
    tokens, mask, targets, _ = _inputs()
    tokens, targets = tokens % config.vocab_size, targets % config.vocab_size
    decoder_tokens = t5.shift_right(jnp.asarray(targets), config.decoder_start_token_id)
    # Row 1 is a left-padded decoder prompt: the cache must keep its padding masked, too.
    decoder_mask = np.ones((BATCH, DECODER_LENGTH), bool)
    decoder_mask[1, :2] = False

    encoded, encoder_mask = model.apply(variables, tokens, mask, method=t5.T5.encode)
    expected, _ = model.apply(variables, decoder_tokens, encoded, encoder_mask,
                              decoder_mask=decoder_mask, method=t5.T5.decode)

    @jax.jit
    def step(cache, chunk, chunk_mask, encoded):
        return model.apply(variables, chunk, encoded, encoder_mask, decoder_mask=chunk_mask,
                           cache=cache, method=t5.T5.decode)

    max_length = DECODER_LENGTH + 4  # unused slots must stay masked
    for cache_cross_attention in (True, False):
        cache = t5.init_cache(config, BATCH, max_length, jnp.float32)
        if cache_cross_attention:
            cache = model.apply(variables, encoded, cache, method=t5.T5.cache_cross_attention)
        # A 3-token prefill, then one token at a time.
        bounds = [0, 3, *range(4, DECODER_LENGTH + 1)]
        pieces = []
        for begin, end in zip(bounds[:-1], bounds[1:]):
            logits, cache = step(cache, decoder_tokens[:, begin:end], decoder_mask[:, begin:end],
                                 None if cache_cross_attention else encoded)
            pieces.append(logits)
        assert all(leaf.shape[0] == BATCH for leaf in jax.tree.leaves(cache))
        np.testing.assert_array_equal(cache["index"], DECODER_LENGTH)
        diff = np.abs(np.concatenate(pieces, axis=1) - np.asarray(expected))[decoder_mask]
        assert diff.max() < 1e-5, (cache_cross_attention, diff.max())


def test_soft_prefix_equals_prepended_tokens():
    config = t5.T5Config.tiny(feed_forward_proj="relu", tie_word_embeddings=True,
                              scale_decoder_outputs=True)
    model, variables = _random_model(config)
    tokens, mask, targets, decoder_mask = _inputs()
    tokens, targets = tokens % config.vocab_size, targets % config.vocab_size
    prefix_length = 5  # row 2 is left-padded: part of its prefix is masked
    prefix = model.apply(variables, tokens[:, :prefix_length], method=t5.T5.embed_tokens)

    def logits_with_prefix(model, prefix):
        return model.apply(variables, tokens[:, prefix_length:], mask[:, prefix_length:], targets,
                           decoder_mask, embedded_prefix=prefix,
                           prefix_mask=mask[:, :prefix_length])

    expected = model.apply(variables, tokens, mask, targets, decoder_mask)
    encoded, encoder_mask = model.apply(
            variables, tokens[:, prefix_length:], mask[:, prefix_length:], embedded_prefix=prefix,
            prefix_mask=mask[:, :prefix_length], method=t5.T5.encode)
    np.testing.assert_array_equal(encoder_mask, mask)
    diff = np.abs(np.asarray(logits_with_prefix(model, prefix) - expected))[decoder_mask]
    assert diff.max() < 1e-5, diff.max()

    # Gradients reach the prefix, the same with rematerialized layers.
    def loss(prefix, model):
        logits = logits_with_prefix(model, prefix)
        return jnp.sum(jnp.where(decoder_mask[..., None], logits, 0) ** 2)

    grad = jax.jit(jax.grad(lambda prefix: loss(prefix, model)))(prefix)
    remat_model = t5.T5(config, remat=True)
    grad_remat = jax.jit(jax.grad(lambda prefix: loss(prefix, remat_model)))(prefix)
    assert np.abs(np.asarray(grad)[mask[:, :prefix_length]]).min() > 0
    np.testing.assert_allclose(grad_remat, grad, rtol=1e-5, atol=1e-5)


TEXTS = ["Hello world!", "Translate English to German: The house is wonderful.",
         "  spaces   and\ttabs, numbers 12345 and Ünïcödé  ", "<extra_id_0> sentinel"]


def test_tokenizer_appends_eos_and_matches_transformers():
    tokenizer = t5.t5_tokenizer()
    encoding = tokenizer.encode(TEXTS[0])
    assert encoding.ids[-1] == 1 and encoding.tokens[-1] == "</s>" and encoding.ids.count(1) == 1
    assert 0 not in encoding.ids  # no padding to the file's fixed 256
    assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == TEXTS[0]
    assert tokenizer.token_to_id("<pad>") == 0 and tokenizer.token_to_id("</s>") == 1

    reference = transformers.T5TokenizerFast(tokenizer_file=str(assets.t5_tokenizer_json()))
    for text in TEXTS:
        assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
    long_text = " ".join(["word"] * 400)
    assert len(tokenizer.encode(long_text).ids) == 401  # no truncation to 256 either


def _copy_checkpoint(source, target, edit) -> None:
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors")


def test_checkpoint_errors_are_one_line_and_name_the_tensor(hf_checkpoints, tmp_path):
    _, directory = hf_checkpoints["v1.1"]
    name = "decoder.block.1.layer.2.DenseReluDense.wo.weight"
    _copy_checkpoint(directory, tmp_path / "missing", lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=f"'{name}' is missing") as missing:
        t5.load_t5(tmp_path / "missing", dtype=jnp.float32)

    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    _copy_checkpoint(directory, tmp_path / "shape",
                     lambda tensors: tensors.update({name: np.zeros((32, 31), np.float32)}))
    with pytest.raises(CheckpointError, match=f"'{name}' has shape") as shape:
        t5.load_t5(tmp_path / "shape", dtype=jnp.float32)

    config = json.loads((directory / "config.json").read_text())
    with pytest.raises(CheckpointError, match="not a T5 encoder-decoder") as model_type:
        t5.T5Config.from_hf({**config, "model_type": "llama",
                             "architectures": ["LlamaForCausalLM"]})
    for error in (missing, shape, model_type):
        assert "\n" not in str(error.value)


def test_flan_t5_xxl_config():
    flan_t5_xxl = {  # google/flan-t5-xxl config.json
            "architectures": ["T5ForConditionalGeneration"], "d_ff": 10240, "d_kv": 64,
            "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new",
            "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
            "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": True,
            "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24,
            "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
            "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
            "tie_word_embeddings": False, "vocab_size": 32128}
    config = t5.T5Config.from_hf(flan_t5_xxl)
    assert config == t5.T5Config()
    assert config.activation == "gelu_new" and config.is_gated
    shapes = jax.tree.leaves(t5.abstract_params(config, jnp.bfloat16))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in shapes)
    assert sum(int(np.prod(leaf.shape)) for leaf in shapes) == 11_135_332_352


# ---------------------------------------------------------------------------------------------
# Dropout: the reference trains through Flan-T5 in train mode (dropout_rate 0.1, weights frozen).


def _dropout_logits(model, variables, rng=None, *, embedded_prefix=None):
    """Teacher-forced logits, deterministic, or in train mode with dropout drawn from `rng`."""
    tokens, mask, targets, decoder_mask = _inputs()
    vocab = model.config.vocab_size
    train_mode = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
    return jax.jit(model.apply, static_argnames="deterministic")(
            variables, tokens % vocab, mask, targets % vocab, decoder_mask,
            embedded_prefix=embedded_prefix, **train_mode)


def test_dropout_acts_in_train_mode_only_and_follows_its_rng():
    config = t5.T5Config.tiny()
    model, variables = _random_model(config)
    with_dropout = t5.T5(config, dropout_rate=0.1)
    rng = jax.random.key(7)
    expected = _dropout_logits(model, variables)
    np.testing.assert_array_equal(_dropout_logits(model, variables, rng), expected)  # rate 0
    np.testing.assert_array_equal(_dropout_logits(with_dropout, variables), expected)

    dropped = _dropout_logits(with_dropout, variables, rng)
    np.testing.assert_array_equal(_dropout_logits(with_dropout, variables, rng), dropped)
    assert np.abs(dropped - expected).max() > 1e-3
    assert np.abs(_dropout_logits(with_dropout, variables, jax.random.key(8)) - dropped).max() > 1e-3


def test_dropout_zeroes_about_the_rate_and_rescales_what_it_keeps():
    import flax.linen as nn

    config = t5.T5Config.tiny()
    rate = 0.25
    model, variables = _random_model(config, dropout_rate=rate)
    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            seen.append((np.asarray(args[0]).ravel(), np.asarray(out).ravel()))
        return out

    tokens, mask, targets, decoder_mask = _inputs()
    with nn.intercept_methods(record):  # eagerly, to see the values
        model.apply(variables, tokens % config.vocab_size, mask, targets % config.vocab_size,
                    decoder_mask, deterministic=False, rngs={"dropout": jax.random.key(0)})
    # HF's sites. Each stack: its embedded input and final-norm output; per layer, the attention
    # probabilities and output of each attention, and the FF's hidden activation and output.
    assert len(seen) == (2 + 4 * config.num_layers) + (2 + 6 * config.num_decoder_layers)
    inputs, outputs = map(np.concatenate, zip(*seen))
    nonzero = inputs != 0
    kept = nonzero & (outputs != 0)
    assert abs(1 - kept.sum() / nonzero.sum() - rate) < 0.01, kept.sum() / nonzero.sum()
    np.testing.assert_allclose(outputs[kept], inputs[kept] / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dropout_acts_where_transformers_puts_it(hf_checkpoints, variant, keep_every_unit):
    """Masks that keep every unit leave train mode a 1/(1 - rate) scaling at each dropout site:
    ours equals transformers' T5 in train mode, which differs from eval mode."""
    del keep_every_unit
    _, directory = hf_checkpoints[variant]
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(
            directory, attn_implementation="eager").train()
    rate = hf_model.config.dropout_rate
    assert rate == 0.1
    config, params = t5.load_t5(directory, dtype=jnp.float32)
    tokens, mask, targets, decoder_mask = _inputs()
    decoder_tokens = np.asarray(t5.shift_right(jnp.asarray(targets), config.decoder_start_token_id))
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                            decoder_input_ids=torch.tensor(decoder_tokens),
                            decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()
    model = t5.T5(config, dropout_rate=rate)
    logits = model.apply({"params": params}, tokens, mask, decoder_tokens, decoder_mask,
                         deterministic=False, rngs={"dropout": jax.random.key(0)})
    eval_logits = model.apply({"params": params}, tokens, mask, decoder_tokens, decoder_mask)
    diff = np.abs(np.asarray(logits) - expected)[decoder_mask]
    assert diff.max() < 1e-4, diff.max()
    assert np.abs(np.asarray(eval_logits) - expected)[decoder_mask].max() > 1e-2


def test_dropout_draws_the_same_masks_under_remat():
    """Rematerialized layers redraw their masks in the backward pass: the same ones."""
    config = t5.T5Config.tiny()
    model, variables = _random_model(config, dropout_rate=0.1)
    remat_model = t5.T5(config, dropout_rate=0.1, remat=True)
    prefix = jax.random.normal(jax.random.key(1), (BATCH, 2, config.d_model))
    rng = jax.random.key(2)

    def loss(prefix, model):
        return jnp.sum(jnp.square(_dropout_logits(model, variables, rng, embedded_prefix=prefix)))

    remat_loss, remat_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, remat_model)))(prefix)
    expected_loss, expected_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, model)))(prefix)
    np.testing.assert_allclose(remat_loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(remat_grad, expected_grad, rtol=1e-5, atol=1e-5)
