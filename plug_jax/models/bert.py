"""BERT sentence encoders (bge-base-en-v1.5, all-MiniLM-L6-v2, Contriever) for the user embedder.

PPlug encodes each past text of a user with a frozen sentence encoder and each query with a
trainable copy of it. This module is the post-LN BERT encoder (no pooler head), the pooling that
turns token states into L2-normalised sentence embeddings (a pure function, so the trainable side
can call it inside a jitted loss), loading of Hugging Face safetensors checkpoints, the tokenizer,
and `SentenceEncoder`, a batched `list[str] -> np.ndarray` for the frozen side.

Usage on the trainable side:

    config, params = load_bert(directory)
    model = Bert(config)
    hidden = model.apply({"params": params}, tokens, mask)       # [B, T, D]
    embeddings = pool(hidden, mask, config.pooling)               # [B, D] float32, unit norm
    # or in one call: model.apply({"params": params}, tokens, mask, method=Bert.embed)

`Bert(config, dropout_rate=0.1)` trains as HF's BertModel in train mode (hidden_dropout_prob and
attention_probs_dropout_prob both the rate: after the embeddings' LayerNorm, on the attention
probabilities, after the attention's and the FF's output projections) when applied with
deterministic=False and a 'dropout' rng; by default it is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from plug_jax import errors
from plug_jax.models import layers
from plug_jax.models.loading import (CheckpointError, Rule, SafetensorsSource, load_params,
                                     read_hf_config, transpose)

Dtype = Any
Pooling = Literal["cls", "mean"]

_ACTIVATIONS = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF BERT's "gelu" is the exact erf form
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
}
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}
# Checkpoints that are BERT encoders underneath; task heads around them are ignored when loading.
_CONTRIEVER_ARCHITECTURES = ("Contriever",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooling: Pooling = "mean"
    normalize: bool = True
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {self.pooling!r} is not 'cls' or 'mean'")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(
            cls,
            config: Mapping[str, Any],
            pooling: Pooling | None = None,
            *,
            directory: str | Path | None = None,
            normalize: bool = True,
    ) -> "BertConfig":
        """From a Hugging Face config.json dict.

        Pooling defaults to what the sentence-transformers Pooling module in `directory` says
        (bge: CLS, MiniLM: mean) and to "mean" where there is none. `directory` also names the file
        in error messages.
        """
        where = f"{Path(directory) / 'config.json'}" if directory is not None else "config.json"
        model_type = config.get("model_type")
        architectures = list(config.get("architectures") or [])
        if model_type != "bert":
            raise CheckpointError(
                    f"{where}: model_type {model_type!r} (architectures {architectures}) is not a BERT "
                    "encoder (supported: model_type 'bert', e.g. bge, all-MiniLM, Contriever)")
        for architecture in architectures:
            if not (architecture.startswith("Bert") or architecture in _CONTRIEVER_ARCHITECTURES):
                raise CheckpointError(f"{where}: architecture {architecture!r} is not a BERT encoder")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"{where}: position_embedding_type {position_type!r} is not supported")
        hidden_act = config.get("hidden_act", "gelu")
        if hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"{where}: hidden_act {hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if pooling is None:
            pooling = (read_pooling(directory) if directory is not None else None) or "mean"
        try:
            return cls(
                    vocab_size=config["vocab_size"],
                    hidden_size=config["hidden_size"],
                    num_layers=config["num_hidden_layers"],
                    num_heads=config["num_attention_heads"],
                    intermediate_size=config["intermediate_size"],
                    max_position_embeddings=config.get("max_position_embeddings", 512),
                    type_vocab_size=config.get("type_vocab_size", 2),
                    layer_norm_eps=config.get("layer_norm_eps", 1e-12),
                    hidden_act=hidden_act,
                    pooling=pooling,
                    normalize=normalize,
                    pad_token_id=config.get("pad_token_id") or 0,
            )
        except KeyError as e:
            raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None

    @classmethod
    def tiny(cls, pooling: Pooling = "mean", hidden_act: str = "gelu") -> "BertConfig":
        """A few-kilobyte BERT for tests."""
        return cls(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                   max_position_embeddings=64, type_vocab_size=2, hidden_act=hidden_act, pooling=pooling)


# BAAI/bge-*-en-v1.5 (BERT, CLS pooling) by checkpoint name, to plan without weights.
NAMED_CONFIGS = {
    "bge-small-en-v1.5": BertConfig(30522, 384, 12, 12, 1536, pooling="cls"),
    "bge-base-en-v1.5": BertConfig(30522, 768, 12, 12, 3072, pooling="cls"),
    "bge-large-en-v1.5": BertConfig(30522, 1024, 24, 16, 4096, pooling="cls"),
}


def read_pooling(directory: str | Path) -> Pooling | None:
    """The pooling of the sentence-transformers Pooling module in `directory`, if it has one."""
    directory = Path(directory)
    pooling_dir = directory / "1_Pooling"
    modules_path = directory / "modules.json"
    if modules_path.exists():
        modules = json.loads(modules_path.read_text())
        for module in modules:
            if module.get("type", "").endswith(".Pooling"):
                pooling_dir = directory / module.get("path", "1_Pooling")
                break
    path = pooling_dir / "config.json"
    if not path.exists():
        return None
    settings = json.loads(path.read_text())
    modes = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v is True]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise CheckpointError(f"{path}: pooling {sorted(modes)} is not supported (only one of CLS or mean)")
    return _POOLING_MODES[modes[0]]


# ---------------------------------------------------------------------------------------------
# Model.


def _layer_norm(config: BertConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
            epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def _embed(num: int, features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype,
           name: str) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""  # layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool = True) -> jax.Array:
        config = self.config
        batch, length, _ = x.shape

        def project(name: str) -> jax.Array:
            y = layers.dense(config.hidden_size, ("embed", "q_heads"), use_bias=True, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)(x)
            y = y.reshape(batch, length, config.num_heads, config.head_dim)
            return layers.constrain(y, ("batch", "length", "heads", "kv"))

        q, k, v = project("query"), project("key"), project("value")
        out = layers.dot_product_attention(
                q, k, v, bias, scale=config.head_dim ** -0.5, impl=self.attention_impl,
                weights_dropout=layers.training_dropout(nn.Dropout(self.dropout_rate),
                                                        deterministic))
        out = out.reshape(batch, length, config.hidden_size)
        return layers.dense(config.hidden_size, ("q_heads", "embed"), use_bias=True, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="output")(out)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool = True) -> jax.Array:
        config, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rate = self.dropout_rate
        attended = BertSelfAttention(config, **kw, dropout_rate=rate,
                                     attention_impl=self.attention_impl, name="attention")(
                x, bias, deterministic)
        attended = nn.Dropout(rate)(attended, deterministic)
        x = _layer_norm(config, **kw, name="attention_norm")(x + attended)
        x = layers.constrain(x, ("batch", "length", "embed"))
        h = layers.dense(config.intermediate_size, ("embed", "mlp"), use_bias=True, **kw,
                         name="intermediate")(x)
        h = layers.constrain(_ACTIVATIONS[config.hidden_act](h), ("batch", "length", "mlp"))
        h = layers.dense(config.hidden_size, ("mlp", "embed"), use_bias=True, **kw, name="output")(h)
        h = nn.Dropout(rate)(h, deterministic)
        x = _layer_norm(config, **kw, name="output_norm")(x + h)
        return layers.constrain(x, ("batch", "length", "embed"))


class Bert(nn.Module):
    """Post-LN BERT encoder returning the last hidden states (no pooler head); `dropout_rate`
    acts in calls with deterministic=False (and a 'dropout' rng) only."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""  # how attention runs (layers.ATTENTION_IMPLS)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, token_types: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """tokens, mask (True = real token), token_types: [B, T] -> hidden states [B, T, D]."""
        config, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if tokens.shape[1] > config.max_position_embeddings:
            raise ValueError(f"{tokens.shape[1]} tokens exceed max_position_embeddings "
                             f"{config.max_position_embeddings}")
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        positions = jnp.arange(tokens.shape[1])[None, :]
        x = (_embed(config.vocab_size, config.hidden_size, ("encoder_vocab", "embed"), **kw,
                    name="word_embeddings")(tokens)
             + _embed(config.max_position_embeddings, config.hidden_size, ("positions", "embed"), **kw,
                      name="position_embeddings")(positions)
             + _embed(config.type_vocab_size, config.hidden_size, ("types", "embed"), **kw,
                      name="token_type_embeddings")(token_types))
        x = _layer_norm(config, **kw, name="embeddings_norm")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic)
        x = layers.constrain(x, ("batch", "length", "embed"))
        bias = layers.mask_to_bias(mask.astype(bool)[:, None, :])  # keys only: [B, 1, 1, T]
        for i in range(config.num_layers):
            x = BertLayer(config, **kw, dropout_rate=self.dropout_rate,
                          attention_impl=self.attention_impl, name=f"layer_{i}")(
                    x, bias, deterministic)
        return x

    def embed(self, tokens: jax.Array, mask: jax.Array, token_types: jax.Array | None = None,
              deterministic: bool = True) -> jax.Array:
        """Sentence embeddings [B, D] in float32, pooled and normalised as the config says."""
        hidden = self(tokens, mask, token_types, deterministic)
        return pool(hidden, mask, self.config.pooling, self.config.normalize)


def pool(hidden: jax.Array, mask: jax.Array, pooling: Pooling, normalize: bool = True) -> jax.Array:
    """[B, T, D] hidden states -> [B, D] float32 sentence embeddings (CLS or mean over real tokens).

    Pure jnp and differentiable: safe inside a jitted loss. Rows without tokens give zeros, not NaN.
    """
    hidden = hidden.astype(jnp.float32)
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "mean":
        weights = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    else:
        raise ValueError(f"pooling {pooling!r} is not 'cls' or 'mean'")
    if normalize:
        # Same eps as torch.nn.functional.normalize; rsqrt keeps the gradient finite at zero.
        squared_norm = jnp.sum(pooled * pooled, axis=-1, keepdims=True)
        pooled = pooled * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-24))
    return pooled


_EXAMPLE_INPUTS = (np.zeros((1, 1), np.int32), np.zeros((1, 1), bool))  # tokens, mask


def init_params(config: BertConfig, rng: jax.Array, dtype: Dtype = jnp.float32) -> dict:
    """Random parameters (tests and smoke runs), unboxed."""
    return layers.init_params(Bert(config, param_dtype=dtype), rng, *_EXAMPLE_INPUTS)


def abstract_params(config: BertConfig, dtype: Dtype = jnp.float32) -> dict:
    return layers.abstract_params(Bert(config, param_dtype=dtype), *_EXAMPLE_INPUTS)


def param_logical_axes(config: BertConfig) -> dict:
    return layers.param_logical_axes(Bert(config), *_EXAMPLE_INPUTS)


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints.


def bert_rules(prefix: str = "") -> list[Rule]:
    """Rules from our parameter paths to HF tensor names; `prefix` is "bert." inside task models.

    HF names not asked for (the pooler, MLM heads, position_ids buffers) are ignored.
    """
    p = prefix
    layer = p + "encoder.layer.{}."
    return [
            (r"(word|position|token_type)_embeddings/embedding", p + "embeddings.{}_embeddings.weight", None),
            (r"embeddings_norm/scale", p + "embeddings.LayerNorm.weight", None),
            (r"embeddings_norm/bias", p + "embeddings.LayerNorm.bias", None),
            (r"layer_(\d+)/attention/(query|key|value)/kernel",
             layer + "attention.self.{}.weight", transpose),
            (r"layer_(\d+)/attention/(query|key|value)/bias", layer + "attention.self.{}.bias", None),
            (r"layer_(\d+)/attention/output/kernel", layer + "attention.output.dense.weight", transpose),
            (r"layer_(\d+)/attention/output/bias", layer + "attention.output.dense.bias", None),
            (r"layer_(\d+)/attention_norm/scale", layer + "attention.output.LayerNorm.weight", None),
            (r"layer_(\d+)/attention_norm/bias", layer + "attention.output.LayerNorm.bias", None),
            (r"layer_(\d+)/intermediate/kernel", layer + "intermediate.dense.weight", transpose),
            (r"layer_(\d+)/intermediate/bias", layer + "intermediate.dense.bias", None),
            (r"layer_(\d+)/output/kernel", layer + "output.dense.weight", transpose),
            (r"layer_(\d+)/output/bias", layer + "output.dense.bias", None),
            (r"layer_(\d+)/output_norm/scale", layer + "output.LayerNorm.weight", None),
            (r"layer_(\d+)/output_norm/bias", layer + "output.LayerNorm.bias", None),
    ]


BERT_RULES = bert_rules()


def load_bert(directory: str | Path, dtype: Dtype = jnp.float32,
              pooling: Pooling | None = None) -> tuple[BertConfig, dict]:
    """Config and parameters of a BERT checkpoint directory (config.json + safetensors).

    Reads both bare encoders ("embeddings.…", as BertModel saves) and task models ("bert.embeddings.…").
    """
    config = BertConfig.from_hf(read_hf_config(directory), pooling, directory=directory)
    source = SafetensorsSource(directory)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in source else ""
    params = load_params(abstract_params(config, dtype), source, bert_rules(prefix), dtype=dtype)
    return config, params


# ---------------------------------------------------------------------------------------------
# Tokenization and batched sentence encoding.


def bert_tokenizer(directory: str | Path) -> tokenizers.Tokenizer:
    """The WordPiece tokenizer of `directory`, with the file's own padding/truncation switched off.

    (all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128; `encode_batch` does both itself.)
    """
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (the fast tokenizer file is needed)")
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def encode_batch(
        tokenizer: tokenizers.Tokenizer,
        texts: Sequence[str],
        max_length: int,
        length: int | None = None,
        pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [B, T], mask bool [B, T]), "[CLS] … [SEP]" truncated to max_length.

    T is the longest encoding, or `length` when given (it must hold max_length tokens or the
    longest one). Sets the tokenizer's truncation to max_length.
    """
    truncation = tokenizer.truncation
    if truncation is None or truncation["max_length"] != max_length:
        tokenizer.enable_truncation(max_length)  # reserves room for [CLS] and [SEP]
    encodings = tokenizer.encode_batch(list(texts))
    longest = max((len(e.ids) for e in encodings), default=0)
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(f"length {length} is shorter than the longest encoding ({longest} tokens)")
    ids = np.full((len(encodings), length), pad_id, np.int32)
    mask = np.zeros((len(encodings), length), bool)
    for row, encoding in enumerate(encodings):
        ids[row, :len(encoding.ids)] = encoding.ids
        mask[row, :len(encoding.ids)] = True
    return ids, mask


