"""LaMP through TFDS array_record files and the grain pipeline, all without TensorFlow."""

import collections
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from plug_jax.data import grain_pipeline, lamp, synthetic, tfds_lamp



def _lamp_json(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*_*.json")
                  if p.name.endswith(("_questions.json", "_outputs.json")))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    directory = synthetic.write_lamp_dir(tmp_path_factory.mktemp("manual"), "LaMP_3",
                                         num_users=24, examples_per_user=3)
    (directory / "dev_new_outputs.json").unlink()  # a split without targets, like test
    return directory


@pytest.fixture(scope="module")
def synthetic_builder(synthetic_dir, tmp_path_factory) -> tfds_lamp.LampBuilder:
    return tfds_lamp.prepare(synthetic_dir, tmp_path_factory.mktemp("tfds"), "LaMP_3")


@pytest.fixture(scope="module")
def train_source(synthetic_builder) -> tfds_lamp.LampDataSource:
    return tfds_lamp.data_source(synthetic_builder, "train")


def _featurize(examples: list[lamp.Example]) -> dict[str, np.ndarray]:
    """A stand-in for the trainer's: one token per history item plus one, padded to the longest."""
    lengths = [len(e.history) + 1 for e in examples]
    tokens = np.zeros((len(examples), max(lengths)), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = np.arange(1, length + 1)
    return {"tokens": tokens, "mask": tokens > 0, "history_count": np.array(lengths) - 1}


def _recording_featurize(seen: list[lamp.Example]):
    def featurize(examples):
        seen.extend(examples)
        return _featurize(examples)
    return featurize


def _indices(dataset) -> list[int]:
    return [int(i) for batch in dataset for i, real in zip(batch["index"], batch["example_mask"])
            if real]


# --------------------------------------------------------------------------------------------
# TFDS builder.


def test_builder_splits_match_the_reader_without_tensorflow(synthetic_dir, synthetic_builder):
    assert sorted(synthetic_builder.info.splits) == ["dev", "dev_new", "train"]
    for split in ("train", "dev", "dev_new"):
        source = tfds_lamp.data_source(synthetic_builder, split)
        # Every field, in the file's order: ids, inputs, queries, histories, dates, labels, targets.
        expected = lamp.load_split(synthetic_dir, split)
        assert list(source) == expected
        # The profile items too, which `==` leaves out (baselines and BM25 prompts read them).
        assert [e.history_items for e in source] == [e.history_items for e in expected]
        assert any(e.history_items for e in source)
    assert all(e.target is None for e in tfds_lamp.data_source(synthetic_builder, "dev_new"))
    assert list(synthetic_builder.data_path.glob("*.array_record*"))
    assert "tensorflow" not in sys.modules


def test_builder_reads_real_amazon_music_without_tensorflow(tmp_path, lamp_real):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    for path in _lamp_json(lamp_real / "amazon_music"):
        (manual_dir / path.name).symlink_to(path)
    builder = tfds_lamp.prepare(manual_dir, tmp_path / "tfds", "LaMP_3")
    assert sorted(builder.info.splits) == ["dev", "dev_new", "train"]
    for split in builder.info.splits:
        expected = lamp.load_split(lamp_real / "amazon_music", split)
        source = tfds_lamp.data_source(builder, split)
        assert len(source) == len(expected)
        assert [e.id for e in source] == [e.id for e in expected]
        assert list(source) == expected
    assert "tensorflow" not in sys.modules


def test_prepare_reuses_its_data_and_refuses_other_files(synthetic_dir, synthetic_builder,
                                                         tmp_path):
    data_dir = Path(synthetic_builder.data_dir).parents[2]  # {data_dir}/lamp/LaMP_3/1.0.0
    again = tfds_lamp.prepare(synthetic_dir, data_dir, "LaMP_3")
    assert list(tfds_lamp.data_source(again, "dev")) == lamp.load_split(synthetic_dir, "dev")
    other = synthetic.write_lamp_dir(tmp_path / "other", "LaMP_3", num_users=4, seed=1)
    with pytest.raises(ValueError, match="other LaMP files"):
        tfds_lamp.prepare(other, data_dir, "LaMP_3")
    with pytest.raises(lamp.LampFormatError, match="no .split._questions.json"):
        tfds_lamp.prepare(tmp_path, tmp_path / "empty_tfds", "LaMP_3")


def test_builder_reports_bad_files_like_the_reader(tmp_path):
    manual_dir = synthetic.write_lamp_dir(tmp_path / "manual", "LaMP_3", num_users=4)
    (manual_dir / "dev_questions.json").write_text("[{\"id\": 3}]")
    with pytest.raises(lamp.LampFormatError, match=r"dev_questions.json: record 0: field 'id'"):
        tfds_lamp.prepare(manual_dir, tmp_path / "tfds", "LaMP_3")


# --------------------------------------------------------------------------------------------
# Grain pipeline.


def test_shuffle_is_deterministic_by_seed_and_differs_across_epochs(train_source):
    size = len(train_source)

    def order(seed):
        return _indices(grain_pipeline.make_train_dataset(
            train_source, seed=seed, batch_size=1, featurize=_featurize, num_epochs=2))

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    epoch_1, epoch_2 = first[:size], first[size:]
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(size))
    assert epoch_1 != epoch_2 and epoch_1 != sorted(epoch_1)


