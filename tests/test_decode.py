"""Tests for plug_jax.decode against a toy model with a history-dependent, batch-leading cache."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plug_jax import decode

VOCAB = 6
EOS = 0
PAD = -1
REPEAT_PENALTY = 0.7

_rng = np.random.default_rng(0)
# logits = by_token[token] + by_prev[previous token] - penalty * counts: the last two terms come
# from the cache, so reordering it wrongly during beam search changes the result.
BY_TOKEN = (_rng.normal(size=(VOCAB, VOCAB)) * 1.5).astype(np.float32)
BY_PREV = _rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)


def init_cache(batch: int) -> dict:
    return {
        "prev": jnp.full((batch,), 1, jnp.int32),
        "counts": jnp.zeros((batch, VOCAB), jnp.float32),  # a leaf with trailing axes, like k/v
        "step": jnp.zeros((batch,), jnp.int32),
    }


def toy_tokens_to_logits(tokens, cache):
    token = tokens[:, 0]
    logits = (jnp.asarray(BY_TOKEN)[token] + jnp.asarray(BY_PREV)[cache["prev"]]
              - REPEAT_PENALTY * cache["counts"])
    new_cache = {
        "prev": token,
        "counts": cache["counts"] + jax.nn.one_hot(token, VOCAB, dtype=jnp.float32),
        "step": cache["step"] + 1,
    }
    return logits, new_cache


@jax.jit
def prefill(prompts):
    """Feeds the prompts token by token; returns the last position's logits and the cache."""
    cache = init_cache(prompts.shape[0])
    for t in range(prompts.shape[1]):
        logits, cache = toy_tokens_to_logits(prompts[:, t:t + 1], cache)
    return logits, cache


# Jitted once per static configuration: keeps the suite fast (eager dispatch is slow).
jit_greedy = jax.jit(decode.greedy, static_argnames=(
    "tokens_to_logits", "eos_id", "max_new_tokens", "pad_id"))
jit_beam_search = jax.jit(decode.beam_search, static_argnames=(
    "tokens_to_logits", "eos_id", "max_new_tokens", "num_beams", "pad_id"))


# Numpy reference of the same model, one example at a time, in float64.
def np_state(prompt) -> tuple[int, np.ndarray]:
    prev, counts = 1, np.zeros(VOCAB)
    for token in prompt[:-1]:
        prev, counts = token, counts + np.eye(VOCAB)[token]
    return prev, counts


def np_logprobs(token: int, prev: int, counts: np.ndarray) -> np.ndarray:
    logits = BY_TOKEN[token].astype(np.float64) + BY_PREV[prev] - REPEAT_PENALTY * counts
    return logits - np.logaddexp.reduce(logits)


def np_sequence_logprob(prompt, sequence) -> float:
    prev, counts = np_state(prompt)
    token, total = prompt[-1], 0.0
    for next_token in sequence:
        total += np_logprobs(token, prev, counts)[next_token]
        prev, counts, token = token, counts + np.eye(VOCAB)[token], next_token
    return total


def np_greedy(prompt, max_new_tokens: int) -> list[int]:
    prev, counts = np_state(prompt)
    token, out = prompt[-1], []
    for _ in range(max_new_tokens):
        next_token = int(np.argmax(np_logprobs(token, prev, counts)))
        out.append(next_token)
        if next_token == EOS:
            break
        prev, counts, token = token, counts + np.eye(VOCAB)[token], next_token
    return out


def score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / length ** length_penalty


