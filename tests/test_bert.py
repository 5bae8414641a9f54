"""plug_jax.models.bert against transformers' PyTorch BERT: tiny random models and all-MiniLM-L6-v2."""

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from plug_jax.models import assets, bert
from plug_jax.models.loading import CheckpointError

TOLERANCE = 1e-4


def _tiny_torch_bert(directory, model_class=transformers.BertModel, hidden_act="gelu"):
    """A tiny BERT with every weight random (LayerNorms included), saved as safetensors."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=40, type_vocab_size=2, hidden_act=hidden_act)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_scale = "LayerNorm.weight" in name
            param.copy_((1.0 if is_norm_scale else 0.0) + 0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").exists()
    return model


def _inputs(vocab_size=99):
    rng = np.random.default_rng(0)
    lengths = np.array([11, 6, 2])
    mask = np.arange(11)[None, :] < lengths[:, None]
    tokens = np.where(mask, rng.integers(1, vocab_size, mask.shape), 0).astype(np.int32)
    token_types = np.where(mask, rng.integers(0, 2, mask.shape), 0).astype(np.int32)
    return tokens, mask, token_types


def _torch_pool(hidden, mask, pooling):
    mask = torch.as_tensor(mask, dtype=hidden.dtype)[..., None]
    pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("model_class, hidden_act", [
        (transformers.BertModel, "gelu"),
        (transformers.BertModel, "gelu_new"),
        (transformers.BertForMaskedLM, "gelu"),  # "bert."-prefixed names and extra head tensors
])
def test_round_trip_matches_torch(tmp_path, model_class, hidden_act):
    torch_model = _tiny_torch_bert(tmp_path, model_class, hidden_act)
    encoder = torch_model if model_class is transformers.BertModel else torch_model.bert
    tokens, mask, token_types = _inputs()
    with torch.no_grad():
        expected = encoder(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                           attention_mask=torch.as_tensor(mask, dtype=torch.long),
                           token_type_ids=torch.as_tensor(token_types, dtype=torch.long)).last_hidden_state

    config, params = bert.load_bert(tmp_path)
    assert config.hidden_act == hidden_act and config.pooling == "mean"
    model = bert.Bert(config)
    hidden = model.apply({"params": params}, tokens, mask, token_types)
    np.testing.assert_allclose(np.asarray(hidden)[mask], expected.numpy()[mask], atol=TOLERANCE, rtol=0)

    for pooling in ("cls", "mean"):
        ours = bert.pool(hidden, jnp.asarray(mask), pooling)
        np.testing.assert_allclose(np.asarray(ours), _torch_pool(expected, mask, pooling),
                                   atol=TOLERANCE, rtol=0)
    embedded = model.apply({"params": params}, tokens, mask, token_types, method=bert.Bert.embed)
    np.testing.assert_allclose(np.asarray(embedded), _torch_pool(expected, mask, "mean"), atol=TOLERANCE)


def test_pooling_from_sentence_transformers_config(tmp_path):
    _tiny_torch_bert(tmp_path)
    pooling_dir = tmp_path / "1_Pooling"
    pooling_dir.mkdir()
    (pooling_dir / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert bert.load_bert(tmp_path)[0].pooling == "cls"  # as bge-base-en-v1.5 ships
    assert bert.load_bert(tmp_path, pooling="mean")[0].pooling == "mean"
    (pooling_dir / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(CheckpointError, match="pooling_mode_max_tokens"):
        bert.load_bert(tmp_path)


def test_query_side_is_trainable():
    """Gradients flow through Bert.apply + pool in a jitted loss, finite even for an empty row."""
    config = bert.BertConfig.tiny()
    model = bert.Bert(config)
    tokens = jnp.array([[101, 5, 6, 102], [0, 0, 0, 0]], jnp.int32) % config.vocab_size
    mask = jnp.array([[True] * 4, [False] * 4])
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                          model.init(jax.random.key(0), tokens, mask)["params"],
                          is_leaf=lambda x: hasattr(x, "unbox"))

    @functools.partial(jax.jit, static_argnums=1)
    def loss(params, attention_impl=""):
        hidden = model.clone(attention_impl=attention_impl).apply({"params": params}, tokens, mask)
        return jnp.sum(bert.pool(hidden, mask, "mean") * jnp.arange(config.hidden_size))

    grads = jax.grad(loss)(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["layer_0"]["attention"]["query"]["kernel"]).sum()) > 0
    assert jax.tree.structure(grads) == jax.tree.structure(bert.abstract_params(config))
    # jax.nn.dot_product_attention (the default) and our einsums compute the same.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                 grads, jax.grad(loss)(params, "einsum"))


def test_dropout_acts_in_train_mode_only_and_follows_its_rng():
    config = bert.BertConfig.tiny()
    params = bert.init_params(config, jax.random.key(0))
    tokens, mask, _ = _inputs(config.vocab_size)

    def hidden(rate, rng=None):
        train_mode = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
        apply = jax.jit(bert.Bert(config, dropout_rate=rate).apply, static_argnames="deterministic")
        return apply({"params": params}, tokens, mask, **train_mode)[mask]

    expected = hidden(0.0)
    np.testing.assert_array_equal(hidden(0.0, jax.random.key(1)), expected)
    np.testing.assert_array_equal(hidden(0.1), expected)
    dropped = hidden(0.1, jax.random.key(1))
    np.testing.assert_array_equal(hidden(0.1, jax.random.key(1)), dropped)
    assert np.abs(dropped - expected).max() > 1e-3
    assert np.abs(hidden(0.1, jax.random.key(2)) - dropped).max() > 1e-3


def test_dropout_acts_where_transformers_puts_it(tmp_path, keep_every_unit):
    """Masks that keep every unit leave train mode a 1/(1 - rate) scaling at each dropout site
    (hidden and attention-probability dropout): ours equals BertModel's in train mode."""
    del keep_every_unit
    _tiny_torch_bert(tmp_path)
    torch_model = transformers.BertModel.from_pretrained(
            tmp_path, attn_implementation="eager").train()
    rate = torch_model.config.hidden_dropout_prob
    assert rate == torch_model.config.attention_probs_dropout_prob == 0.1
    tokens, mask, token_types = _inputs()
    with torch.no_grad():
        expected = torch_model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                               attention_mask=torch.as_tensor(mask, dtype=torch.long),
                               token_type_ids=torch.as_tensor(token_types, dtype=torch.long)
                               ).last_hidden_state.numpy()[mask]
    config, params = bert.load_bert(tmp_path)
    model = bert.Bert(config, dropout_rate=rate)
    hidden = model.apply({"params": params}, tokens, mask, token_types, deterministic=False,
                         rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(np.asarray(hidden)[mask], expected, atol=TOLERANCE, rtol=0)
    eval_hidden = model.apply({"params": params}, tokens, mask, token_types)
    assert np.abs(np.asarray(eval_hidden)[mask] - expected).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2.

SENTENCES = [
        "A man is playing a guitar on stage.",
        "Someone performs a song with a guitar in front of an audience.",
        "The central bank raised interest rates by half a percentage point.",
        "Café au lait à Montréal — très bon!",
        "東京は日本の首都です。",
        "ok",
        "I ❤️ pizza 🍕 and naïve coöperation",
        " ".join(f"Sentence number {i} of a very long review that keeps going." for i in range(60)),
]
MAX_LENGTH = 256


@pytest.fixture(scope="module")
def minilm_dir():
    try:
        return assets.minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_minilm_tokenization_matches_transformers(minilm_dir):
    ours_ids, ours_mask = bert.encode_batch(bert.bert_tokenizer(minilm_dir), SENTENCES, MAX_LENGTH)
    hf = transformers.AutoTokenizer.from_pretrained(minilm_dir)(
            SENTENCES, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours_ids, hf["input_ids"])
    np.testing.assert_array_equal(ours_mask, hf["attention_mask"].astype(bool))
    assert ours_ids.shape[1] == MAX_LENGTH and ours_ids[-1, -1] == 102  # truncated, [SEP] kept
    assert ours_ids.dtype == np.int32 and ours_mask.dtype == bool

    fixed_ids, fixed_mask = bert.encode_batch(bert.bert_tokenizer(minilm_dir), SENTENCES[:2], 64, length=64)
    assert fixed_ids.shape == fixed_mask.shape == (2, 64)


def test_minilm_embeddings_match_torch(minilm_dir):
    encoder = bert.SentenceEncoder.from_dir(minilm_dir, batch_size=4)
    assert (encoder.dim, encoder.max_length, encoder.config.pooling) == (384, MAX_LENGTH, "mean")
    ours = encoder(SENTENCES)

    tokenized = transformers.AutoTokenizer.from_pretrained(minilm_dir)(
            SENTENCES, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    torch_model = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        hidden = torch_model(**tokenized).last_hidden_state
    expected = _torch_pool(hidden, tokenized["attention_mask"].numpy(), "mean")

    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    cosine_distance = 1.0 - np.sum(ours * expected, axis=-1) / np.linalg.norm(ours, axis=-1)
    print(f"max cosine distance to torch: {cosine_distance.max():.3g}")
    assert cosine_distance.max() < TOLERANCE, cosine_distance
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)

    similarity = ours @ ours.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    np.testing.assert_allclose(encoder(SENTENCES[2:4]), ours[2:4], atol=1e-5)  # order restored
    assert encoder([]).shape == (0, 384)


# ---------------------------------------------------------------------------------------------
# Errors.


def _rewrite_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _assert_one_line_error(directory, *fragments):
    with pytest.raises(CheckpointError) as info:
        bert.load_bert(directory)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_tensor(tmp_path):
    _tiny_torch_bert(tmp_path)
    name = "encoder.layer.1.output.dense.weight"
    _rewrite_tensors(tmp_path, lambda tensors: tensors.pop(name))
    _assert_one_line_error(tmp_path, name, str(tmp_path), "missing")


def test_wrong_shape(tmp_path):
    _tiny_torch_bert(tmp_path)
    name = "encoder.layer.0.attention.self.query.weight"
    _rewrite_tensors(tmp_path, lambda tensors: tensors.update({name: np.zeros((32, 31), np.float32)}))
    _assert_one_line_error(tmp_path, name, str(tmp_path), "has shape (32, 31)", "needs (32, 32)")


@pytest.mark.parametrize("model_type, architecture", [
        ("roberta", "RobertaModel"),
        ("bert", "LlamaForCausalLM"),
])
def test_unknown_architecture(tmp_path, model_type, architecture):
    _tiny_torch_bert(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(model_type=model_type, architectures=[architecture])
    config_path.write_text(json.dumps(config))
    _assert_one_line_error(tmp_path, architecture, str(config_path))
