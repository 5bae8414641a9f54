"""From LaMP examples to fixed-shape arrays: featurization, and evaluation batches.

A split is featurized once: LLM tokens (through the frozen LLM's adapter), query-encoder tokens,
and each example's history as row indices into the frozen history-embedding table, so a 512-item
history costs 512 ints per example until a batch gathers its vectors. Every array has one fixed
shape per run, so the jitted step compiles once.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

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
        raise ValueError(f"query_from {query_from!r}: expected 'input' or 'truncated_input'")
    text = example.input
    ids = llm.tokenizer.encode(text)
    if len(ids) > data_config.max_input_tokens - 1:
        text = llm.tokenizer.decode(ids[:data_config.max_input_tokens - 1])
    return lamp.reference_query(data_config.task, text, lamp1_query)


def featurize(examples: Sequence[Example], llm, query_tokenizer, table: HistoryTable, *,
              data_config, query_instruction: str, with_targets: bool,
              llm_length: int | None = None) -> dict[str, np.ndarray]:
    """Stacked per-example arrays [N, ...] for one split."""
    inputs = [e.input for e in examples]
    targets = [e.target or "" for e in examples] if with_targets else None
    if llm_length is None:
        longest = max(llm.prompt_lengths(inputs, data_config.max_input_tokens), default=1)
        llm_length = round_up(llm.sequence_length(longest, data_config.max_target_tokens,
                                                  with_targets))
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


def num_examples(features: dict[str, np.ndarray]) -> int:
    return len(features["history_rows"])


def batches(features: dict[str, np.ndarray], table: HistoryTable,
            batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """In-order evaluation batches with history vectors gathered. A last partial batch is padded
    with copies of its first example, marked False in `example_mask`."""
    size = num_examples(features)
    for begin in range(0, size, batch_size):
        index = np.arange(begin, min(begin + batch_size, size))
        real = len(index)
        index = np.concatenate([index, np.full(batch_size - real, index[0])])
        batch = {name: array[index] for name, array in features.items()}
        batch["history"], batch["history_mask"] = table.lookup(batch.pop("history_rows"))
        batch["example_mask"] = np.arange(batch_size) < real
        yield batch