def np_beam_search(prompt, max_new_tokens: int, num_beams: int, length_penalty: float):
    """Plain-python beam search with the HF rules, always run to max_new_tokens."""
    prev, counts = np_state(prompt)
    alive = [((), 0.0, (prompt[-1], prev, counts))]  # (sequence, log-prob, model state)
    finished = []
    for step in range(max_new_tokens):
        candidates = []
        for sequence, logprob, (token, prev, counts) in alive:
            next_logprobs = np_logprobs(token, prev, counts)
            next_state = (token, counts + np.eye(VOCAB)[token])
            for next_token in range(VOCAB):
                candidates.append((logprob + next_logprobs[next_token], sequence + (next_token,),
                                   (next_token, *next_state)))
        candidates = sorted(candidates, key=lambda c: -c[0])[:2 * num_beams]
        finished += [(score(logprob, step + 1, length_penalty), sequence)
                     for rank, (logprob, sequence, _) in enumerate(candidates)
                     if sequence[-1] == EOS and rank < num_beams]
        alive = [(sequence, logprob, state) for logprob, sequence, state in candidates
                 if sequence[-1] != EOS][:num_beams]
    finished += [(score(logprob, max_new_tokens, length_penalty), sequence)
                 for sequence, logprob, _ in alive]
    return sorted(finished, reverse=True)[:num_beams]


def all_hypotheses(max_new_tokens: int):
    """Every sequence beam search may return: ends in EOS, or is cut at max_new_tokens."""
    body_tokens = [t for t in range(VOCAB) if t != EOS]
    for length in range(1, max_new_tokens + 1):
        for body in itertools.product(body_tokens, repeat=length - 1):
            yield (*body, EOS)
    yield from itertools.product(body_tokens, repeat=max_new_tokens)


def random_prompts(seed: int, batch: int, length: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(batch, length)).astype(np.int32)


def padded(sequence, max_new_tokens: int) -> list[int]:
    return list(sequence) + [PAD] * (max_new_tokens - len(sequence))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_python_loop(seed):
    max_new_tokens = 8
    prompts = random_prompts(seed, batch=16)
    tokens = jit_greedy(*prefill(prompts), toy_tokens_to_logits, eos_id=EOS,
                           max_new_tokens=max_new_tokens, pad_id=PAD)
    assert tokens.shape == (16, max_new_tokens) and tokens.dtype == jnp.int32
    expected = [padded(np_greedy(p, max_new_tokens), max_new_tokens) for p in prompts]
    np.testing.assert_array_equal(np.asarray(tokens), np.array(expected))


def test_greedy_stops_at_eos_and_pads():
    max_new_tokens = 4
    prompts = random_prompts(0, batch=16)
    expected = [np_greedy(p, max_new_tokens) for p in prompts]
    lengths = [len(e) for e in expected]
    # The toy model must give both early EOS and rows cut at the limit for this test to mean much.
    assert min(lengths) < max_new_tokens - 1 and EOS not in expected[int(np.argmax(lengths))]

    tokens = jit_greedy(*prefill(prompts), toy_tokens_to_logits, eos_id=EOS,
                           max_new_tokens=max_new_tokens)  # pad defaults to EOS
    for row, exp in zip(np.asarray(tokens), expected):
        assert row[:len(exp)].tolist() == exp
        assert (row[len(exp):] == EOS).all()
    assert decode.strip_after_eos(tokens, EOS) == [[t for t in e if t != EOS] for e in expected]


