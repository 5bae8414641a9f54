"""The persona plug: a light user embedder whose soft tokens personalize a frozen LLM.

For one input x of user u with history h_1..h_n (oldest first):
  q      = E_query(instruction + query(x))            trainable sentence encoder, unit norm
  w_i    = softmax_i(s * q . E_hist(h_i))             over the most recent `max_history` items
  P_u    = sum_i w_i * MLP_persona(E_hist(h_i))       persona embedding, LLM width
  I      = MLP_instruction(v)                         trained instruction vector, LLM width
  X      = MLP_input(q)                               optional: `input_tokens` > 0 (not in the reference)
and [I, P_u, X] enter the LLM as soft tokens, scaled by `soft_token_scale`:
  "rms"        each rescaled to the RMS of the LLM's token embeddings (ours: a fixed magnitude);
  "reference"  P_u * N and I * N / 7 (rucliujn/PPlug ModelForPer.py), N = soft_token_norm, so the
               magnitude stays learnable. The reference hard-codes N = 539.9738 for Flan-T5-XXL,
               about the mean L2 norm of its token embeddings (RMS ~8.44 x sqrt(4096)); we take N
               from the LLM's table (`embedding_norm`) unless the config pins it.
s is `attention_scale`: 1 in the reference, whose weights are then near uniform (cosines lie in
[-1, 1]); sentence encoders are trained with contrastive softmaxes of scale ~20 (MiniLM's
MultipleNegativesRankingLoss), which lets the weights pick items. `learn_attention_scale` makes
log s a trained parameter started there.
With `persona_tokens` k > 1, MLP_persona's output is k tokens wide; a plug without persona tokens
is the instruction token alone (the paper's ablation, `config.method` "instruction").
In the reference q only weighs the history, and the LLM reads the input as text alone. With
`input_tokens` k > 0, q itself also enters the LLM as k soft tokens: a small LLM that reads a
review's sentiment poorly gets the sentence encoder's reading of it. An instruction plug gets them
too, so that the persona plug against it still measures the history alone.
E_hist is frozen and precomputed (plug_jax.embed); only this module's parameters train.
`dropout_rate` is E_query's (BERT's hidden and attention dropout; the projectors have none),
on in calls with deterministic=False and a 'dropout' rng: the training loss's.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from plug_jax import errors
from plug_jax.models import bert
from plug_jax.models.layers import constrain, dense

NUM_SOFT_TOKENS = 2  # [instruction, persona] by default
REFERENCE_INSTRUCTION_DIVISOR = 7.0  # rucliujn/PPlug: inst_embs / 7.0 * 539.9738
SOFT_TOKEN_SCALES = ("rms", "reference")
INITS = ("default", "torch")


def torch_linear_init(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")(key, shape, dtype)


def torch_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                      bound)


class ProjectorMLP(nn.Module):
    """Two Dense layers with a GELU between, encoder width -> LLM width."""

    hidden: int
    out: int
    dtype: Any = jnp.float32
    param_init: str = "default"  # "torch": nn.Linear's init

    @nn.compact
    def __call__(self, x):
        def init(fan_in):
            if self.param_init == "torch":
                return dict(kernel_init=torch_linear_init, bias_init=torch_bias_init(fan_in))
            return {}

        x = dense(self.hidden, ("encoder_embed", "mlp"), use_bias=True, dtype=self.dtype,
                  name="fc1", **init(x.shape[-1]))(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2",
                     **init(self.hidden))(x)


def aggregation_weights(query: jax.Array, history: jax.Array, history_mask: jax.Array,
                        scale: jax.Array | float = 1.0):
    """Input-aware attention over history: [B,E], [B,H,E], [B,H] -> weights [B,H], a softmax of
    `scale` times the cosines.

    A user with no history gets all-zero weights (hence a zero persona), not NaN.
    """
    history = history / jnp.maximum(jnp.linalg.norm(history, axis=-1, keepdims=True), 1e-12)
    scores = scale * jnp.einsum("be,bhe->bh", query, history)
    scores = jnp.where(history_mask, scores, -jnp.inf)
    any_history = history_mask.any(axis=-1, keepdims=True)
    weights = jax.nn.softmax(jnp.where(any_history, scores, 0.0), axis=-1)
    return jnp.where(history_mask, weights, 0.0)


def check_config(plug_config) -> None:
    """ConfigError for config.plug values the UserEmbedder cannot take."""
    scale, init = plug_config.get("soft_token_scale", "rms"), plug_config.get("param_init", "default")
    if scale not in SOFT_TOKEN_SCALES:
        raise errors.ConfigError(f"config.plug.soft_token_scale {scale!r}: expected one of "
                                 f"{', '.join(SOFT_TOKEN_SCALES)}")
    if init not in INITS:
        raise errors.ConfigError(f"config.plug.param_init {init!r}: expected one of {', '.join(INITS)}")
    if plug_config.get("input_tokens", 0) < 0:
        raise errors.ConfigError(f"config.plug.input_tokens {plug_config.input_tokens}: expected "
                                 "0 (the reference) or more")
    if plug_config.get("persona_tokens", 1) < 1:
        raise errors.ConfigError(f"config.plug.persona_tokens {plug_config.persona_tokens}: expected "
                                 "1 or more (the instruction token alone: --config.method=instruction)")
    if not plug_config.get("attention_scale", 1.0) > 0:
        raise errors.ConfigError(f"config.plug.attention_scale {plug_config.attention_scale}: "
                                 "expected > 0")


def rms_scale(x: jax.Array, target_rms: float, eps: float = 1e-12) -> jax.Array:
    """Rescales each vector to a given root-mean-square; the zero vector stays zero."""
    rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x / rms * target_rms


class UserEmbedder(nn.Module):
    """Query encoder + input-aware aggregator + projectors -> [B, num_soft_tokens, llm_width]
    soft tokens: the instruction token, the persona, then the input's."""

    encoder_config: bert.BertConfig
    llm_width: int
    soft_token_rms: float
    projector_hidden: int = 0  # 0: the LLM width
    train_query_encoder: bool = True  # the paper trains it; frozen, it needs no backward pass
    persona_tokens: int = 1  # 0: the instruction token alone
    dtype: Any = jnp.float32
    soft_token_scale: str = "rms"  # or "reference" (see the module docstring)
    soft_token_norm: float = 0.0   # N of the "reference" scale
    param_init: str = "default"  # "torch": the reference's (nn.Linear kernels, torch.rand vector)
    dropout_rate: float = 0.0  # the query encoder's, with deterministic=False
    attention_scale: float = 1.0  # s of the aggregator's softmax (the reference: 1)
    learn_attention_scale: bool = False  # log s trains, from log(attention_scale)
    input_tokens: int = 0  # soft tokens projected from the query embedding (the reference: 0)

    @property
    def num_soft_tokens(self) -> int:
        return 1 + self.persona_tokens + self.input_tokens

    @property
    def encodes_query(self) -> bool:
        return bool(self.persona_tokens or self.input_tokens)

    def setup(self):
        if self.soft_token_scale not in SOFT_TOKEN_SCALES or self.param_init not in INITS:
            raise ValueError(f"soft_token_scale {self.soft_token_scale!r}, param_init "
                             f"{self.param_init!r}: expected one of {SOFT_TOKEN_SCALES}, {INITS}")
        hidden = self.projector_hidden or self.llm_width
        if self.attention_scale <= 0:
            raise ValueError(f"attention_scale {self.attention_scale}: expected > 0")
        if self.persona_tokens < 0 or self.input_tokens < 0:
            raise ValueError(f"persona_tokens {self.persona_tokens}, input_tokens "
                             f"{self.input_tokens}: expected 0 or more")
        if self.encodes_query:
            self.query_encoder = bert.Bert(self.encoder_config, dtype=self.dtype,
                                           dropout_rate=self.dropout_rate)
        if self.input_tokens:
            self.input_projector = ProjectorMLP(hidden, self.llm_width * self.input_tokens,
                                                dtype=self.dtype, param_init=self.param_init)
        if self.persona_tokens:
            if self.learn_attention_scale:
                self.attention_log_scale = self.param(
                    "attention_log_scale", nn.with_logical_partitioning(
                        nn.initializers.constant(math.log(self.attention_scale)), ()), ())
            self.persona_projector = ProjectorMLP(hidden, self.llm_width * self.persona_tokens,
                                                  dtype=self.dtype, param_init=self.param_init)
        self.instruction_projector = ProjectorMLP(hidden, self.llm_width, dtype=self.dtype,
                                                  param_init=self.param_init)
        width = self.encoder_config.hidden_size
        instruction_init = (nn.initializers.uniform(1.0) if self.param_init == "torch"
                            else nn.initializers.normal(1.0))
        self.instruction = self.param(
            "instruction", nn.with_logical_partitioning(instruction_init, ("encoder_embed",)),
            (width,))

    def encode_query(self, query_tokens, query_mask, deterministic: bool = True):
        hidden = self.query_encoder(query_tokens, query_mask, deterministic=deterministic)
        query = bert.pool(hidden, query_mask, self.encoder_config.pooling, normalize=True)
        return query if self.train_query_encoder else jax.lax.stop_gradient(query)

    def __call__(self, query_tokens, query_mask, history, history_mask, *, return_weights=False,
                 deterministic: bool = True):
        batch = history.shape[0]
        instruction = self.instruction_projector(self.instruction)
        soft = jnp.broadcast_to(instruction, (batch, 1, self.llm_width))
        weights = jnp.zeros(history_mask.shape, jnp.float32)
        query = (self.encode_query(query_tokens, query_mask, deterministic)
                 if self.encodes_query else None)
        if self.persona_tokens:
            scale = (jnp.exp(self.attention_log_scale) if self.learn_attention_scale
                     else self.attention_scale)
            weights = aggregation_weights(query, history.astype(jnp.float32), history_mask, scale)
            persona = jnp.einsum("bh,bhd->bd", weights,
                                 self.persona_projector(history.astype(self.dtype)))
            persona = persona.reshape(batch, self.persona_tokens, self.llm_width)
            soft = jnp.concatenate([soft, persona.astype(soft.dtype)], axis=1)
        if self.input_tokens:
            read = self.input_projector(query.astype(self.dtype))
            read = read.reshape(batch, self.input_tokens, self.llm_width)
            soft = jnp.concatenate([soft, read.astype(soft.dtype)], axis=1)
        soft = soft.astype(jnp.float32)
        if self.soft_token_scale == "reference":
            divisors = jnp.ones(soft.shape[1]).at[0].set(REFERENCE_INSTRUCTION_DIVISOR)
            soft = soft / divisors[:, None] * self.soft_token_norm
        else:
            soft = rms_scale(soft, self.soft_token_rms)
        soft = constrain(soft, ("batch", "length", "embed"))
        return (soft, weights) if return_weights else soft


