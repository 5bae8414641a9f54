"""Model-agnostic autoregressive decoding (greedy and beam search) behind a callback.

The model is seen only through `tokens_to_logits(tokens [B, 1] int32, cache) -> (logits [B, V]
float32, new_cache)`. The cache is any pytree whose every leaf has the batch (B, or B * num_beams
during beam search) as its leading axis, and `tokens_to_logits` must return it with the same
structure, shapes and dtypes (it is the carry of a `lax.while_loop`).

The caller prefills the prompt itself and passes the logits of the prompt's last position as
`initial_logits` [B, V] together with the cache after prefill, so decoding never re-encodes the
prompt and calls the model `max_new_tokens - 1` times at most: the first token comes from
`initial_logits` and the last sampled token is never fed back.

`tokens_to_logits` may close over traced values (e.g. the frozen LLM's params inside a jitted
`generate(params, batch)`); `max_new_tokens`, `eos_id`, `pad_id` and `num_beams` are Python ints,
static under `jax.jit`. Everything runs in `lax` loops, so a jitted caller compiles once per shape.

Beam search follows the alive/finished scheme of t5x and Hugging Face `generate`:
  * each step takes the top 2 * num_beams continuations of all alive beams; the best num_beams
    that do not end in EOS become the new alive beams;
  * a continuation ending in EOS is offered to the finished set (a running top-num_beams) only if
    it ranks among the top num_beams continuations of the step, as in HF; with this rule
    num_beams=1 and length_penalty=0 reproduces greedy decoding;
  * score = sum of token log-probs / length ** length_penalty, where length counts the generated
    tokens including the EOS (HF's convention; the prompt does not count). Beams still alive after
    max_new_tokens are scored the same way with length = max_new_tokens and compete with the
    finished ones (as HF's finalisation does);
  * the loop stops early once, for every example, the finished set is full and no alive beam can
    reach a better score than its worst member. The bound is exact (log-probs only decrease, and
    logp / L ** a is monotone in L, so the best case is the next or the maximal length), so early
    stopping never changes the result; this is HF's `early_stopping="never"`, not its default
    heuristic, which may stop sooner when length_penalty > 0.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Cache = Any  # a pytree of arrays, batch-leading
TokensToLogits = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]

_NEG_INF = -jnp.inf


def expand_to_beams(tree: Any, num_beams: int) -> Any:
    """Repeats every leaf `num_beams` times along axis 0: row b becomes rows b*K .. b*K + K-1."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0), tree)


