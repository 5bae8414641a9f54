"""Synthetic LaMP: the real file layout, determinism, and a preference only the history reveals."""

import collections
import json

import pytest

from plug_jax import metrics
from plug_jax.data import lamp, synthetic

TASK_NAMES = ("LaMP_1", "LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7")
SIZES = dict(num_users=64, examples_per_user=4, profile_size=6, seed=3)
PROFILE_FIELDS = {  # the official field names of profile items
    "LaMP_1": {"id", "title", "abstract", "date"},
    "LaMP_2": {"id", "description", "tag", "date"},
    "LaMP_3": {"id", "text", "score", "date"},
    "LaMP_4": {"id", "title", "text", "date"},
    "LaMP_5": {"id", "title", "abstract", "date"},
    "LaMP_7": {"id", "text", "date"},
}


def _preferences(task_name):
    return {u.user_id: u.preference for u in synthetic.generate_users(
        task_name, SIZES["num_users"], SIZES["profile_size"], SIZES["seed"])}


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_written_dir_reads_back_as_generated(tmp_path, task_name):
    generated = synthetic.generate(task_name, **SIZES)
    synthetic.write_lamp_dir(tmp_path, task_name, **SIZES)
    for split in synthetic.SPLITS:
        assert lamp.load_split(tmp_path, split) == generated[split]  # task read from the file
        questions = json.loads((tmp_path / f"{split}_questions.json").read_text())
        for question in questions:
            assert set(question) == {"id", "user_id", "input", "profile"}
            for item in question["profile"]:
                assert set(item) == PROFILE_FIELDS[task_name]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["train"]["questions"] == len(generated["train"])


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_splits_users_and_histories(task_name):
    data = synthetic.generate(task_name, **SIZES)
    train_users = {e.user_id for e in data["train"]}
    dev_users = [e.user_id for e in data["dev"]]
    new_users = [e.user_id for e in data["dev_new"]]
    assert len(dev_users) == len(set(dev_users)) == len(train_users)  # one dev question each
    assert set(dev_users) == train_users
    assert new_users and not set(new_users) & train_users
    assert len(train_users) + len(new_users) == SIZES["num_users"]
    assert len(data["train"]) == SIZES["examples_per_user"] * len(train_users)

    # dev is each user's latest question: its history holds every train question's history.
    latest = {e.user_id: e for e in data["dev"]}
    for example in data["train"]:
        dev = latest[example.user_id]
        assert len(dev.history) > len(example.history)
        assert dev.history[:len(example.history)] == example.history
        assert example.history_dates == tuple(sorted(example.history_dates))

    # A few empty histories, in train and in dev_new; otherwise histories vary in length.
    assert 0 < sum(not e.history for e in data["train"]) < len(data["train"]) / 10
    assert any(not e.history for e in data["dev_new"])
    assert len({len(e.history) for e in data["dev"]}) > 3

    for split in data.values():
        for example in split:
            task = lamp.TASKS[task_name]
            if task_name != "LaMP_1":  # the official template with the query as its field
                assert example.input == task.input_template.split("{")[0] + example.query
            assert max(len(text.split()) for text in (example.query, *example.history)) <= 40


@pytest.mark.parametrize("task_name", TASK_NAMES)
def test_deterministic_by_seed(task_name):
    assert synthetic.generate(task_name, **SIZES) == synthetic.generate(task_name, **SIZES)
    assert synthetic.generate(task_name, **{**SIZES, "seed": 4}) != synthetic.generate(
        task_name, **SIZES)


# --------------------------------------------------------------------------------------------
# The hidden preference: a history-aware oracle beats the best history-blind answer.


def _clip(score):
    return min(max(score, 1), 5)


def _bias_from_history(example):
    """The bias that explains the most past scores given their reviews' visible sentiment."""
    if not example.history:
        return 0
    sentiments = [synthetic.review_sentiment(text) for text in example.history]
    fits = {bias: sum(_clip(s + bias) == int(score)
                      for s, score in zip(sentiments, example.history_labels))
            for bias in (0, -1, 1, -2, 2)}  # ties go to the smaller bias
    return max(fits, key=fits.get)


