"""From LaMP examples to fixed-shape arrays: LLM tokens (through the frozen LLM's adapter),
query-encoder tokens, and each example's history as rows of the frozen history-embedding table,
whose vectors a batch gathers. The LLM sequence length is fixed per run (training) or per split
(evaluation), so a jitted step compiles once; `grain_pipeline` runs `make_featurize` per batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from plug_jax import errors
from plug_jax.data import lamp
from plug_jax.data.lamp import Example
from plug_jax.data.history import HistoryTable
from plug_jax.models import bert


def round_up(value: int, multiple: int = 8) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def query_text(example: Example, llm, data_config) -> str:
    """What the query encoder reads, by config.data.query_from and config.data.lamp1_query.

    query_from="input" (ours): the example's query, cut from the whole input. "truncated_input"
    (rucliujn/PPlug): cut from the input as the LLM reads it, its first max_input_tokens - 1
    tokens decoded back to text. lamp1_query: "title_and_refs" (ours: the title and both
    references) or "title" (the reference: the paper title alone).
    """
    lamp1_query = data_config.get("lamp1_query", "title_and_refs")
    query_from = data_config.get("query_from", "input")
    if query_from == "input":
        if lamp1_query == "title" and data_config.task.replace("-", "_") == "LaMP_1":
            return lamp.reference_query("LaMP_1", example.input, "title")
        return example.query
    if query_from != "truncated_input":
        raise errors.ConfigError(f"query_from {query_from!r}: expected 'input' or 'truncated_input'")
    text = example.input
    ids = llm.tokenizer.encode(text)
    if len(ids) > data_config.max_input_tokens - 1:
        text = llm.tokenizer.decode(ids[:data_config.max_input_tokens - 1])
    return lamp.reference_query(data_config.task, text, lamp1_query)


def longest_llm_length(llm, examples: Sequence[Example], data_config, with_targets: bool) -> int:
    """The LLM sequence length that holds every example's prompt (and answer): reads each
    example's input. Inputs longer than data.max_input_tokens are cut, as featurize cuts them;
    how many is said once."""
    inputs = [e.input for e in examples]
    lengths = llm.prompt_lengths(inputs, data_config.max_input_tokens)
    cut = sum(a != b for a, b in zip(lengths, llm.prompt_lengths(inputs, 1 << 30)))
    if cut:
        print(f"note: {cut} of {len(inputs)} inputs are longer than data.max_input_tokens="
              f"{data_config.max_input_tokens} tokens and are truncated")
    longest = max(lengths, default=1)
    return round_up(llm.sequence_length(longest, data_config.max_target_tokens, with_targets))


def featurize(examples: Sequence[Example], llm, query_tokenizer, table: HistoryTable, *,
              data_config, query_instruction: str, with_targets: bool,
              llm_length: int | None = None) -> dict[str, np.ndarray]:
    """Stacked per-example arrays [N, ...]; llm_length None: the examples' longest."""
    inputs = [e.input for e in examples]
    targets = [e.target or "" for e in examples] if with_targets else None
    if llm_length is None:
        llm_length = longest_llm_length(llm, examples, data_config, with_targets)
    features = llm.featurize(inputs, targets, max_input_tokens=data_config.max_input_tokens,
                             max_target_tokens=data_config.max_target_tokens, length=llm_length)
    queries = [query_instruction + query_text(e, llm, data_config) for e in examples]
    features["query_tokens"], features["query_mask"] = bert.encode_batch(
        query_tokenizer, queries, data_config.max_query_tokens,
        length=data_config.max_query_tokens)
    features["history_rows"] = np.stack(
        [table.rows(e.history, data_config.max_history) for e in examples]) if examples else \
        np.zeros((0, data_config.max_history), np.int32)
    return features


def make_featurize(exp, llm_length: int | None, *, with_targets: bool = True):
    """Examples -> one batch of fixed-shape arrays with the history vectors gathered: the grain
    pipeline's map after batching (`grain_pipeline`). llm_length None: the examples' longest."""

    def featurize_batch(examples: Sequence[Example]) -> dict[str, np.ndarray]:
        features = featurize(examples, exp.llm, exp.query_tokenizer, exp.table,
                             data_config=exp.config.data,
                             query_instruction=exp.config.encoder.query_instruction,
                             with_targets=with_targets, llm_length=llm_length)
        features["history"], features["history_mask"] = exp.table.lookup(
            features.pop("history_rows"))
        return features

    return featurize_batch