def test_augmentation_adds_copies_only_for_long_histories(train_source):
    copies = 3
    seen: list[lamp.Example] = []
    dataset = grain_pipeline.make_train_dataset(
        train_source, seed=0, batch_size=1, featurize=_recording_featurize(seen),
        augment_copies=copies, num_epochs=1, prefetch_batches=0)  # `seen` in batch order
    indices = _indices(dataset)
    counts = collections.Counter(indices)
    long = [i for i, e in enumerate(train_source) if len(e.history) > 2]
    assert 0 < len(long) < len(train_source)  # both kinds are present
    assert counts == {i: 1 + copies * (i in long) for i in range(len(train_source))}
    assert len(indices) == grain_pipeline.num_train_examples(train_source, copies)

    originals = 0
    for index, example in zip(indices, seen):
        original = train_source[index]
        if example == original:
            originals += 1
            continue
        # (text, date, label) triples: dates are unique within a user's timeline.
        full = list(zip(original.history, original.history_dates, original.history_labels))
        kept = list(zip(example.history, example.history_dates, example.history_labels))
        assert len(kept) == len(example.history)
        assert 1 <= len(full) - len(kept) <= max(1, len(full) // 2)  # 1..50% dropped
        remaining = iter(full)
        assert all(item in remaining for item in kept)  # a subsequence: order preserved
        assert (example.id, example.input, example.target) == (
            original.id, original.input, original.target)
    assert originals == len(train_source)


def test_augmented_copy_is_seeded_by_seed_index_and_copy(train_source):
    example = max(train_source, key=lambda e: len(e.history))
    assert len(example.history) > 4

    def copy(seed=0, index=5, number=1, max_history=None):
        return grain_pipeline.augmented_copy(example, seed=seed, index=index, copy=number,
                                             max_history=max_history)

    assert copy() == copy()
    assert len({copy(index=i).history for i in range(20)}) > 1
    assert len({copy(number=n).history for n in range(1, 20)}) > 1
    recent = copy(max_history=4).history  # drops from the items the model sees
    assert 2 <= len(recent) <= 3 and set(recent) <= set(example.history[-4:])
    short = dataclasses.replace(example, history=example.history[:2], history_dates=None,
                                history_labels=None)
    assert grain_pipeline.augmented_copy(short, seed=0, index=0, copy=1) is None


def test_processes_walk_the_same_batches_and_featurize_their_rows(train_source):
    def batches(rows=None):
        return list(grain_pipeline.make_train_dataset(
            train_source, seed=0, batch_size=4, featurize=_featurize, augment_copies=2,
            num_epochs=1, rows=rows))

    whole = batches()
    halves = [batches(slice(0, 2)), batches(slice(2, 4))]
    assert len(whole) == len(halves[0]) == len(halves[1])
    for batch, first, second in zip(whole, *halves):
        assert len(first["index"]) == len(second["index"]) == 2
        for key in ("index", "example_mask", "history_count"):
            np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))


def test_eval_reads_every_example_once_in_order_padding_the_last_batch(train_source):
    batches = list(grain_pipeline.make_eval_dataset(train_source, batch_size=5,
                                                    featurize=_featurize))
    assert len(train_source) % 5 and len(batches) == -(-len(train_source) // 5)
    assert _indices(batches) == list(range(len(train_source)))
    last = batches[-1]
    assert len(last["index"]) == 5 and (last["index"][~last["example_mask"]] == -1).all()
    assert not last["example_mask"].all()


def test_iterator_state_resumes_with_the_same_batches(train_source):
    def dataset():
        return grain_pipeline.make_train_dataset(
            train_source, seed=3, batch_size=4, featurize=_featurize, augment_copies=2)

    per_epoch = grain_pipeline.num_train_examples(train_source, 2) // 4
    iterator = iter(dataset())
    for _ in range(per_epoch - 2):  # stop just before an epoch boundary
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]

    resumed = iter(dataset())
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(5))):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])



# --------------------------------------------------------------------------------------------
# config.data.source = "tfds" in the commands.


def _tiny_config(source: str, **data):
    from configs import lamp3

    config = lamp3.get_config("tiny")
    config.data.source = source
    config.data.update(data)
    return config


def test_recipes_apply_on_read_to_a_tfds_split(tmp_path):
    from plug_jax import experiment

    splits = {}
    for source in ("json", "tfds"):
        config = _tiny_config(source, history_labels=True)
        config.method = "pplug_bm25"
        splits[source] = experiment.load_splits(config, tmp_path, ("train", "dev"))
    for split in ("train", "dev"):
        lazy, eager = splits["tfds"][split], splits["json"][split]
        assert isinstance(lazy, lamp.MappedExamples) and isinstance(eager, list)
        assert list(lazy) == eager  # BM25 prompts read the TFDS records' profile items
        assert list(lazy[3:7]) == eager[3:7] and len(lazy[3:7]) == 4
    assert "is the score for" in eager[0].input and eager[0].history[0].startswith("score ")
    assert "tensorflow" not in sys.modules


def test_training_and_evaluation_from_tfds_match_json(tmp_path):
    from plug_jax import train

    runs = {}
    for source in ("json", "tfds"):
        config = _tiny_config(source)
        config.optim.max_steps = 4
        runs[source] = train.run(config, tmp_path / source, baselines=("majority", "profile"))
    assert isinstance(runs["tfds"].experiment.splits["train"], lamp.MappedExamples)
    assert runs["tfds"].losses == runs["json"].losses  # the same batches, in the same order
    assert set(runs["tfds"].metrics) == {"pplug", "majority", "profile"}
    assert runs["tfds"].metrics == runs["json"].metrics