def default_max_length(directory: str | Path, config: BertConfig) -> int:
    """sentence-transformers' max_seq_length when the directory has one (MiniLM: 256, bge: 512)."""
    path = Path(directory) / "sentence_bert_config.json"
    if path.exists():
        max_seq_length = json.loads(path.read_text()).get("max_seq_length")
        if max_seq_length:
            return min(int(max_seq_length), config.max_position_embeddings)
    return min(512, config.max_position_embeddings)


def _bucket(size: int, minimum: int, maximum: int) -> int:
    """Rounds up to a power of two within [minimum, maximum], so that few shapes get compiled."""
    return min(max(minimum, 1 << (max(size, 1) - 1).bit_length()), maximum)


class SentenceEncoder:
    """Frozen-side encoder: `encoder(texts) -> np.ndarray [N, D]` float32 unit vectors."""

    def __init__(
            self,
            config: BertConfig,
            params: Mapping,
            tokenizer: tokenizers.Tokenizer,
            max_length: int = 512,
            batch_size: int = 64,
            dtype: Dtype = jnp.float32,
    ):
        if max_length > config.max_position_embeddings:
            raise errors.ConfigError(f"max_length {max_length} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.model = Bert(config, dtype=dtype)
        self._embed = jax.jit(
                lambda params, tokens, mask: self.model.apply({"params": params}, tokens, mask,
                                                              method=Bert.embed))

    @classmethod
    def from_dir(
            cls,
            directory: str | Path,
            pooling: Pooling | None = None,
            max_length: int | None = None,
            batch_size: int = 64,
            dtype: Dtype = jnp.float32,
    ) -> "SentenceEncoder":
        config, params = load_bert(directory, dtype=dtype, pooling=pooling)
        return cls(config, params, bert_tokenizer(directory),
                   max_length=max_length or default_max_length(directory, config),
                   batch_size=batch_size, dtype=dtype)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # Tokenize once to sort by length, so that each batch wastes little padding.
        ids, mask = encode_batch(self.tokenizer, texts, self.max_length, pad_id=self.config.pad_token_id)
        lengths = mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            size = _bucket(len(rows), 1, self.batch_size)
            length = _bucket(int(lengths[rows].max()), 16, self.max_length)
            width = min(length, ids.shape[1])
            # Bucketed shapes: empty filler rows pool to zeros and are dropped.
            batch_ids = np.full((size, length), self.config.pad_token_id, np.int32)
            batch_mask = np.zeros((size, length), bool)
            batch_ids[:len(rows), :width] = ids[rows, :width]
            batch_mask[:len(rows), :width] = mask[rows, :width]
            embeddings = self._embed(self.params, batch_ids, batch_mask)
            out[rows] = np.asarray(embeddings[:len(rows)])
        return out
