"""The persona plug: a light user embedder whose soft tokens personalize a frozen LLM.

For one input x of user u with history h_1..h_n (oldest first):
  q      = E_query(instruction + query(x))            trainable sentence encoder, unit norm
  w_i    = softmax_i(q . E_hist(h_i))                 over the most recent `max_history` items
  P_u    = sum_i w_i * MLP_persona(E_hist(h_i))       persona embedding, LLM width
  I      = MLP_instruction(v)                         trained instruction vector, LLM width
and [I, P_u] enter the LLM as soft tokens, each rescaled to the RMS of the LLM's token embeddings
(derived from the embedding table, where the reference hard-codes T5-XXL's constants). With
`persona_tokens` k > 1, MLP_persona's output is k tokens wide; with `persona_tokens` 0 the plug is
the instruction token alone (the paper's ablation, no history read).
E_hist is frozen and precomputed (plug_jax.embed); only this module's parameters train.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from plug_jax.models import bert
from plug_jax.models.layers import constrain, dense

NUM_SOFT_TOKENS = 2  # [instruction, persona] by default


class ProjectorMLP(nn.Module):
    """Two Dense layers with a GELU between, encoder width -> LLM width."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.hidden, ("encoder_embed", "mlp"), use_bias=True, dtype=self.dtype,
                  name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return dense(self.out, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2")(x)


def aggregation_weights(query: jax.Array, history: jax.Array, history_mask: jax.Array):
    """Input-aware attention over history: [B,E], [B,H,E], [B,H] -> weights [B,H].

    A user with no history gets all-zero weights (hence a zero persona), not NaN.
    """
    history = history / jnp.maximum(jnp.linalg.norm(history, axis=-1, keepdims=True), 1e-12)
    scores = jnp.einsum("be,bhe->bh", query, history)
    scores = jnp.where(history_mask, scores, -jnp.inf)
    any_history = history_mask.any(axis=-1, keepdims=True)
    weights = jax.nn.softmax(jnp.where(any_history, scores, 0.0), axis=-1)
    return jnp.where(history_mask, weights, 0.0)


def rms_scale(x: jax.Array, target_rms: float, eps: float = 1e-12) -> jax.Array:
    """Rescales each vector to a given root-mean-square; the zero vector stays zero."""
    rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x / rms * target_rms


class UserEmbedder(nn.Module):
    """Query encoder + input-aware aggregator + projectors -> [B, 1 + persona_tokens, llm_width]
    soft tokens: the instruction token, then the persona."""

    encoder_config: bert.BertConfig
    llm_width: int
    soft_token_rms: float
    projector_hidden: int = 0  # 0: the LLM width
    train_query_encoder: bool = True  # the paper trains it; frozen, it needs no backward pass
    persona_tokens: int = 1  # 0: the instruction token alone
    dtype: Any = jnp.float32

    @property
    def num_soft_tokens(self) -> int:
        return 1 + self.persona_tokens

    def setup(self):
        hidden = self.projector_hidden or self.llm_width
        if self.persona_tokens:
            self.query_encoder = bert.Bert(self.encoder_config, dtype=self.dtype)
            self.persona_projector = ProjectorMLP(hidden, self.llm_width * self.persona_tokens,
                                                  dtype=self.dtype)
        self.instruction_projector = ProjectorMLP(hidden, self.llm_width, dtype=self.dtype)
        width = self.encoder_config.hidden_size
        self.instruction = self.param(
            "instruction", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                        ("encoder_embed",)), (width,))

    def encode_query(self, query_tokens, query_mask):
        hidden = self.query_encoder(query_tokens, query_mask)
        query = bert.pool(hidden, query_mask, self.encoder_config.pooling, normalize=True)
        return query if self.train_query_encoder else jax.lax.stop_gradient(query)

    def __call__(self, query_tokens, query_mask, history, history_mask, *, return_weights=False):
        batch = history.shape[0]
        instruction = self.instruction_projector(self.instruction)
        soft = jnp.broadcast_to(instruction, (batch, 1, self.llm_width))
        weights = jnp.zeros(history_mask.shape, jnp.float32)
        if self.persona_tokens:
            query = self.encode_query(query_tokens, query_mask)
            weights = aggregation_weights(query, history.astype(jnp.float32), history_mask)
            persona = jnp.einsum("bh,bhd->bd", weights,
                                 self.persona_projector(history.astype(self.dtype)))
            persona = persona.reshape(batch, self.persona_tokens, self.llm_width)
            soft = jnp.concatenate([soft, persona.astype(soft.dtype)], axis=1)
        soft = constrain(rms_scale(soft.astype(jnp.float32), self.soft_token_rms),
                         ("batch", "length", "embed"))
        return (soft, weights) if return_weights else soft


def embedding_rms(embedding_table: jax.Array) -> float:
    """RMS of the LLM's token embeddings: the scale soft tokens should live at."""
    table = jnp.asarray(embedding_table, jnp.float32)
    return float(jnp.sqrt(jnp.mean(jnp.square(table))))