def test_greedy_exits_loop_when_all_rows_finished():
    calls = []

    def counting_tokens_to_logits(tokens, cache):
        jax.debug.callback(lambda: calls.append(1))
        return toy_tokens_to_logits(tokens, cache)

    prompts = random_prompts(0, batch=16)
    lengths = [len(np_greedy(p, 50)) for p in prompts]
    assert max(lengths) < 50  # every row emits EOS well before the limit
    decode.greedy(*prefill(prompts), counting_tokens_to_logits, eos_id=EOS, max_new_tokens=50)
    jax.effects_barrier()
    assert len(calls) == max(lengths) - 1


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
def test_beam_search_exhaustive_equals_brute_force(length_penalty):
    max_new_tokens = 4
    # At least as many beams as continuations at any step, so nothing is pruned.
    num_beams = VOCAB * (VOCAB - 1) ** (max_new_tokens - 2)
    prompts = random_prompts(3, batch=2)
    tokens, scores = jit_beam_search(
        *prefill(prompts), toy_tokens_to_logits, eos_id=EOS, max_new_tokens=max_new_tokens,
        num_beams=num_beams, length_penalty=length_penalty, pad_id=PAD)
    assert tokens.shape == (2, num_beams, max_new_tokens) and scores.shape == (2, num_beams)
    tokens, scores = np.asarray(tokens), np.asarray(scores)

    for prompt, example_tokens, example_scores in zip(prompts, tokens, scores):
        brute = sorted(
            ((score(np_sequence_logprob(prompt, h), len(h), length_penalty), h)
             for h in all_hypotheses(max_new_tokens)), reverse=True)
        assert np.all(np.diff(example_scores) <= 0)  # best first
        np.testing.assert_allclose(example_scores, [s for s, _ in brute[:num_beams]], atol=1e-4)
        assert example_tokens[0].tolist() == padded(brute[0][1], max_new_tokens)
        # Every returned hypothesis is well formed and carries its own score.
        for row, row_score in zip(example_tokens, example_scores):
            hypothesis = row[row != PAD].tolist()
            assert EOS not in hypothesis[:-1] and row.tolist() == padded(hypothesis, max_new_tokens)
            assert hypothesis[-1] == EOS or len(hypothesis) == max_new_tokens
            recomputed = score(np_sequence_logprob(prompt, hypothesis), len(hypothesis),
                               length_penalty)
            np.testing.assert_allclose(row_score, recomputed, atol=1e-4)


@pytest.mark.parametrize("num_beams,length_penalty",
                         [(2, 1.0), (3, 0.0), (2, 3.0), (4, 2.0), (3, -0.5)])
def test_beam_search_matches_python_reference(num_beams, length_penalty):
    # Narrow beams prune, so this also checks that early stopping never changes the result: the
    # reference always runs to max_new_tokens.
    max_new_tokens = 6
    prompts = random_prompts(4, batch=8)
    tokens, scores = jit_beam_search(
        *prefill(prompts), toy_tokens_to_logits, eos_id=EOS, max_new_tokens=max_new_tokens,
        num_beams=num_beams, length_penalty=length_penalty, pad_id=PAD)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert np.isfinite(scores).all() and np.all(np.diff(scores, axis=1) <= 0)
    for prompt, example_tokens, example_scores in zip(prompts, tokens, scores):
        hypotheses = [tuple(row[row != PAD].tolist()) for row in example_tokens]
        reference = np_beam_search(prompt, max_new_tokens, num_beams, length_penalty)
        assert hypotheses == [sequence for _, sequence in reference]
        np.testing.assert_allclose(example_scores, [s for s, _ in reference], atol=1e-4)
        for hypothesis, row_score in zip(hypotheses, example_scores):
            assert EOS not in hypothesis[:-1]
            assert hypothesis[-1] == EOS or len(hypothesis) == max_new_tokens
            recomputed = score(np_sequence_logprob(prompt, hypothesis), len(hypothesis),
                               length_penalty)
            np.testing.assert_allclose(row_score, recomputed, atol=1e-4)


