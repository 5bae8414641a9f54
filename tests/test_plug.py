"""The user embedder: input-aware aggregation, projection and scaling of the soft tokens."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from plug_jax import errors, plug
from plug_jax.data import history as history_lib
from plug_jax.models import bert

ENCODER = dataclasses.replace(bert.BertConfig.tiny(), vocab_size=64, max_position_embeddings=16)


def _embedder(**overrides):
    fields = dict(encoder_config=ENCODER, llm_width=24, soft_token_rms=0.7, projector_hidden=16)
    return plug.UserEmbedder(**{**fields, **overrides})


def _jit(method):
    """A module's init or apply as one program: eager, each of its ops compiles on its own."""
    return jax.jit(method, static_argnames=("return_weights", "deterministic"))


def _inputs(batch=3, history=5, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, 64, (batch, 6)), jnp.int32)
    mask = jnp.ones((batch, 6), bool)
    vectors = jnp.asarray(rng.normal(size=(batch, history, ENCODER.hidden_size)), jnp.float32)
    history_mask = jnp.asarray(np.arange(history)[None] < np.array([[5], [2], [0]])[:batch])
    return tokens, mask, vectors, history_mask


def test_aggregation_weights_are_a_masked_softmax_of_cosines():
    query = np.array([[0.6, 0.8]])
    history = np.array([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    weights = plug.aggregation_weights(jnp.asarray(query), jnp.asarray(history),
                                       jnp.asarray([[True, True, False]]))
    # cosines: item 0 -> 0.6, item 1 -> 0.8, item 2 masked out.
    expected = np.exp([0.6, 0.8]) / np.exp([0.6, 0.8]).sum()
    np.testing.assert_allclose(weights[0], [expected[0], expected[1], 0.0], rtol=1e-6)


def test_the_attention_scale_sharpens_the_softmax_and_can_train():
    query = np.array([[0.6, 0.8]])
    history = np.array([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    weights = plug.aggregation_weights(jnp.asarray(query), jnp.asarray(history),
                                       jnp.asarray([[True, True, False]]), scale=20.0)
    expected = np.exp([12.0, 16.0]) / np.exp([12.0, 16.0]).sum()  # 20 x the cosines 0.6, 0.8
    np.testing.assert_allclose(weights[0], [expected[0], expected[1], 0.0], rtol=1e-5)

    tokens, mask, vectors, history_mask = _inputs()
    fixed, learned = _embedder(attention_scale=20.0), _embedder(attention_scale=20.0,
                                                                learn_attention_scale=True)
    params = nn.unbox(_jit(learned.init)(jax.random.key(0), tokens, mask, vectors, history_mask))
    assert float(params["params"]["attention_log_scale"]) == pytest.approx(np.log(20.0))
    _, sharp = _jit(learned.apply)(params, tokens, mask, vectors, history_mask,
                                   return_weights=True)
    without_scale = {"params": {k: v for k, v in params["params"].items()
                                if k != "attention_log_scale"}}
    _, same = _jit(fixed.apply)(without_scale, tokens, mask, vectors, history_mask,
                                return_weights=True)
    _, flat = _jit(_embedder().apply)(without_scale, tokens, mask, vectors, history_mask,
                                      return_weights=True)
    np.testing.assert_allclose(sharp, same, rtol=1e-5, atol=1e-7)
    assert sharp[0].max() > flat[0].max() + 0.1  # user 0's 5 items: the scale picks among them
    apply = _jit(learned.apply)
    grads = jax.grad(lambda p: jnp.sum(apply(p, tokens, mask, vectors, history_mask)[:, 1, 0]))(
        params)
    assert float(grads["params"]["attention_log_scale"]) != 0.0


def test_empty_history_gives_zero_persona_and_finite_gradients():
    module = _embedder()
    tokens, mask, vectors, history_mask = _inputs()
    params = _jit(module.init)(jax.random.key(0), tokens, mask, vectors, history_mask)
    soft, weights = _jit(module.apply)(params, tokens, mask, vectors, history_mask,
                                       return_weights=True)
    assert soft.shape == (3, plug.NUM_SOFT_TOKENS, 24)
    assert np.all(np.isfinite(soft))
    np.testing.assert_array_equal(weights[2], 0.0)      # user 2 has no history
    np.testing.assert_array_equal(soft[2, 1], 0.0)      # so no persona ...
    np.testing.assert_allclose(weights[:2].sum(-1), 1.0, rtol=1e-6)
    # ... and every soft token that is not zero sits at the LLM's embedding scale.
    rms = np.sqrt(np.mean(np.square(soft), axis=-1))
    np.testing.assert_allclose(rms[:, 0], 0.7, rtol=1e-4)
    np.testing.assert_allclose(rms[:2, 1], 0.7, rtol=1e-4)

    def loss(p):
        return jnp.sum(_jit(module.apply)(p, tokens, mask, vectors, history_mask) ** 2)

    grads = jax.grad(loss)(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_persona_depends_on_history_and_query():
    module = _embedder()
    tokens, mask, vectors, history_mask = _inputs()
    params = _jit(module.init)(jax.random.key(0), tokens, mask, vectors, history_mask)
    soft = _jit(module.apply)(params, tokens, mask, vectors, history_mask)
    other_history = _jit(module.apply)(params, tokens, mask, vectors[::-1], history_mask)
    other_query = _jit(module.apply)(params, tokens[:, ::-1], mask, vectors, history_mask)
    assert not np.allclose(soft[0, 1], other_history[0, 1])
    assert not np.allclose(soft[0, 1], other_query[0, 1])   # input-aware: the query reweighs
    np.testing.assert_allclose(soft[:, 0], other_history[:, 0])  # instruction: the same for all


def test_input_tokens_carry_the_query_to_the_llm_in_both_plugs():
    tokens, mask, vectors, history_mask = _inputs()
    for persona_tokens in (1, 0):  # the persona plug, and the instruction plug (its control)
        module = _embedder(persona_tokens=persona_tokens, input_tokens=2)
        params = _jit(module.init)(jax.random.key(0), tokens, mask, vectors, history_mask)
        apply = _jit(module.apply)
        soft = apply(params, tokens, mask, vectors, history_mask)
        assert soft.shape == (3, 1 + persona_tokens + 2, 24) and module.num_soft_tokens == soft.shape[1]
        read = soft[:, 1 + persona_tokens:]
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(read), -1)), 0.7, rtol=1e-4)
        np.testing.assert_allclose(apply(params, tokens, mask, vectors[::-1], history_mask)[
            :, 1 + persona_tokens:], read, rtol=1e-6)  # the input's tokens: not the history
        assert not np.allclose(apply(params, tokens[:, ::-1], mask, vectors, history_mask)[
            :, 1 + persona_tokens:], read)  # but the query
        query = module.apply(params, tokens, mask, method=module.encode_query)
        by_hand = plug.ProjectorMLP(16, 48).apply(
            {"params": nn.unbox(params["params"]["input_projector"])}, query).reshape(3, 2, 24)
        np.testing.assert_allclose(read, plug.rms_scale(by_hand, 0.7), rtol=1e-4, atol=1e-6)
        grads = jax.grad(lambda p: jnp.sum(apply(p, tokens, mask, vectors, history_mask)[:, -1]))(
            params)
        assert any(np.any(g != 0) for g in jax.tree.leaves(grads["params"]["query_encoder"]))
    with pytest.raises(errors.ConfigError, match="config.plug.input_tokens -1: expected 0"):
        plug.check_config(ml_collections.ConfigDict(dict(input_tokens=-1)))
    with pytest.raises(ValueError, match="input_tokens -1: expected 0 or more"):
        _embedder(input_tokens=-1).init(jax.random.key(0), tokens, mask, vectors, history_mask)


def test_dropout_reaches_the_query_encoder_in_train_mode_only():
    module = _embedder(dropout_rate=0.1)
    tokens, mask, vectors, history_mask = _inputs()
    params = _jit(module.init)(jax.random.key(0), tokens, mask, vectors, history_mask)
    soft = _jit(module.apply)(params, tokens, mask, vectors, history_mask)
    np.testing.assert_array_equal(
        _jit(_embedder().apply)(params, tokens, mask, vectors, history_mask), soft)
    trained = _jit(module.apply)(params, tokens, mask, vectors, history_mask,
                                 deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(trained[:2, 1], soft[:2, 1])  # the query reweighs the history
    np.testing.assert_array_equal(trained[:, 0], soft[:, 0])  # the projectors have no dropout


def test_frozen_query_encoder_gets_no_gradient():
    module = _embedder(train_query_encoder=False)
    tokens, mask, vectors, history_mask = _inputs()
    params = _jit(module.init)(jax.random.key(0), tokens, mask, vectors, history_mask)
    apply = _jit(module.apply)
    grads = jax.grad(lambda p: jnp.sum(apply(p, tokens, mask, vectors, history_mask)))(params)
    encoder_grads = jax.tree.leaves(grads["params"]["query_encoder"])
    assert all(np.all(g == 0) for g in encoder_grads)
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["params"]["persona_projector"]))


def test_embedding_rms():
    table = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert plug.embedding_rms(table) == pytest.approx(np.sqrt(25 / 4))


def test_history_table_keeps_the_most_recent_items_and_caches(tmp_path):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], np.float32)

    histories = [("a", "bb", "ccc"), ("bb", "dddd"), ()]
    table = history_lib.build_history_table(histories, encode, 2, "test-encoder", tmp_path,
                                      progress=False)
    assert len(table) == 4 and sum(len(c) for c in calls) == 4  # each distinct text once
    rows = table.rows(("a", "bb", "ccc"), max_history=2)           # oldest dropped
    vectors, mask = table.lookup(rows[None])
    np.testing.assert_array_equal(mask, [[True, True]])
    np.testing.assert_array_equal(vectors[0, :, 0], [2.0, 3.0])
    vectors, mask = table.lookup(table.rows((), max_history=2)[None])
    assert not mask.any() and not vectors.any()

    again = history_lib.build_history_table(histories, encode, 2, "test-encoder", tmp_path,
                                      progress=False)
    assert len(calls) == 1 and again.path == table.path            # read from the cache
    other = history_lib.build_history_table(histories, encode, 2, "another-encoder", tmp_path,
                                      progress=False)
    assert other.path != table.path and len(calls) == 2            # never a stale cache


def test_history_texts_are_encoded_longest_first_in_chunks_and_returned_in_order():
    chunks = []

    def encode(texts):
        chunks.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts], np.float32)

    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 200, size=50)]
    vectors = history_lib.encode_texts(texts, encode, 2, batch_size=8, progress=False)
    np.testing.assert_array_equal(vectors[:, 0], [len(t) for t in texts])
    assert [len(c) for c in chunks] == [8] * 6 + [2]
    lengths = [len(t) for chunk in chunks for t in chunk]
    assert lengths == sorted(lengths, reverse=True)  # each batch holds texts of similar length
    assert history_lib.encode_texts([], encode, 2, progress=False).shape == (0, 2)