def embedding_rms(embedding_table: jax.Array) -> float:
    """RMS of the LLM's token embeddings: the scale soft tokens should live at."""
    table = jnp.asarray(embedding_table, jnp.float32)
    return float(jnp.sqrt(jnp.mean(jnp.square(table))))


def encoder_embedding_rms(encoder_params) -> float | None:
    """RMS of a sentence encoder's word embeddings: a fingerprint that tells encoders of the same
    shape apart (None for abstract params)."""
    table = encoder_params["word_embeddings"]["embedding"]
    return None if isinstance(table, jax.ShapeDtypeStruct) else embedding_rms(table)


def embedding_norm(embedding_table: jax.Array) -> float:
    """Mean L2 norm of the LLM's token embeddings: N of the "reference" soft-token scale."""
    table = jnp.asarray(embedding_table, jnp.float32)
    return float(jnp.mean(jnp.linalg.norm(table, axis=-1)))


def soft_token_fields(plug_config, embedding_table: jax.Array | None) -> dict:
    """The UserEmbedder's soft-token fields from config.plug; None table: placeholders (shapes
    only, for an abstract build)."""
    scale = plug_config.get("soft_token_scale", "rms")
    norm = float(plug_config.get("soft_token_norm", 0.0))
    if embedding_table is None:
        return dict(soft_token_rms=1.0, soft_token_scale=scale, soft_token_norm=norm or 1.0)
    if scale == "reference" and not norm:
        norm = embedding_norm(embedding_table)
    return dict(soft_token_rms=embedding_rms(embedding_table), soft_token_scale=scale,
                soft_token_norm=norm)