def test_lamp3_bias_is_in_history():
    data = synthetic.generate("LaMP_3", **SIZES)
    preferences = _preferences("LaMP_3")
    for split in ("dev", "dev_new"):
        examples = data[split]
        golds = [e.target for e in examples]
        sentiments = [synthetic.review_sentiment(e.query) for e in examples]
        blind = [str(s) for s in sentiments]  # bias 0: the best guess without a history
        aware = [str(_clip(s + _bias_from_history(e))) for s, e in zip(sentiments, examples)]
        blind_mae = metrics.evaluate("LaMP_3", blind, golds)["mae"]
        aware_mae = metrics.evaluate("LaMP_3", aware, golds)["mae"]
        # Bias uniform on -2..2 and sentiment on 2..4: blind MAE about 1.07, aware about 0.
        assert blind_mae > 0.7 and aware_mae < 0.2 and blind_mae - aware_mae > 0.6, (
            split, blind_mae, aware_mae)
    # The history texts alone show the bias too: each ends with the user's remark on rating.
    for example in data["dev"]:
        voices = synthetic.RATING_VOICES[int(preferences[example.user_id])]
        assert all(any(text.endswith(voice) for voice in voices) for text in example.history)
        assert not any(voice in example.query for v in synthetic.RATING_VOICES.values()
                       for voice in v)


def test_lamp2_favourite_tag_is_in_history():
    data = synthetic.generate("LaMP_2", **SIZES)
    examples = data["dev"] + data["dev_new"]
    golds = [e.target for e in examples]
    blind, aware = [], []
    for example in examples:
        offered = synthetic.tags_in_description(example.query)
        assert len(offered) == 3 and example.target in offered
        blind.append(offered[0])  # any history-blind rule is right 1 time in 3
        counts = collections.Counter(
            tag for text in example.history for tag in synthetic.tags_in_description(text))
        favourite = counts.most_common(1)[0][0] if counts else offered[0]
        aware.append(favourite if favourite in offered else offered[0])
    blind_accuracy = metrics.evaluate("LaMP_2", blind, golds)["accuracy"]
    aware_accuracy = metrics.evaluate("LaMP_2", aware, golds)["accuracy"]
    assert blind_accuracy < 0.5 and aware_accuracy > 0.9, (blind_accuracy, aware_accuracy)


def test_lamp1_topic_is_in_history():
    data = synthetic.generate("LaMP_1", **SIZES)
    examples = data["dev"] + data["dev_new"]
    golds = [e.target for e in examples]
    aware = []
    for example in examples:
        counts = {topic: sum(phrase in text for phrase in phrases for text in example.history)
                  for topic, phrases in synthetic.TOPICS.items()}
        topic = max(counts, key=counts.get)
        ref1 = example.query.split(" [1]: ")[1].split(" [2]: ")[0].lower()
        aware.append("[1]" if any(p in ref1 for p in synthetic.TOPICS[topic]) else "[2]")
    blind_accuracy = metrics.evaluate("LaMP_1", ["[1]"] * len(golds), golds)["accuracy"]
    aware_accuracy = metrics.evaluate("LaMP_1", aware, golds)["accuracy"]
    assert 0.3 < blind_accuracy < 0.7 and aware_accuracy > 0.9, (blind_accuracy, aware_accuracy)


@pytest.mark.parametrize("task_name", ("LaMP_4", "LaMP_5", "LaMP_7"))
def test_style_is_in_history(task_name):
    data = synthetic.generate(task_name, **SIZES)
    preferences = _preferences(task_name)
    styles = synthetic.STYLES[task_name]
    assert len(set(preferences.values())) > 4  # users differ: no single style fits all

    def parts(style):
        return [part for part in style.split("{}") if part]

    examples = data["dev"] + data["dev_new"]
    golds = [e.target for e in examples]
    blind, aware = [], []
    for example in examples:
        prefix, suffix = preferences[example.user_id].split("{}")
        base = example.target.removeprefix(prefix).removesuffix(suffix)
        assert example.target == prefix + base + suffix
        assert not any(part in example.query for style in styles for part in parts(style))
        blind.append(base)  # the unstyled answer, the best a history-blind model knows
        counts = {style: sum(all(p in text for p in parts(style)) for text in example.history)
                  for style in styles}
        aware.append(max(counts, key=counts.get).format(base) if example.history else base)
    blind_rouge = metrics.evaluate(task_name, blind, golds)["rouge-1"]
    aware_rouge = metrics.evaluate(task_name, aware, golds)["rouge-1"]
    # Gold texts of 4-9 words plus 1-3 style words: blind ROUGE-1 about 0.8, aware about 1.
    assert aware_rouge > 0.95 and aware_rouge - blind_rouge > 0.1, (blind_rouge, aware_rouge)
