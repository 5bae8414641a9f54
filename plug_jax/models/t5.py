"""T5 encoder-decoder (v1.0 and v1.1 / Flan-T5) in Flax Linen, with soft-prefix encoder inputs.

PPlug personalizes a frozen Flan-T5 by prepending soft tokens to the encoder input (prompt-tuning
style): `encode(..., embedded_prefix=...)` places them before the token embeddings, so they take
relative positions 0..P-1 exactly as prepended tokens would.

Architecture as in Mesh TensorFlow / t5x: pre-norm blocks with RMSNorm, no attention scaling, a
bucketed relative position bias computed once per stack (the weights live in layer 0) and shared by
all its layers, none in cross-attention. v1.0 (relu, tied head) scales the decoder output by
d_model**-0.5 before the head; v1.1 (gated-gelu, untied head) does not.

Dropout (`dropout_rate`, HF's dropout_rate; 0 by default) where HF's T5 has it: on the embedded
inputs of each stack, the attention probabilities, the FF's hidden activation, each sublayer's
output before its residual add, and each stack's final-norm output. It acts only in calls with
deterministic=False and a 'dropout' rng: the reference trains its plug through the frozen T5 in
train mode, dropout on.

Decoding: `init_cache` gives self-attention keys/values for `max_length` decoder positions; cross-
attention keys/values are computed from `encoded` on every `decode` call unless
`T5.cache_cross_attention` has stored them in the cache once (do that for generation: recomputing
them costs a full encoder-length projection per layer and step). Every cache leaf has batch as its
leading axis, so beam search reorders a cache with one gather per leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from plug_jax.models import assets
from plug_jax.models import layers
from plug_jax.models.loading import CheckpointError, Rule, SafetensorsSource, load_params
from plug_jax.models.loading import read_hf_config, transpose

Dtype = Any
Cache = dict[str, Any]

# HF's ACT2FN names. 'gated-gelu' means the tanh approximation ('gelu_new'), as in HF and mesh TF.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
        "relu": jax.nn.relu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
        "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
}
_MODEL_TYPES = ("t5", "mt5")
_ARCHITECTURES = ("T5ForConditionalGeneration", "T5WithLMHeadModel", "MT5ForConditionalGeneration")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Defaults are Flan-T5-XXL's."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_decoder_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    # Tied: the LM head is the shared embedding. Scaling by d_model**-0.5 goes with tying in T5
    # v1.0; transformers >= 5 writes it as its own flag (and always says tied): two fields.
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        malformed = len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated")
        if malformed or parts[-1] not in _ACTIVATIONS:
            raise ValueError(f"unsupported feed_forward_proj {self.feed_forward_proj!r} "
                             f"(expected ACT or gated-ACT with ACT in {sorted(_ACTIVATIONS)})")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> T5Config:
        """From a Hugging Face config.json dict."""
        model_type = config.get("model_type")
        architectures = list(config.get("architectures") or [])
        if model_type not in _MODEL_TYPES or any(a not in _ARCHITECTURES for a in architectures):
            raise CheckpointError(
                    f"config.json: model_type {model_type!r} with architectures {architectures} "
                    f"is not a T5 encoder-decoder (expected model_type in {_MODEL_TYPES}, "
                    f"architectures in {_ARCHITECTURES})")
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
                   if k not in config]
        if missing:
            raise CheckpointError(f"config.json: missing {missing} for a T5 model")
        tie = config.get("tie_word_embeddings", True)
        get = config.get
        eos = config.get("eos_token_id", 1)
        pad = config.get("pad_token_id", 0)
        try:
            return cls(
                    vocab_size=config["vocab_size"],
                    d_model=config["d_model"],
                    d_kv=config["d_kv"],
                    d_ff=config["d_ff"],
                    num_layers=config["num_layers"],
                    num_decoder_layers=get("num_decoder_layers") or config["num_layers"],
                    num_heads=config["num_heads"],
                    relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=get("relative_attention_max_distance", 128),
                    feed_forward_proj=get("feed_forward_proj", "relu"),
                    tie_word_embeddings=tie,
                    scale_decoder_outputs=get("scale_decoder_outputs", tie),
                    layer_norm_epsilon=get("layer_norm_epsilon", 1e-6),
                    pad_token_id=pad,
                    eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
                    decoder_start_token_id=get("decoder_start_token_id", pad),
            )
        except ValueError as e:
            raise CheckpointError(f"config.json: {e}") from None

    @classmethod
    def tiny(cls, **overrides) -> T5Config:
        """A few-thousand-parameter v1.1-style model for tests."""
        fields = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16)
        return cls(**{**fields, **overrides})


# Flan-T5 sizes (the v1.1 architecture) by checkpoint name, to plan without weights; the defaults of
# T5Config are XXL's.
NAMED_CONFIGS = {
    "flan-t5-xxl": T5Config(),
    "flan-t5-xl": T5Config(d_model=2048, d_ff=5120, num_heads=32),
    "flan-t5-large": T5Config(d_model=1024, d_ff=2816, num_heads=16),
    "flan-t5-base": T5Config(d_model=768, d_ff=2048, num_heads=12, num_layers=12,
                             num_decoder_layers=12),
}


# ---------------------------------------------------------------------------------------------
# Building blocks.


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Mesh TensorFlow's bucketing of (key position - query position) into [0, num_buckets).

    Half the buckets hold exact small distances, the rest log-spaced distances up to max_distance.
    Bidirectional splits the buckets between keys before and after the query; causal maps all
    future keys to bucket 0. Float32 steps in the same order as HF, so boundaries agree exactly.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    # The floor of 1 keeps log finite where the exact branch is taken anyway.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
    log_bucket = (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    log_bucket = max_exact + log_bucket.astype(relative_position.dtype)
    log_bucket = jnp.minimum(log_bucket, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each relative-position bucket."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """query_positions [b, q] (b: 1 or batch), key_positions [k] -> f32 [b, heads, q, k]."""
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                            ("relpos_buckets", "heads"))
        embedding = self.param("embedding", init, (self.num_buckets, self.num_heads),
                               self.param_dtype)
        buckets = relative_position_bucket(
                key_positions[None, None, :] - query_positions[:, :, None],
                bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                max_distance=self.max_distance)
        bias = jnp.take(embedding, buckets, axis=0)  # [b, q, k, heads]
        return jnp.transpose(bias, (0, 3, 1, 2)).astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head attention without query scaling; keys/values are projected by `keys_values`."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""  # layers.ATTENTION_IMPLS

    def setup(self):
        inner = self.config.num_heads * self.config.d_kv
        dense = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        self.query = dense(inner, ("embed", "q_heads"))
        self.key = dense(inner, ("embed", "q_heads"))
        self.value = dense(inner, ("embed", "q_heads"))
        self.out = dense(self.config.d_model, ("q_heads", "embed"))
        self.weights_dropout = nn.Dropout(self.dropout_rate)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

    def keys_values(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, length, d_model] -> keys, values [batch, length, heads, d_kv]."""
        return self._split_heads(self.key(inputs)), self._split_heads(self.value(inputs))

    def __call__(self, inputs_q: jax.Array, keys_values: tuple[jax.Array, jax.Array],
                 bias: jax.Array, deterministic: bool = True) -> jax.Array:
        keys, values = keys_values
        queries = self._split_heads(self.query(inputs_q))
        out = layers.dot_product_attention(
                queries, keys.astype(self.dtype), values.astype(self.dtype), bias, scale=None,
                impl=self.attention_impl,
                weights_dropout=layers.training_dropout(self.weights_dropout, deterministic))
        return self.out(out.reshape(*out.shape[:2], -1))


