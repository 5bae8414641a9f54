"""Reading LaMP files: real data in the benchmark's layout, and every kind of bad input."""

import copy
import json
from pathlib import Path

import pytest

from plug_jax import errors
from plug_jax.data import lamp

REAL_DIRS = {"amazon_music": "LaMP_3", "news_v3": "LaMP_4"}
SPLITS = ("train", "dev", "dev_new")


def _template_prefix(task: lamp.Task) -> str:
    """The template text before its one field, e.g. "... review: " for LaMP_3."""
    return task.input_template[:task.input_template.index("{")]


@pytest.mark.parametrize("name", REAL_DIRS)
def test_real_data_loads_with_stats_counts(name, lamp_real):
    stats = json.loads((lamp_real / name / "stats.json").read_text())
    for split in SPLITS:
        examples = lamp.load_split(lamp_real / name, split)
        assert len(examples) == stats[split]["questions"]
        assert len({e.user_id for e in examples}) == stats[split]["users"]
        task_name, golds = lamp.read_outputs(lamp_real / name / f"{split}_outputs.json")
        assert task_name == REAL_DIRS[name]
        assert {e.id: e.target for e in examples} == golds


@pytest.mark.parametrize("name", REAL_DIRS)
def test_real_data_queries_drop_the_template(name, lamp_real):
    task = lamp.TASKS[REAL_DIRS[name]]
    prefix = _template_prefix(task)
    for example in lamp.load_split(lamp_real / name, "dev"):
        assert example.input == prefix + example.query
        assert example.query and not example.query.startswith(prefix[:20])
        assert example.target is not None


@pytest.mark.parametrize("name", REAL_DIRS)
def test_real_data_history_is_oldest_first(name, lamp_real):
    task = lamp.TASKS[REAL_DIRS[name]]
    questions = json.loads((lamp_real / name / "dev_questions.json").read_text())
    examples = lamp.load_split(lamp_real / name, "dev")
    for record, example in zip(questions, examples):
        # LaMP_3 dates are Unix times ("971568000" < "1129161600"), LaMP_4 dates ISO dates.
        key = ((lambda item: int(item["date"])) if name == "amazon_music"
               else (lambda item: item["date"]))
        expected = sorted(record["profile"], key=key)
        assert example.history == tuple(task.history_text(item) for item in expected)
        assert example.history_dates == tuple(item["date"] for item in expected)
        if name == "amazon_music":
            assert example.history_labels == tuple(item["score"] for item in expected)
    if name == "amazon_music":
        # Unix times of 9 and 10 digits: string order would get some of these profiles wrong.
        assert any(sorted(r["profile"], key=lambda item: item["date"])
                   != sorted(r["profile"], key=lambda item: int(item["date"])) for r in questions)


def test_real_data_text_is_read_as_written(lamp_real):
    reviews = lamp.load_split(lamp_real / "amazon_music", "train")
    assert any("&quot;" in e.query for e in reviews)  # HTML entities stay as in the file
    news = lamp.load_split(lamp_real / "news_v3", "train")
    assert any("\u2019" in e.query for e in news)  # non-ASCII stays
    assert news[0].history[0].endswith(" " + json.loads(
        (lamp_real / "news_v3/train_questions.json").read_text())[0]["profile"][0]["title"])


def test_history_text_per_task():
    item = {"title": "T", "abstract": "A", "description": "D", "text": "X", "score": "5",
            "tag": "comedy"}
    texts = {name: task.history_text(item) for name, task in lamp.TASKS.items()}
    # As rucliujn/PPlug embedding.py: text fields only, no label.
    assert texts == {"LaMP_1": "T A", "LaMP_2": "D", "LaMP_3": "X", "LaMP_4": "X T",
                     "LaMP_5": "T A", "LaMP_7": "X"}


def test_queries_of_every_template():
    cases = {
        "LaMP_1": ({"title": "Deep Nets", "ref1": "On Graphs", "ref2": "Speech"},
                   "Deep Nets [1]: On Graphs [2]: Speech"),
        "LaMP_2": ({"description": "A heist."}, "A heist."),
        "LaMP_3": ({"review": "Great: loved it."}, "Great: loved it."),
        "LaMP_4": ({"article": "The mayor said: no."}, "The mayor said: no."),
        "LaMP_5": ({"abstract": "We study x."}, "We study x."),
        "LaMP_7": ({"tweet": "so tired: monday"}, "so tired: monday"),
    }
    for name, (fields, query) in cases.items():
        task = lamp.TASKS[name]
        assert task.query_from_input(task.format_input(**fields)) == query
    assert lamp.TASKS["LaMP_1"].format_input(title="T", ref1="A", ref2="B") == (
        'For an author who has written the paper with the title "T", which reference is related?'
        ' Just answer with [1] or [2] without explanation. [1]: "A" [2]: "B"')
    assert len(lamp.TASKS["LaMP_2"].labels) == 15
    assert "tags: [sci-fi, based on a book, comedy," in lamp.TASKS["LaMP_2"].input_template


