"""LaMP examples -> shuffled, augmented, bucket-padded batches, with grain.

The source is any random-access sequence of `lamp.Example`s: a TFDS array_record split
(`tfds_lamp.data_source`) or an in-memory list (`lamp.load_split`). Training reads

    source -> this process's share -> augmented copies -> shuffle (per epoch) -> repeat
           -> batch: featurize + pad to a bucket

and evaluation reads each process's share once, in order, padded so that every process runs the
same number of batches. Both return a `grain.IterDataset`; its iterator's `get_state()` is a small
dict to save with a checkpoint, and `set_state()` on a fresh iterator resumes after the last batch
taken. Everything random is a function of (seed, index), so a resumed run sees the same data.

Batches hold `featurize`'s arrays plus `index` (each row's position in the source, -1 on padding)
and `example_mask` (False on padding). With `bucket_lengths`, the sequence axis (axis 1) of the
`bucket_keys` arrays is zero-padded to the smallest bucket that holds the batch, so a jitted step
sees one shape per bucket: it compiles once per bucket, at most len(bucket_lengths) times.
Featurization runs where the batch is made; add `.mp_prefetch(grain.MultiprocessingOptions(...))`
to the returned dataset to run it in worker processes (the state stays checkpointable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np

from plug_jax.data import lamp

Featurize = Callable[[list[lamp.Example]], dict[str, np.ndarray]]
Indexed = tuple[int, lamp.Example]  # (position in the source, example); -1 marks padding

# The LLM arrays whose axis 1 is the token axis (`llm.featurize`'s output).
BUCKET_KEYS = ("tokens", "mask")  # answer targets have their own fixed width


def shard_options(shard_index: int | None = None,
                  shard_count: int | None = None) -> tuple[int, int]:
    """(shard_index, shard_count): as given, else this JAX process's (`ShardByJaxProcess`)."""
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither")
    if shard_index is None:
        options = grain.sharding.ShardByJaxProcess()
        return options.shard_index, options.shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    return shard_index, shard_count


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
        raise ValueError(f"augment_from {augment_from!r}: expected one of {AUGMENT_FROM}")
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


def bucket_length(length: int, bucket_lengths: Sequence[int]) -> int:
    """The smallest bucket >= `length`."""
    for bucket in sorted(bucket_lengths):
        if length <= bucket:
            return bucket
    raise ValueError(f"a batch of length {length} does not fit the largest bucket "
                     f"{max(bucket_lengths)}; truncate in featurize or add a bucket")


def pad_to_bucket(features: dict[str, np.ndarray], bucket_lengths: Sequence[int],
                  keys: Sequence[str] = BUCKET_KEYS) -> dict[str, np.ndarray]:
    """Zero-pads axis 1 of `features[keys]` (all of one length) to its bucket."""
    present = [key for key in keys if key in features]
    if not present:
        raise ValueError(f"featurize returned none of the bucket keys {tuple(keys)}")
    lengths = {features[key].shape[1] for key in present}
    if len(lengths) > 1:
        raise ValueError(f"bucket arrays differ in length: "
                         f"{ {key: features[key].shape[1] for key in present} }")
    length = lengths.pop()
    bucket = bucket_length(length, bucket_lengths)
    padded = dict(features)
    for key in present:
        widths = [(0, 0)] * features[key].ndim
        widths[1] = (0, bucket - length)
        padded[key] = np.pad(features[key], widths)
    return padded


@dataclasses.dataclass(frozen=True)
class _Batcher:
    """grain's batch_fn: featurizes a list of indexed examples into one fixed-size batch."""

    featurize: Featurize
    batch_size: int
    bucket_lengths: Sequence[int] | None
    bucket_keys: Sequence[str]

    def __call__(self, items: Sequence[Indexed]) -> dict[str, np.ndarray]:
        missing = self.batch_size - len(items)
        indices = np.array([index for index, _ in items] + [-1] * missing, np.int64)
        examples = [example for _, example in items]
        examples += examples[:1] * missing  # padding rows repeat a real example
        batch = dict(self.featurize(examples))
        for name, array in batch.items():
            if len(array) != self.batch_size:
                raise ValueError(f"featurize gave {name!r} {len(array)} rows for "
                                 f"{self.batch_size} examples")
        if {"index", "example_mask"} & batch.keys():
            raise ValueError("featurize must not return 'index' or 'example_mask'")
        if self.bucket_lengths:
            batch = pad_to_bucket(batch, self.bucket_lengths, self.bucket_keys)
        batch["index"] = indices
        batch["example_mask"] = indices >= 0
        return batch