class MLP(nn.Module):
    """wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dense = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        activation = _ACTIVATIONS[self.config.activation]
        d_ff = self.config.d_ff
        if self.config.is_gated:
            hidden = (activation(dense(d_ff, ("embed", "mlp"), name="wi_0")(x))
                      * dense(d_ff, ("embed", "mlp"), name="wi_1")(x))
        else:
            hidden = activation(dense(d_ff, ("embed", "mlp"), name="wi")(x))
        hidden = layers.constrain(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic)
        return dense(self.config.d_model, ("mlp", "embed"), name="wo")(hidden)


def _norm(config: T5Config, dtype: Dtype, param_dtype: Dtype,
          name: str | None = None) -> layers.RMSNorm:
    return layers.RMSNorm(eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                          name=name)


def _constrain_residual(x: jax.Array) -> jax.Array:
    return layers.constrain(x, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool = True) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rate = self.dropout_rate
        attention = Attention(self.config, **kwargs, dropout_rate=rate,
                              attention_impl=self.attention_impl, name="attention")
        h = _norm(self.config, **kwargs, name="pre_attention_norm")(x)
        attended = attention(h, attention.keys_values(h), bias, deterministic)
        x = _constrain_residual(x + nn.Dropout(rate)(attended, deterministic))
        h = _norm(self.config, **kwargs, name="pre_mlp_norm")(x)
        h = MLP(self.config, **kwargs, dropout_rate=rate, name="mlp")(h, deterministic)
        return _constrain_residual(x + nn.Dropout(rate)(h, deterministic))


def _write_at(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """buffer [B, L, ...] with update [B, S, ...] written at positions index[b]..index[b]+S-1."""
    def write_row(row, row_update, row_index):
        return jax.lax.dynamic_update_slice_in_dim(row, row_update.astype(row.dtype), row_index, 0)

    return jax.vmap(write_row)(buffer, update, index)


class DecoderLayer(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""

    def setup(self):
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rate = self.dropout_rate
        self.pre_self_attention_norm = _norm(self.config, **kwargs)
        attention = functools.partial(Attention, self.config, **kwargs, dropout_rate=rate,
                                      attention_impl=self.attention_impl)
        self.self_attention = attention()
        self.self_attention_dropout = nn.Dropout(rate)
        self.pre_cross_attention_norm = _norm(self.config, **kwargs)
        self.cross_attention = attention()
        self.cross_attention_dropout = nn.Dropout(rate)
        self.pre_mlp_norm = _norm(self.config, **kwargs)
        self.mlp = MLP(self.config, **kwargs, dropout_rate=rate)
        self.mlp_dropout = nn.Dropout(rate)

    def cross_keys_values(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross_attention.keys_values(encoded)

    def __call__(self, x, self_bias, cross_bias, encoded, cross_kv, self_cache, cache_index,
                 deterministic=True):
        """Returns (x, new self-attention cache or None). Give `encoded` or precomputed cross_kv."""
        h = self.pre_self_attention_norm(x)
        keys, values = self.self_attention.keys_values(h)
        new_cache = None
        if self_cache is not None:
            keys = _write_at(self_cache["key"], keys, cache_index)
            values = _write_at(self_cache["value"], values, cache_index)
            new_cache = {"key": keys, "value": values}
        attended = self.self_attention(h, (keys, values), self_bias, deterministic)
        x = _constrain_residual(x + self.self_attention_dropout(attended, deterministic))
        if cross_kv is None:
            cross_kv = self.cross_keys_values(encoded)
        h = self.pre_cross_attention_norm(x)
        attended = self.cross_attention(h, cross_kv, cross_bias, deterministic)
        x = _constrain_residual(x + self.cross_attention_dropout(attended, deterministic))
        h = self.mlp(self.pre_mlp_norm(x), deterministic)
        x = _constrain_residual(x + self.mlp_dropout(h, deterministic))
        return x, new_cache


class Encoder(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = ""
    dropout_rate: float = 0.0
    attention_impl: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Embedded inputs [B, T, D], mask [B, T] -> encoded [B, T, D]."""
        config = self.config
        positions = jnp.arange(x.shape[1])
        bias = RelativePositionBias(
                config.relative_attention_num_buckets, config.relative_attention_max_distance,
                config.num_heads, bidirectional=True, param_dtype=self.param_dtype,
                name="relpos_bias")(positions[None], positions)
        # Padding masks keys only, as HF does: padded rows stay finite and are ignored downstream.
        bias = bias + layers.mask_to_bias(mask[:, None, :])
        layer_cls = (layers.remat(EncoderLayer, self.remat_policy, static_argnums=(3,))
                     if self.remat else EncoderLayer)
        x = _constrain_residual(nn.Dropout(self.dropout_rate)(x, deterministic))
        for i in range(config.num_layers):
            x = layer_cls(config, self.dtype, self.param_dtype, self.dropout_rate,
                          self.attention_impl, name=f"layers_{i}")(x, bias, deterministic)
        x = _norm(config, self.dtype, self.param_dtype, name="final_norm")(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic)