def _gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x: [B, N, ...], indices: [B, M] -> [B, M, ...] (per-example gather along the beam axis)."""
    return jax.vmap(lambda row, idx: row[idx])(x, indices)


def _top_k_merge(seqs_a, scores_a, seqs_b, scores_b, k: int) -> tuple[jax.Array, jax.Array]:
    """Keeps the k best of the union of two scored sets of sequences ([B, N, T], [B, N])."""
    scores = jnp.concatenate([scores_a, scores_b], axis=1)
    seqs = jnp.concatenate([seqs_a, seqs_b], axis=1)
    top_scores, top_idx = jax.lax.top_k(scores, k)
    return _gather_beams(seqs, top_idx), top_scores


def greedy(
    initial_logits: jax.Array,
    cache: Cache,
    tokens_to_logits: TokensToLogits,
    *,
    eos_id: int,
    max_new_tokens: int,
    pad_id: int | None = None,
) -> jax.Array:
    """Greedy (argmax) decoding.

    Returns tokens [B, max_new_tokens] int32. A row keeps its EOS; the positions after it hold
    `pad_id` (default: `eos_id`). The loop exits as soon as every row has emitted EOS.
    """
    pad_id = eos_id if pad_id is None else pad_id
    batch = initial_logits.shape[0]
    first = jnp.argmax(initial_logits, axis=-1).astype(jnp.int32)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    finished = first == eos_id

    def cond(state):
        step, _, finished, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        step, tokens, finished, cache = state
        # Finished rows are fed EOS (a real token id, unlike a pad id such as -1); their output
        # is discarded anyway.
        last = jnp.where(finished, eos_id, tokens[:, step - 1])
        logits, cache = tokens_to_logits(last[:, None], cache)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_token = jnp.where(finished, pad_id, next_token)
        tokens = tokens.at[:, step].set(next_token)
        return step + 1, tokens, finished | (next_token == eos_id), cache

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, finished, cache))
    return tokens


class _BeamState(NamedTuple):
    step: jax.Array  # number of tokens generated so far
    alive_seqs: jax.Array  # [B, K, T] int32, pad after `step`
    alive_logprobs: jax.Array  # [B, K] summed log-probs, sorted best first; -inf: no beam
    finished_seqs: jax.Array  # [B, K, T] int32
    finished_scores: jax.Array  # [B, K] length-penalised, sorted best first; -inf: empty slot
    cache: Cache  # leaves [B * K, ...], row b * K + k belongs to alive beam k of example b


def beam_search(
    initial_logits: jax.Array,
    cache: Cache,
    tokens_to_logits: TokensToLogits,
    *,
    eos_id: int,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    pad_id: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Beam search; see the module docstring for the scoring and stopping rules.

    Args:
      initial_logits: [B, V] logits for the first new token (prompt's last position).
      cache: the model cache after prefill, leaves [B, ...]; expanded to B * num_beams here.
      tokens_to_logits: the model step.
      eos_id: end-of-sequence id.
      max_new_tokens: the most tokens generated per hypothesis, EOS included.
      num_beams: beam width K, also the number of hypotheses returned.
      length_penalty: exponent a in score = sum log-prob / length ** a (may be traced).
      pad_id: fills positions after EOS (default: `eos_id`).

    Returns:
      tokens [B, K, max_new_tokens] int32 and scores [B, K] float32, best first. A hypothesis
      keeps its EOS (absent if it was cut at max_new_tokens). Score -inf marks a filler row, which
      only occurs when fewer than K hypotheses exist (tiny vocabularies or max_new_tokens).
    """
    pad_id = eos_id if pad_id is None else pad_id
    batch, vocab = initial_logits.shape
    num_candidates = 2 * num_beams  # at most K of them end in EOS, so K others remain alive
    if vocab < 2:
        raise ValueError(f"beam_search needs a vocabulary of at least 2 tokens, got {vocab}.")
    max_len = jnp.float32(max_new_tokens)

    def penalise(logprobs, length):
        return logprobs / length.astype(jnp.float32) ** length_penalty

    def advance(state: _BeamState, logits: jax.Array) -> _BeamState:
        """Extends the alive beams by one token given their logits [B * K, V]."""
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        candidates = state.alive_logprobs[:, :, None] + logprobs.reshape(batch, num_beams, vocab)
        top_logprobs, top_idx = jax.lax.top_k(
            candidates.reshape(batch, num_beams * vocab), num_candidates)
        parent = top_idx // vocab
        token = (top_idx % vocab).astype(jnp.int32)
        seqs = _gather_beams(state.alive_seqs, parent).at[:, :, state.step].set(token)
        is_eos = token == eos_id

        alive_logprobs, pick = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, top_logprobs), num_beams)
        alive_seqs = _gather_beams(seqs, pick)
        alive_parent = _gather_beams(parent, pick)

        in_top_k = jnp.arange(num_candidates) < num_beams
        new_scores = jnp.where(is_eos & in_top_k, penalise(top_logprobs, state.step + 1), _NEG_INF)
        finished_seqs, finished_scores = _top_k_merge(
            state.finished_seqs, state.finished_scores, seqs, new_scores, num_beams)

        rows = (jnp.arange(batch)[:, None] * num_beams + alive_parent).reshape(-1)
        cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), state.cache)
        return _BeamState(state.step + 1, alive_seqs, alive_logprobs, finished_seqs,
                          finished_scores, cache)

    def cond(state: _BeamState) -> jax.Array:
        best_alive = state.alive_logprobs[:, 0]
        # An alive beam's log-prob only decreases, and logp / L**a is monotone in L, so its best
        # reachable score is at the next length or at max_new_tokens.
        bound = jnp.maximum(penalise(best_alive, state.step + 1), penalise(best_alive, max_len))
        done = state.finished_scores[:, -1] >= bound
        return (state.step < max_new_tokens) & ~jnp.all(done)

    def body(state: _BeamState) -> _BeamState:
        last = state.alive_seqs[:, :, state.step - 1].reshape(batch * num_beams, 1)
        logits, cache = tokens_to_logits(last, state.cache)
        return advance(state._replace(cache=cache), logits)

    # Beam 0 starts alone; the -inf copies only fill the fixed-size arrays.
    alive_logprobs = jnp.full((batch, num_beams), _NEG_INF, jnp.float32).at[:, 0].set(0.0)
    empty_seqs = jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32)
    state = _BeamState(
        step=jnp.int32(0),
        alive_seqs=empty_seqs,
        alive_logprobs=alive_logprobs,
        finished_seqs=empty_seqs,
        finished_scores=jnp.full((batch, num_beams), _NEG_INF, jnp.float32),
        cache=expand_to_beams(cache, num_beams),
    )
    state = advance(state, expand_to_beams(initial_logits, num_beams))
    state = jax.lax.while_loop(cond, body, state)

    # Beams cut at max_new_tokens are hypotheses too; after an early stop they cannot win.
    alive_scores = jnp.where(state.step == max_new_tokens,
                             penalise(state.alive_logprobs, max_len), _NEG_INF)
    return _top_k_merge(state.finished_seqs, state.finished_scores, state.alive_seqs,
                        alive_scores, num_beams)


def decode(
    initial_logits: jax.Array,
    cache: Cache,
    tokens_to_logits: TokensToLogits,
    *,
    method: Literal["greedy", "beam"] = "greedy",
    eos_id: int,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    pad_id: int | None = None,
) -> jax.Array:
    """Returns the best sequence per example, tokens [B, max_new_tokens], by `method`."""
    if method == "greedy":
        return greedy(initial_logits, cache, tokens_to_logits, eos_id=eos_id,
                      max_new_tokens=max_new_tokens, pad_id=pad_id)
    if method == "beam":
        tokens, _ = beam_search(initial_logits, cache, tokens_to_logits, eos_id=eos_id,
                                max_new_tokens=max_new_tokens, num_beams=num_beams,
                                length_penalty=length_penalty, pad_id=pad_id)
        return tokens[:, 0]
    raise ValueError(f"Unknown decoding method {method!r}; expected 'greedy' or 'beam'.")


def strip_after_eos(tokens: Any, eos_id: int) -> list:
    """Nested python lists of token ids, each row cut before its first EOS (EOS dropped).

    Works for any rank >= 1, e.g. greedy's [B, T] or beam search's [B, K, T].
    """
    tokens = np.asarray(tokens)
    if tokens.ndim > 1:
        return [strip_after_eos(row, eos_id) for row in tokens]
    eos_positions = np.flatnonzero(tokens == eos_id)
    end = eos_positions[0] if eos_positions.size else tokens.shape[0]
    return tokens[:end].tolist()
