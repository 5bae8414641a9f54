"""LaMP examples -> shuffled, augmented, featurized batches, with grain.

The source is any random-access sequence of `lamp.Example`s: a TFDS array_record split
(`tfds_lamp.data_source`), an in-memory list (`lamp.load_split`), or either transformed on read
(`lamp.MappedExamples`). Training reads

    source -> augmented copies -> shuffle (per epoch) -> repeat -> batch: featurize -> prefetch

and evaluation reads every example once, in order. Both return a `grain.IterDataset`; its
iterator's `get_state()` is a small dict to save with a checkpoint, and `set_state()` on a fresh
iterator resumes after the last batch taken. Everything random is a function of (seed, index), so
a resumed run sees the same data.

Every process walks the same global batches and featurizes only its `rows` of each (the rows its
devices hold, `sharding.process_rows`), so the data do not depend on the number of processes.
Featurization runs in a thread `prefetch_batches` ahead of the consumer, so the host tokenizes
and gathers history vectors while the device computes. Batches hold `featurize`'s arrays plus
`index` (each row's position in the source, -1 on padding) and `example_mask` (False on padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np

from plug_jax import errors
from plug_jax.data import lamp

Featurize = Callable[[list[lamp.Example]], dict[str, np.ndarray]]
Indexed = tuple[int, lamp.Example]  # (position in the source, example); -1 marks padding


# --------------------------------------------------------------------------------------------
# Augmentation.


AUGMENT_FROM = ("recent", "all")


def augmented_copy(example: lamp.Example, *, seed: int, index: int, copy: int,
                   max_history: int | None = None,
                   augment_from: str = "recent") -> lamp.Example | None:
    """Copy number `copy` (1, 2, ...) of the source's example `index` (the reference augmentation).

    augment_from="recent" (ours): the most recent `max_history` items (the ones the model sees)
    lose 1..n//2 of them, uniformly. "all" (rucliujn/PPlug aggr_id.py): the whole history of n
    items loses int(n * U[0, 0.5)) + 1, i.e. 1..ceil(n/2); the reference then keeps the last
    `max_history` of its randomly ordered survivors, i.e. a random `max_history` of them.
    Survivors keep their order; dates, labels and items follow. Examples with at most 2 items
    (in the pool drawn from) get no copies: None. The draw depends only on (seed, index, copy).
    """
    if augment_from not in AUGMENT_FROM:
        raise errors.ConfigError(f"augment_from {augment_from!r}: expected one of {AUGMENT_FROM}")
    from_all = augment_from == "all" or max_history is None
    history = example.history if from_all else example.history[-max_history:]
    size = len(history)
    if size <= 2:
        return None
    rng = np.random.default_rng([seed, index, copy])
    keep = np.zeros(size, bool)
    if augment_from == "all":
        drop_count = int(size * rng.uniform(0.0, 0.5)) + 1
        survivors = rng.permutation(size)[:size - drop_count]
        keep[survivors[-max_history:] if max_history else survivors] = True
    else:
        drop_count = rng.integers(1, max(1, size // 2) + 1)
        keep[:] = True
        keep[rng.choice(size, drop_count, replace=False)] = False

    def kept(items: tuple | None) -> tuple | None:
        return None if items is None else tuple(
            item for item, keep_item in zip(items[-size:], keep) if keep_item)

    return dataclasses.replace(example, history=kept(history),
                               history_dates=kept(example.history_dates),
                               history_labels=kept(example.history_labels),
                               history_items=kept(example.history_items))


class _AugmentedDataset(grain.MapDataset):
    """[all examples, copy 1 of each, ..., copy N of each]; a copy that does not exist is None,
    which grain skips when iterating."""

    def __init__(self, parent: grain.MapDataset, *, copies: int, seed: int,
                 max_history: int | None, augment_from: str = "recent"):
        super().__init__(parent)
        self._copies, self._seed, self._max_history = copies, seed, max_history
        self._augment_from = augment_from

    def __len__(self) -> int:
        return len(self._parent) * (self._copies + 1)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        # Indices past one epoch (from repeat) give the same copies: the reference augments once.
        copy, position = divmod(index % len(self), len(self._parent))
        source_index, example = self._parent[position]
        if copy == 0:
            return source_index, example
        augmented = augmented_copy(example, seed=self._seed, index=source_index, copy=copy,
                                   max_history=self._max_history, augment_from=self._augment_from)
        return None if augmented is None else (source_index, augmented)

    def __str__(self) -> str:
        return f"AugmentedDataset(copies={self._copies}, seed={self._seed})"


def num_train_examples(source: Sequence[lamp.Example], augment_copies: int,
                       max_history: int | None = None, augment_from: str = "recent") -> int:
    """Examples in one augmented epoch (all processes); reads every example once."""
    if augment_copies <= 0:
        return len(source)
    pool = None if augment_from == "all" else max_history
    eligible = sum(len(e.history if pool is None else e.history[-pool:]) > 2 for e in source)
    return len(source) + augment_copies * eligible


# --------------------------------------------------------------------------------------------
# Batching.


@dataclasses.dataclass(frozen=True)
class _Batcher:
    """grain's batch_fn: `rows` of a batch of indexed examples, padded to `batch_size`,
    featurized."""

    featurize: Featurize
    batch_size: int
    rows: slice | None = None  # None: all

    def __call__(self, items: Sequence[Indexed]) -> dict[str, np.ndarray]:
        missing = self.batch_size - len(items)
        rows = slice(None) if self.rows is None else self.rows
        indices = np.array([index for index, _ in items] + [-1] * missing, np.int64)[rows]
        examples = [example for _, example in items]
        examples = (examples + examples[:1] * missing)[rows]  # padding repeats a real example
        batch = dict(self.featurize(examples))
        for name, array in batch.items():
            if len(array) != len(examples):
                raise ValueError(f"featurize gave {name!r} {len(array)} rows for "
                                 f"{len(examples)} examples")
        if {"index", "example_mask"} & batch.keys():
            raise ValueError("featurize must not return 'index' or 'example_mask'")
        batch["index"] = indices
        batch["example_mask"] = indices >= 0
        return batch


def _prefetched(dataset: grain.IterDataset, batches: int) -> grain.IterDataset:
    # A thread, not processes: featurize holds the tokenizers and the history table, and the
    # thread's iterator state is the consumer's (checkpointable).
    if not batches:
        return dataset
    return grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=batches)


# --------------------------------------------------------------------------------------------
# Datasets.


def _with_index(index: int, example: lamp.Example) -> Indexed:
    return index, example


def make_train_dataset(source: Sequence[lamp.Example], *, seed: int, batch_size: int,
                       featurize: Featurize, rows: slice | None = None, augment_copies: int = 0,
                       max_history: int | None = None, augment_from: str = "recent",
                       num_epochs: int | None = None, prefetch_batches: int = 2,
                       ) -> grain.IterDataset:
    """Training batches: the source augmented, reshuffled every epoch.

    Args:
      source: random-access examples (`tfds_lamp.data_source`, or a list).
      seed: seeds the shuffle (epoch e uses seed + e) and the augmentation.
      batch_size: examples per global batch; the last partial batch is dropped.
      featurize: a list of examples -> arrays with one row per example.
      rows: the rows of each global batch this process featurizes (`sharding.process_rows`);
        None: all.
      augment_copies: N in the reference augmentation: an example with more than 2 history items
        (of its most recent `max_history`) also appears N more times, 1-50% of them dropped.
      max_history: the history items the model sees (the most recent); None: all.
      augment_from: "recent" or "all", the pool the augmentation drops from (`augmented_copy`).
      num_epochs: passes over the data; None repeats forever.
      prefetch_batches: batches featurized ahead, in a thread; 0: none.
    """
    examples = grain.MapDataset.source(source).map_with_index(_with_index)
    examples = _AugmentedDataset(examples, copies=augment_copies, seed=seed,
                                 max_history=max_history, augment_from=augment_from)
    examples = examples.shuffle(seed).repeat(num_epochs)
    # to_iter_dataset skips the Nones: augmented copies of examples with <= 2 history items.
    batches = examples.to_iter_dataset().batch(
        batch_size, drop_remainder=True, batch_fn=_Batcher(featurize, batch_size, rows))
    return _prefetched(batches, prefetch_batches)


def make_eval_dataset(source: Sequence[lamp.Example], *, batch_size: int, featurize: Featurize,
                      prefetch_batches: int = 2) -> grain.IterDataset:
    """Every example once, in order, no augmentation; the last batch is padded to `batch_size`
    with copies of its first example (`index` -1, `example_mask` False)."""
    examples = grain.MapDataset.source(source).map_with_index(_with_index)
    batches = examples.to_iter_dataset().batch(
        batch_size, drop_remainder=False, batch_fn=_Batcher(featurize, batch_size))
    return _prefetched(batches, prefetch_batches)