class Decoder(nn.Module):
    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = ""
    dropout_rate: float = 0.0
    attention_impl: str = ""

    def setup(self):
        config = self.config
        self.relpos_bias = RelativePositionBias(
                config.relative_attention_num_buckets, config.relative_attention_max_distance,
                config.num_heads, bidirectional=False, param_dtype=self.param_dtype)
        layer_cls = (layers.remat(DecoderLayer, self.remat_policy, static_argnums=(8,))
                     if self.remat else DecoderLayer)
        self.layers = [layer_cls(config, self.dtype, self.param_dtype, self.dropout_rate,
                                 self.attention_impl)
                       for _ in range(config.num_decoder_layers)]
        self.final_norm = _norm(config, self.dtype, self.param_dtype)
        self.input_dropout = nn.Dropout(self.dropout_rate)
        self.output_dropout = nn.Dropout(self.dropout_rate)

    def cross_keys_values(self, encoded: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        return [layer.cross_keys_values(encoded) for layer in self.layers]

    def __call__(self, x, encoder_mask, encoded, cross_kv, decoder_mask, cache,
                 deterministic=True):
        """Embedded decoder inputs [B, S, D] -> (hidden [B, S, D], new cache or None)."""
        batch, length = x.shape[:2]
        if decoder_mask is None:
            decoder_mask = jnp.ones((batch, length), bool)
        if cache is None:
            query_positions = jnp.arange(length)[None]
            key_positions = jnp.arange(length)
            key_mask = decoder_mask
            index = None
        else:
            index = cache["index"]
            query_positions = index[:, None] + jnp.arange(length)
            key_positions = jnp.arange(cache["key_mask"].shape[1])
            key_mask = _write_at(cache["key_mask"], decoder_mask, index)
        causal = key_positions[None, None, :] <= query_positions[:, :, None]
        allowed = causal & key_mask[:, None, :]
        self_bias = self.relpos_bias(query_positions, key_positions) + layers.mask_to_bias(allowed)
        cross_bias = layers.mask_to_bias(encoder_mask[:, None, :])

        x = _constrain_residual(self.input_dropout(x, deterministic))
        new_self_caches = []
        for i, layer in enumerate(self.layers):
            x, new_self_cache = layer(
                    x, self_bias, cross_bias, encoded, None if cross_kv is None else cross_kv[i],
                    None if cache is None else cache["self_attention"][i], index, deterministic)
            new_self_caches.append(new_self_cache)
        x = self.output_dropout(self.final_norm(x), deterministic)
        if cache is None:
            return x, None
        new_cache = {**cache, "index": index + length, "key_mask": key_mask,
                     "self_attention": new_self_caches}
        return x, new_cache


# ---------------------------------------------------------------------------------------------


class T5(nn.Module):
    """T5 for conditional generation. `remat` rematerializes each layer in the backward pass,
    keeping what `remat_policy` (layers.REMAT_POLICIES) names. `dropout_rate` acts in calls with
    deterministic=False (and a 'dropout' rng) only; `attention_impl` is how attention runs
    (layers.ATTENTION_IMPLS)."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    remat_policy: str = ""
    dropout_rate: float = 0.0
    attention_impl: str = ""

    def setup(self):
        config = self.config
        self.token_embedder = nn.Embed(
                config.vocab_size, config.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                            ("vocab", "embed")))
        stack = (config, self.dtype, self.param_dtype, self.remat, self.remat_policy,
                 self.dropout_rate, self.attention_impl)
        self.encoder = Encoder(*stack)
        self.decoder = Decoder(*stack)
        if not config.tie_word_embeddings:
            self.lm_head = self.param(
                    "lm_head",
                    nn.with_logical_partitioning(nn.initializers.normal(config.d_model**-0.5),
                                                 ("embed", "vocab")),
                    (config.d_model, config.vocab_size), self.param_dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, d_model] input embeddings (the soft prefix lives in this space)."""
        return self.token_embedder(tokens)

    def encode(self, tokens: jax.Array, mask: jax.Array, *,
               embedded_prefix: jax.Array | None = None, prefix_mask: jax.Array | None = None,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """tokens, mask [B, T]; embedded_prefix [B, P, D] goes before the tokens.

        Returns encoded [B, P+T, D] and its mask [B, P+T]: prefix_mask (default all True), mask.
        """
        x = self.embed_tokens(tokens)
        mask = mask.astype(bool)
        if embedded_prefix is not None:
            if prefix_mask is None:
                prefix_mask = jnp.ones(embedded_prefix.shape[:2], bool)
            x = jnp.concatenate([embedded_prefix.astype(x.dtype), x], axis=1)
            mask = jnp.concatenate([prefix_mask.astype(bool), mask], axis=1)
        return self.encoder(x, mask, deterministic), mask

    def cache_cross_attention(self, encoded: jax.Array, cache: Cache) -> Cache:
        """Adds every decoder layer's cross-attention keys/values [B, P+T, heads, d_kv] to `cache`.

        `decode` with such a cache ignores `encoded` (pass None).
        """
        dtype = cache["self_attention"][0]["key"].dtype
        cross = [{"key": k.astype(dtype), "value": v.astype(dtype)}
                 for k, v in self.decoder.cross_keys_values(encoded)]
        return {**cache, "cross_attention": cross}

    def decode(self, decoder_tokens: jax.Array, encoded: jax.Array | None,
               encoder_mask: jax.Array, *, decoder_mask: jax.Array | None = None,
               cache: Cache | None = None,
               deterministic: bool = True) -> tuple[jax.Array, Cache | None]:
        """decoder_tokens [B, S] -> (f32 logits [B, S, V], new cache or None).

        Without a cache, positions are 0..S-1 with causal attention (teacher forcing). With one, the
        tokens sit at cache['index'] + 0..S-1 and their keys/values are written there.
        decoder_mask [B, S] marks valid decoder tokens (keys); default all valid.
        """
        cross_kv = None
        if cache is not None and "cross_attention" in cache:
            cross_kv = [(c["key"], c["value"]) for c in cache["cross_attention"]]
        if decoder_mask is not None:
            decoder_mask = decoder_mask.astype(bool)
        x, new_cache = self.decoder(self.embed_tokens(decoder_tokens), encoder_mask.astype(bool),
                                    encoded, cross_kv, decoder_mask, cache, deterministic)
        if self.config.scale_decoder_outputs:
            x = x * self.config.d_model**-0.5
        if self.config.tie_word_embeddings:
            head, spec = self.token_embedder.embedding, "bsd,vd->bsv"
        else:
            head, spec = self.lm_head, "bsd,dv->bsv"
        # Low-precision inputs, f32 accumulation and output: the loss needs f32 logits.
        logits = jnp.einsum(spec, x.astype(self.dtype), head.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return layers.constrain(logits, ("batch", "length", "vocab")), new_cache

    def __call__(self, tokens: jax.Array, mask: jax.Array, decoder_tokens: jax.Array,
                 decoder_mask: jax.Array | None = None, *, embedded_prefix: jax.Array | None = None,
                 prefix_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Teacher forcing: decoder_tokens = shift_right(targets). Returns f32 logits [B, S, V]."""
        encoded, encoder_mask = self.encode(tokens, mask, embedded_prefix=embedded_prefix,
                                            prefix_mask=prefix_mask, deterministic=deterministic)
        logits, _ = self.decode(decoder_tokens, encoded, encoder_mask, decoder_mask=decoder_mask,
                                deterministic=deterministic)
        return logits


def shift_right(targets: jax.Array, decoder_start_id: int) -> jax.Array:
    """[B, S] targets -> decoder inputs: decoder_start_id, then targets[:, :-1]."""
    start = jnp.full((targets.shape[0], 1), decoder_start_id, targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def init_cache(config: T5Config, batch: int, max_length: int, dtype: Dtype = jnp.bfloat16) -> Cache:
    """Empty decoder cache for `max_length` positions; every leaf has batch as its leading axis.

    {'index': [B] int32 (next position), 'key_mask': [B, max_length] bool (written, valid keys),
     'self_attention': per decoder layer {'key', 'value'}: [B, max_length, heads, d_kv]}.
    Writing past max_length is not checked (dynamic_update_slice would clamp): size it for the
    longest decode.
    """
    shape = (batch, max_length, config.num_heads, config.d_kv)
    return {
            "index": jnp.zeros((batch,), jnp.int32),
            "key_mask": jnp.zeros((batch, max_length), bool),
            "self_attention": [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                               for _ in range(config.num_decoder_layers)],
    }


_EXAMPLE_TOKENS, _EXAMPLE_MASK = np.zeros((1, 1), np.int32), np.ones((1, 1), bool)
_EXAMPLE_INPUTS = (_EXAMPLE_TOKENS, _EXAMPLE_MASK, _EXAMPLE_TOKENS, _EXAMPLE_MASK)  # encoder, decoder


def init_params(config: T5Config, rng: jax.Array, dtype: Dtype = jnp.float32) -> dict:
    """Random parameters (tests and smoke runs), unboxed."""
    return layers.init_params(T5(config, param_dtype=dtype), rng, *_EXAMPLE_INPUTS)


def abstract_params(config: T5Config, dtype: Dtype = jnp.float32) -> dict:
    return layers.abstract_params(T5(config, param_dtype=dtype), *_EXAMPLE_INPUTS)


def param_logical_axes(config: T5Config) -> dict:
    return layers.param_logical_axes(T5(config), *_EXAMPLE_INPUTS)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints. Torch Linear weights are [out, in]; our kernels are [in, out].
# HF's encoder.embed_tokens / decoder.embed_tokens are shared.weight under other names: not read.

_PROJECTIONS = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))


def _attention_rules(ours: str, hf: str) -> list[Rule]:
    return [(rf"{ours}/{name}/kernel", f"{hf}.{hf_name}.weight", transpose)
            for name, hf_name in _PROJECTIONS]


T5_RULES: tuple[Rule, ...] = (
        ("token_embedder/embedding", "shared.weight", None),
        ("lm_head", "lm_head.weight", transpose),
        (r"(encoder|decoder)/relpos_bias/embedding",
         "{0}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None),
        (r"(encoder|decoder)/final_norm/scale", "{0}.final_layer_norm.weight", None),
        *_attention_rules(r"encoder/layers_(\d+)/attention",
                          "encoder.block.{0}.layer.0.SelfAttention"),
        (r"encoder/layers_(\d+)/pre_attention_norm/scale",
         "encoder.block.{0}.layer.0.layer_norm.weight", None),
        (r"encoder/layers_(\d+)/pre_mlp_norm/scale",
         "encoder.block.{0}.layer.1.layer_norm.weight", None),
        (r"encoder/layers_(\d+)/mlp/(wi|wi_0|wi_1|wo)/kernel",
         "encoder.block.{0}.layer.1.DenseReluDense.{1}.weight", transpose),
        *_attention_rules(r"decoder/layers_(\d+)/self_attention",
                          "decoder.block.{0}.layer.0.SelfAttention"),
        *_attention_rules(r"decoder/layers_(\d+)/cross_attention",
                          "decoder.block.{0}.layer.1.EncDecAttention"),
        (r"decoder/layers_(\d+)/pre_self_attention_norm/scale",
         "decoder.block.{0}.layer.0.layer_norm.weight", None),
        (r"decoder/layers_(\d+)/pre_cross_attention_norm/scale",
         "decoder.block.{0}.layer.1.layer_norm.weight", None),
        (r"decoder/layers_(\d+)/pre_mlp_norm/scale", "decoder.block.{0}.layer.2.layer_norm.weight",
         None),
        (r"decoder/layers_(\d+)/mlp/(wi|wi_0|wi_1|wo)/kernel",
         "decoder.block.{0}.layer.2.DenseReluDense.{1}.weight", transpose),
)


def load_t5(directory: str | Path, dtype: Dtype = jnp.bfloat16, *,
            shardings: Mapping | None = None) -> tuple[T5Config, dict]:
    """(config, params) from a HF directory: config.json + model.safetensors or a sharded index.

    The head is untied when config.json says so or the checkpoint has its own lm_head.weight
    (transformers >= 5 writes tie_word_embeddings=true for every T5 but saves an untied head).
    """
    config = T5Config.from_hf(read_hf_config(directory))
    source = SafetensorsSource(directory)
    tied = config.tie_word_embeddings and "lm_head.weight" not in source
    config = dataclasses.replace(config, tie_word_embeddings=tied)
    if callable(shardings):  # shardings follow from the config, known only now
        shardings = shardings(config)
    params = load_params(abstract_params(config, dtype), source, T5_RULES, dtype=dtype,
                         shardings=shardings)
    return config, params


def t5_tokenizer() -> tokenizers.Tokenizer:
    """The T5 SentencePiece (unigram) tokenizer; encode() appends </s> (id 1), pad is 0."""
    tokenizer = tokenizers.Tokenizer.from_file(str(assets.t5_tokenizer_json()))
    # The shipped file pads and truncates everything to 256 tokens; batching is the caller's job.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