# --------------------------------------------------------------------------------------------
# A tiny split, and what each way of breaking it reports.


def _tiny_split():
    task = lamp.TASKS["LaMP_3"]
    questions = [
        {"id": "LaMP_3-u1-0", "user_id": "u1", "input": task.format_input(review="Nice one."),
         "profile": [{"id": "p1", "text": "Later.", "score": "2", "date": "1000000000"},
                     {"id": "p0", "text": "Earlier.", "score": "4", "date": "999999999"}]},
        {"id": "LaMP_3-u2-0", "user_id": "u2", "input": task.format_input(review="Bad."),
         "profile": []},
    ]
    outputs = {"task": "LaMP_3", "golds": [{"id": "LaMP_3-u2-0", "output": "1"},
                                           {"id": "LaMP_3-u1-0", "output": "5"}]}
    return questions, outputs


def _write(directory: Path, questions, outputs, split="dev"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{split}_questions.json").write_text(json.dumps(questions))
    if outputs is not None:
        (directory / f"{split}_outputs.json").write_text(json.dumps(outputs))
    return directory


def test_tiny_split_loads(tmp_path):
    examples = lamp.load_split(_write(tmp_path, *_tiny_split()), "dev")
    assert examples[0] == lamp.Example(
        id="LaMP_3-u1-0", user_id="u1", input=examples[0].input, query="Nice one.",
        history=("Earlier.", "Later."), target="5",
        history_dates=("999999999", "1000000000"), history_labels=("4", "2"))
    assert examples[1].history == () and examples[1].target == "1"


def test_without_outputs_targets_are_none(tmp_path):
    questions, _ = _tiny_split()
    examples = lamp.load_split(_write(tmp_path, questions, None), "dev")
    assert [e.target for e in examples] == [None, None]


def test_undated_items_keep_file_order(tmp_path):
    questions, outputs = _tiny_split()
    del questions[0]["profile"][1]["date"]
    example = lamp.load_split(_write(tmp_path, questions, outputs), "dev")[0]
    assert example.history == ("Later.", "Earlier.") and example.history_dates is None


def _set(path, value):
    def mutate(questions, outputs):
        target = {"q": questions, "o": outputs}[path[0]]
        for key in path[1:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return mutate


QUESTIONS = "dev_questions.json"
OUTPUTS = "dev_outputs.json"
BAD_INPUTS = {
    "profile not a list": (
        _set(("q", 1, "profile"), "none"),
        f"{QUESTIONS}: record 1 (id 'LaMP_3-u2-0'): field 'profile' must be a list, got str"),
    "missing input": (
        _set(("q", 0, "input"), KeyError),
        f"{QUESTIONS}: record 0 (id 'LaMP_3-u1-0'): field 'input' is missing"),
    "id not a string": (
        _set(("q", 1, "id"), 7),
        f"{QUESTIONS}: record 1: field 'id' must be a string, got int"),
    "record not an object": (
        _set(("q", 1), ["LaMP_3-u2-0"]),
        f"{QUESTIONS}: record 1: must be an object, got list"),
    "profile item lacks text": (
        _set(("q", 0, "profile", 1, "text"), KeyError),
        f"{QUESTIONS}: record 0 (id 'LaMP_3-u1-0'): field 'profile[1].text' is missing"),
    "profile item lacks score": (
        _set(("q", 0, "profile", 0, "score"), KeyError),
        f"{QUESTIONS}: record 0 (id 'LaMP_3-u1-0'): field 'profile[0].score' is missing"),
    "score not a string": (
        _set(("q", 0, "profile", 0, "score"), 2),
        f"{QUESTIONS}: record 0 (id 'LaMP_3-u1-0'): field 'profile[0].score' must be a string,"
        " got int"),
    "input off template": (
        _set(("q", 1, "input"), "Rate this: Bad."),
        f"{QUESTIONS}: record 1 (id 'LaMP_3-u2-0'): field 'input' does not follow the LaMP_3"
        " template (no 'review: ')"),
    "duplicate question": (
        _set(("q", 1, "id"), "LaMP_3-u1-0"),
        f"{QUESTIONS}: record 1 (id 'LaMP_3-u1-0'): field 'id' repeats an earlier question"),
    "gold without question": (
        lambda q, o: o["golds"].append({"id": "LaMP_3-u9-0", "output": "3"}),
        f"{OUTPUTS}: gold 2 (id 'LaMP_3-u9-0'): no question with this id in"),
    "question without gold": (
        lambda q, o: o["golds"].pop(0),
        f"{QUESTIONS}: record 1 (id 'LaMP_3-u2-0'): no gold output in"),
    "gold output not a string": (
        _set(("o", "golds", 1, "output"), 5),
        f"{OUTPUTS}: gold 1 (id 'LaMP_3-u1-0'): field 'output' must be a string, got int"),
    "outputs without task": (
        _set(("o", "task"), KeyError),
        f"{OUTPUTS}: field 'task' is missing"),
    "unknown task": (
        _set(("o", "task"), "LaMP_9"),
        f"{OUTPUTS}: field 'task' is 'LaMP_9', not one of LaMP_1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_naming_file_record_field(tmp_path, case):
    mutate, message = BAD_INPUTS[case]
    questions, outputs = copy.deepcopy(_tiny_split())
    mutate(questions, outputs)
    _write(tmp_path, questions, outputs)
    with pytest.raises(lamp.LampFormatError) as error:
        lamp.load_split(tmp_path, "dev")
    text = str(error.value)
    assert "\n" not in text
    assert message in text
    assert text.startswith(str(tmp_path))


def test_missing_file_names_directory_and_file(tmp_path):
    with pytest.raises(lamp.LampFormatError, match="dev_questions.json") as error:
        lamp.load_split(tmp_path, "dev")
    assert str(error.value).startswith(f"{tmp_path}: no dev_questions.json")
    assert isinstance(error.value, ValueError)


def test_invalid_json_names_line_and_column(tmp_path):
    (tmp_path / "dev_questions.json").write_text('[\n {"id": "x",\n  "input" "y"}\n]')
    with pytest.raises(lamp.LampFormatError) as error:
        lamp.load_split(tmp_path, "dev")
    assert str(error.value) == (f"{tmp_path / 'dev_questions.json'}: invalid JSON at line 3, "
                                "column 11: Expecting ':' delimiter")


def test_task_mismatch_is_an_error(tmp_path):
    _write(tmp_path, *_tiny_split())
    with pytest.raises(lamp.LampFormatError, match="'LaMP_3' but task 'LaMP_4' was asked for"):
        lamp.load_split(tmp_path, "dev", task="LaMP_4")
    questions, _ = _tiny_split()
    _write(tmp_path / "no_outputs", questions, None)
    with pytest.raises(lamp.LampFormatError, match="field 'id' names task 'LaMP_3'"):
        lamp.load_split(tmp_path / "no_outputs", "dev", task="LaMP_4")
    assert len(lamp.load_split(tmp_path / "no_outputs", "dev", task="LaMP-3")) == 2


def test_predictions_round_trip(tmp_path, lamp_real):
    # Predictions for the real news_v3 dev split, read back as that split's outputs.
    examples = lamp.load_split(lamp_real / "news_v3", "dev")
    (tmp_path / "dev_questions.json").symlink_to(lamp_real / "news_v3/dev_questions.json")
    outputs = [f"Headline \u2019{i}\u2019 &amp; caf\u00e9" for i in range(len(examples))]
    lamp.write_predictions(tmp_path / "dev_outputs.json", "LaMP_4", [e.id for e in examples],
                           outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev_outputs.json",
                                                          "dev_questions.json"]  # no temp file
    assert lamp.read_outputs(tmp_path / "dev_outputs.json") == (
        "LaMP_4", dict(zip([e.id for e in examples], outputs)))
    reread = lamp.load_split(tmp_path, "dev")
    assert [e.target for e in reread] == outputs
    assert [dataclass_without_target(e) for e in reread] == [
        dataclass_without_target(e) for e in examples]


def dataclass_without_target(example):
    return {k: v for k, v in vars(example).items() if k != "target"}


def test_write_predictions_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="2 ids but 1 outputs"):
        lamp.write_predictions(tmp_path / "p.json", "LaMP_3", ["a", "b"], ["1"])
    with pytest.raises(TypeError, match="outputs must be strings, got int"):
        lamp.write_predictions(tmp_path / "p.json", "LaMP_3", ["a"], [1])
    with pytest.raises(errors.ConfigError, match="unknown LaMP task .LaMP_6."):
        lamp.write_predictions(tmp_path / "p.json", "LaMP_6", ["a"], ["1"])
    assert not (tmp_path / "p.json").exists()
