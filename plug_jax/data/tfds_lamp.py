"""LaMP as a TFDS dataset in array_record files, built and read without TensorFlow.

    builder = tfds_lamp.prepare("~/lamp/LaMP_3", "~/tfds_data", "LaMP_3")
    train = tfds_lamp.data_source(builder, "train")  # len(train), train[i] -> lamp.Example

`prepare` runs `download_and_prepare(file_format="array_record")`, and `data_source` reads through
`builder.as_data_source`: both use TFDS's numpy code path, which needs no TensorFlow (only Text and
Sequence(Text) features, which encode with numpy alone). `tfds.load` and `as_dataset` build
`tf.data` pipelines and do need TensorFlow: avoid them. The grain pipeline
(`plug_jax.data.grain_pipeline`) reads a `data_source` by index.

Records keep the questions file's order (shuffling is disabled), so index i of a split is
`lamp.load_split(...)[i]`. The commands read through here with `config.data.source = "tfds"`
(`experiment.load_splits`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from plug_jax.data import lamp

_QUESTIONS_SUFFIX = "_questions.json"
_FINGERPRINT_KEY = "source_fingerprint"
_NO_TARGETS_KEY = "splits_without_targets"


class LampBuilder(tfds.core.GeneratorBasedBuilder):
    """LaMP questions with their users' histories; one config per task of `lamp.TASKS`.

    The configs are "LaMP_1" ... "LaMP_5" and "LaMP_7" (LaMP_6's emails are not public).

    Splits are whatever `{split}_questions.json` files the manual directory holds. Each record
    holds every `lamp.Example` field, so `data_source` gives back exactly what `lamp.load_split`
    gives; the profile items' fields are stored one sequence per field (`item_{field}`), aligned
    with `history`. None is stored as empty: "" for a missing user_id, "" for each target of a split
    without `{split}_outputs.json` (test), no dates when some profile item has none, no labels
    for tasks whose profile items carry none.
    """

    name = "lamp"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "The profile items' fields."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=task.name, description=f"{task.kind} task")
                       for task in lamp.TASKS.values()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download one LaMP task (https://lamp-benchmark.github.io/download) and put its files, with the
    benchmark's names, into one directory, the manual_dir:

      {split}_questions.json   e.g. train_questions.json, dev_questions.json
      {split}_outputs.json     the gold outputs; absent for test splits

    Every {split}_questions.json there becomes a split ("train", "dev", "test", "dev_new", ...).
    Use one data_dir per manual_dir: a data_dir holds one prepared copy of each task.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup touches the `importlib_resources` backport, which TFDS does not
        # install, for any builder defined inside a package.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs reads README/CITATIONS files from a
        # per-dataset package directory, which this module has not.
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"LaMP {self.builder_config.name}: questions with their user's history.",
            features=tfds.features.FeaturesDict({
                "id": text,
                "user_id": text,
                "input": text,
                "query": text,
                "target": text,
                "history": tfds.features.Sequence(text),
                "history_dates": tfds.features.Sequence(text),
                "history_labels": tfds.features.Sequence(text),
                **{_item_key(field): tfds.features.Sequence(text)
                   for field in _item_fields(self.builder_config.name)},
            }),
            homepage="https://lamp-benchmark.github.io",
            disable_shuffling=True,  # keep the file's order: index i == load_split(...)[i]
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager
                          ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        manual_dir = Path(dl_manager.manual_dir)
        splits = lamp_splits(manual_dir)
        if not splits:
            raise lamp.LampFormatError(
                f"{manual_dir}: no {{split}}{_QUESTIONS_SUFFIX} files; "
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        self.info.metadata[_FINGERPRINT_KEY] = fingerprint(manual_dir)
        self.info.metadata[_NO_TARGETS_KEY] = [
            split for split in splits if not (manual_dir / f"{split}_outputs.json").is_file()]
        return {split: self._generate_examples(manual_dir, split) for split in splits}

    def _generate_examples(self, manual_dir: Path, split: str
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
        # load_split validates, so a bad file fails here with the reader's one-line message.
        for index, example in enumerate(lamp.load_split(manual_dir, split,
                                                        self.builder_config.name)):
            yield index, {
                "id": example.id,
                "user_id": example.user_id or "",
                "input": example.input,
                "query": example.query,
                "target": example.target or "",
                "history": list(example.history),
                "history_dates": list(example.history_dates or ()),
                "history_labels": list(example.history_labels or ()),
                **{_item_key(field): [dict(item)[field] for item in example.history_items]
                   for field in _item_fields(self.builder_config.name)},
            }


def _item_fields(task: str) -> tuple[str, ...]:
    """The profile item fields `lamp.Example.history_items` carries, in their order."""
    task = lamp.get_task(task)
    return task.history_fields + ((task.label_field,) if task.label_field else ())


def _item_key(field: str) -> str:
    return f"item_{field}"


def lamp_splits(manual_dir: str | os.PathLike[str]) -> list[str]:
    """The split names of a LaMP directory: the prefixes of its `*_questions.json` files."""
    return sorted(path.name[:-len(_QUESTIONS_SUFFIX)]
                  for path in Path(manual_dir).glob(f"*{_QUESTIONS_SUFFIX}"))


def fingerprint(manual_dir: str | os.PathLike[str]) -> str:
    """A hash of the LaMP files' names and contents, stored with the prepared data."""
    digest = hashlib.sha256()
    for path in sorted(Path(manual_dir).glob("*_*.json")):
        if path.name.endswith((_QUESTIONS_SUFFIX, "_outputs.json")):
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def prepare(manual_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str],
            task: str) -> LampBuilder:
    """Builds (once) `task`'s array_record files from the LaMP files in `manual_dir`.

    Needs no TensorFlow. A data_dir already prepared from the same files is reused; one prepared
    from other files is an error rather than silently stale data. On several hosts, prepare once
    (or into a local data_dir per host) before reading.

    Args:
      manual_dir: a directory in the LaMP layout (see `LampBuilder.MANUAL_DOWNLOAD_INSTRUCTIONS`).
      data_dir: where TFDS keeps prepared datasets (`{data_dir}/lamp/{task}/1.0.0/`).
      task: "LaMP_3" (or "LaMP-3").

    Returns:
      The prepared builder; see `data_source`.
    """
    manual_dir = Path(manual_dir).expanduser()
    if not manual_dir.is_dir():
        raise lamp.LampFormatError(f"{manual_dir}: no such directory")
    builder = LampBuilder(config=lamp.get_task(task).name,
                          data_dir=os.fspath(Path(data_dir).expanduser()),
                          file_format="array_record")
    if builder.is_prepared():
        prepared_from = builder.info.metadata.get(_FINGERPRINT_KEY)
        if prepared_from != fingerprint(manual_dir):
            raise ValueError(
                f"{builder.data_dir} was prepared from other LaMP files than {manual_dir}; "
                "use another data_dir, or delete that one to rebuild it")
        return builder
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                     try_download_gcs=False))
    return builder