@pytest.mark.parametrize("num_beams,length_penalty", [(1, 2.0), (2, 1.0), (2, 2.0), (3, -0.3)])
def test_beam_search_early_stopping_is_exact(num_beams, length_penalty):
    # One example per call: the loop stops only when every row is done, so batches of one make
    # early stops (and any premature one, e.g. with HF's default current-length heuristic) common.
    max_new_tokens = 8
    for seed in range(32):
        prompts = random_prompts(seed, batch=1)
        _, scores = jit_beam_search(
            *prefill(prompts), toy_tokens_to_logits, eos_id=EOS, max_new_tokens=max_new_tokens,
            num_beams=num_beams, length_penalty=length_penalty, pad_id=PAD)
        reference = np_beam_search(prompts[0], max_new_tokens, num_beams, length_penalty)
        np.testing.assert_allclose(np.asarray(scores)[0], [s for s, _ in reference], atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_beam_equals_greedy(seed):
    # With length_penalty=0 a single beam is greedy; with a length bonus it may legitimately
    # continue past a greedy EOS and find a better-scored longer sequence.
    max_new_tokens = 8
    prompts = random_prompts(seed, batch=16)
    initial_logits, cache = prefill(prompts)
    greedy_tokens = jit_greedy(initial_logits, cache, toy_tokens_to_logits, eos_id=EOS,
                                  max_new_tokens=max_new_tokens, pad_id=PAD)
    beam_tokens, _ = jit_beam_search(
        initial_logits, cache, toy_tokens_to_logits, eos_id=EOS, max_new_tokens=max_new_tokens,
        num_beams=1, length_penalty=0.0, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(beam_tokens[:, 0]), np.asarray(greedy_tokens))


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_jit_compiles_once(method):
    traces = []

    @functools.partial(jax.jit, static_argnames=("method",))
    def generate(initial_logits, cache, method):
        traces.append(1)  # runs only while tracing
        return decode.decode(initial_logits, cache, toy_tokens_to_logits, method=method,
                             eos_id=EOS, max_new_tokens=6, num_beams=3, pad_id=PAD)

    for seed in (5, 6):
        initial_logits, cache = prefill(random_prompts(seed, batch=4))
        jitted = generate(initial_logits, cache, method)
        if method == "greedy":
            expected = jit_greedy(initial_logits, cache, toy_tokens_to_logits, eos_id=EOS,
                                  max_new_tokens=6, pad_id=PAD)
        else:
            expected = jit_beam_search(initial_logits, cache, toy_tokens_to_logits, eos_id=EOS,
                                       max_new_tokens=6, num_beams=3, pad_id=PAD)[0][:, 0]
        np.testing.assert_array_equal(np.asarray(jitted), np.asarray(expected))
    assert len(traces) == 1


def test_decode_beam_returns_best_hypothesis():
    initial_logits, cache = prefill(random_prompts(7, batch=4))
    tokens, _ = jit_beam_search(initial_logits, cache, toy_tokens_to_logits, eos_id=EOS,
                                max_new_tokens=5, num_beams=3, length_penalty=1.0)
    jit_decode = jax.jit(decode.decode, static_argnames=(
        "tokens_to_logits", "method", "eos_id", "max_new_tokens", "num_beams"))
    best = jit_decode(initial_logits, cache, toy_tokens_to_logits, method="beam", eos_id=EOS,
                      max_new_tokens=5, num_beams=3, length_penalty=1.0)
    np.testing.assert_array_equal(np.asarray(best), np.asarray(tokens[:, 0]))
    with pytest.raises(ValueError):
        decode.decode(initial_logits, cache, toy_tokens_to_logits, method="sample", eos_id=EOS,
                      max_new_tokens=5)


def test_expand_to_beams_repeats_rows():
    tree = {"a": jnp.arange(6).reshape(2, 3), "b": (jnp.array([7, 8]),)}
    expanded = decode.expand_to_beams(tree, 3)
    np.testing.assert_array_equal(expanded["a"], np.repeat(np.arange(6).reshape(2, 3), 3, axis=0))
    np.testing.assert_array_equal(expanded["b"][0], [7, 7, 7, 8, 8, 8])


def test_strip_after_eos():
    tokens = np.array([[[4, 2, 0, 0], [3, 3, 3, 3]], [[0, 1, 1, 1], [5, 0, 2, 2]]])
    assert decode.strip_after_eos(tokens, 0) == [[[4, 2], [3, 3, 3, 3]], [[], [5]]]
    assert decode.strip_after_eos(tokens[0, 0], 0) == [4, 2]