# --------------------------------------------------------------------------------------------
# Datasets.


def _with_index(index: int, example: lamp.Example) -> Indexed:
    return index, example


def make_train_dataset(source: Sequence[lamp.Example], *, seed: int, batch_size: int,
                       featurize: Featurize, augment_copies: int = 0,
                       bucket_lengths: Sequence[int] | None = None,
                       bucket_keys: Sequence[str] = BUCKET_KEYS,
                       max_history: int | None = None, augment_from: str = "recent",
                       num_epochs: int | None = None,
                       shard_index: int | None = None, shard_count: int | None = None,
                       ) -> grain.IterDataset:
    """Training batches: this process's share, augmented, reshuffled every epoch.

    Args:
      source: random-access examples (`tfds_lamp.data_source`, or a list).
      seed: seeds the shuffle (epoch e uses seed + e) and the augmentation.
      batch_size: examples per batch on this process; the last partial batch is dropped.
      featurize: list of `batch_size` examples -> arrays with `batch_size` rows; the
        `bucket_keys` arrays padded (axis 1) to the batch's longest example.
      augment_copies: N in the reference augmentation: an example with more than 2 history items
        (of its most recent `max_history`) also appears N more times, 1-50% of them dropped.
      bucket_lengths: e.g. (64, 128, 256): pad each batch to the smallest that holds it; None
        keeps featurize's lengths.
      bucket_keys: the arrays to pad; those featurize does not return are skipped.
      max_history: the history items the model sees (the most recent); None: all.
      augment_from: "recent" or "all", the pool the augmentation drops from (`augmented_copy`).
      num_epochs: passes over the data; None repeats forever.
      shard_index, shard_count: this process's share, examples shard_index::shard_count; None:
        `jax.process_index()` of `jax.process_count()`.
    """
    shard_index, shard_count = shard_options(shard_index, shard_count)
    examples = grain.MapDataset.source(source).map_with_index(_with_index)
    examples = examples[shard_index::shard_count]  # before augmenting: read only this share
    examples = _AugmentedDataset(examples, copies=augment_copies, seed=seed,
                                 max_history=max_history, augment_from=augment_from)
    examples = examples.shuffle(seed).repeat(num_epochs)
    batcher = _Batcher(featurize, batch_size, bucket_lengths, bucket_keys)
    # to_iter_dataset skips the Nones: augmented copies of examples with <= 2 history items.
    return examples.to_iter_dataset().batch(batch_size, drop_remainder=True, batch_fn=batcher)


class _PaddedShard(grain.MapDataset):
    """Examples shard_index::shard_count as (index, example), padded to ceil(n / shard_count)
    with (-1, example 0) so that every shard has the same length."""

    def __init__(self, parent: grain.MapDataset, shard_index: int, shard_count: int):
        super().__init__(parent)
        self._shard_index, self._shard_count = shard_index, shard_count

    def __len__(self) -> int:
        return -(-len(self._parent) // self._shard_count)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        source_index = self._shard_index + (index % len(self)) * self._shard_count
        if source_index < len(self._parent):
            return source_index, self._parent[source_index]
        return -1, self._parent[0]

    def __str__(self) -> str:
        return f"PaddedShard({self._shard_index}/{self._shard_count})"


def make_eval_dataset(source: Sequence[lamp.Example], *, batch_size: int, featurize: Featurize,
                      bucket_lengths: Sequence[int] | None = None,
                      bucket_keys: Sequence[str] = BUCKET_KEYS,
                      shard_index: int | None = None, shard_count: int | None = None,
                      ) -> grain.IterDataset:
    """Every example once, in order, no augmentation; see `make_train_dataset` for arguments.

    Each process gets ceil(len(source) / shard_count) slots, so all run the same number of
    batches; padding rows (the share's last slot, the last batch's tail) have `index` -1 and
    `example_mask` False. Map predictions back with `source[index]`.
    """
    shard_index, shard_count = shard_options(shard_index, shard_count)
    examples = _PaddedShard(grain.MapDataset.source(source), shard_index, shard_count)
    batcher = _Batcher(featurize, batch_size, bucket_lengths, bucket_keys)
    return examples.to_iter_dataset().batch(batch_size, drop_remainder=False, batch_fn=batcher)