@dataclasses.dataclass(frozen=True)
class LampDataSource(Sequence[lamp.Example]):
    """A random-access LaMP split: `len(source)`, `source[i]` -> `lamp.Example`.

    Wraps TFDS's array_record data source (picklable, so grain workers can read it).
    """

    records: Sequence[dict[str, Any]]
    has_targets: bool
    has_labels: bool
    item_fields: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> lamp.Example:  # type: ignore[override]
        index = operator.index(index)
        if not -len(self) <= index < len(self):  # IndexError ends iteration, as for a list
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._decode(self.records[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[lamp.Example]:
        getitems = getattr(self.records, "__getitems__", None)
        records = getitems(indices) if getitems else [self.records[i] for i in indices]
        return [self._decode(record) for record in records]

    _getitems = __getitems__  # grain's batched-read protocol

    def _decode(self, record: dict[str, Any]) -> lamp.Example:
        history = tuple(_text(item) for item in record["history"])
        dates = tuple(_text(item) for item in record["history_dates"])
        return lamp.Example(
            id=_text(record["id"]),
            user_id=_text(record["user_id"]) or None,
            input=_text(record["input"]),
            query=_text(record["query"]),
            history=history,
            target=_text(record["target"]) if self.has_targets else None,
            # An empty history has empty (not None) dates: lengths tell the two cases apart.
            history_dates=dates if len(dates) == len(history) else None,
            history_labels=(tuple(_text(item) for item in record["history_labels"])
                            if self.has_labels else None),
            history_items=tuple(zip(*(
                [(field, _text(value)) for value in record[_item_key(field)]]
                for field in self.item_fields))),
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def data_source(builder: LampBuilder, split: str) -> LampDataSource:
    """`split` of a prepared builder as `lamp.Example`s, read from array_record without TF."""
    if split not in builder.info.splits:
        raise KeyError(f"no split {split!r} in {builder.data_dir}; "
                       f"splits: {', '.join(sorted(builder.info.splits))}")
    no_targets = builder.info.metadata.get(_NO_TARGETS_KEY, [])
    task = builder.builder_config.name
    return LampDataSource(records=builder.as_data_source(split),
                          has_targets=split not in no_targets,
                          has_labels=lamp.get_task(task).label_field is not None,
                          item_fields=_item_fields(task))
