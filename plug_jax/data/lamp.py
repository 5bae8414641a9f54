"""LaMP tasks and files, read exactly as the benchmark ships them.

A LaMP split is two files in one directory:

  {split}_questions.json  [{"id", "input", "profile": [{...}, ...], "user_id"?}, ...]
  {split}_outputs.json    {"task": "LaMP_3", "golds": [{"id", "output"}, ...]}

The outputs file is absent for test splits; then every target is None. The time-based LaMP files
also carry a `user_id` per question.

Each question becomes an `Example`: the full templated `input` (what the LLM reads), the `query`
(the input without its template: what the user embedder reads), and the user's `history`, one text
per profile item, oldest first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from etils import epath

from plug_jax import errors, workdir

TaskKind = Literal["classification", "regression", "generation"]

# One profile item as (field, value) pairs: hashable and picklable, unlike a dict.
ProfileItem = tuple[tuple[str, str], ...]


class LampFormatError(errors.UserError):
    """A LaMP file that breaks the benchmark's format; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One LaMP question with its user's history.

    Attributes:
      id: the question id, as in the file.
      user_id: the question's `user_id` (time-based LaMP), else None.
      input: the templated prompt, exactly as in the file.
      query: the non-template part of `input` (see `Task.query_from_input`).
      history: one text per profile item (`Task.history_text`), oldest first, so the most recent
        k items are `history[-k:]`.
      target: the gold output, or None when the split has no outputs file.
      history_dates: the items' dates as strings, aligned with `history`; None when some item has
        no date (then `history` keeps the file's order).
      history_labels: the items' labels (LaMP_2 tag, LaMP_3 score), aligned with `history`; None
        for tasks whose profile items carry no label.
      history_items: the items' task fields (`Task.history_fields` and `Task.label_field`) as
        (field, value) pairs, aligned with `history`; None when the source does not keep them.
        Derived from the same profile as `history`, so left out of `==` and hash: an example
        reads equal with or without it.
    """

    id: str
    user_id: str | None
    input: str
    query: str
    history: tuple[str, ...]
    target: str | None
    history_dates: tuple[str, ...] | None = None
    history_labels: tuple[str, ...] | None = None
    history_items: tuple[ProfileItem, ...] | None = dataclasses.field(
        default=None, compare=False, hash=False)

    def profile_items(self) -> list[dict[str, str]]:
        """`history_items` as dicts, oldest first; ValueError when the example has none."""
        if self.history_items is None:
            raise ValueError(f"example {self.id!r} carries no history_items (parse it from the "
                             "LaMP files with load_split / parse_examples)")
        return [dict(item) for item in self.history_items]


@dataclasses.dataclass(frozen=True)
class MappedExamples(Sequence[Example]):
    """`transform(source[i])`, computed on every read: a split too large to hold in memory (a TFDS
    `data_source`) seen through a recipe without materializing it. A slice is another view."""

    source: Sequence[Example]
    transform: Callable[[Example], Example] | None = None
    indices: range | None = None  # None: all of `source`

    def _indices(self) -> range:
        return range(len(self.source)) if self.indices is None else self.indices

    def __len__(self) -> int:
        return len(self._indices())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return dataclasses.replace(self, indices=self._indices()[index])
        example = self.source[self._indices()[index]]  # IndexError past the end ends iteration
        return example if self.transform is None else self.transform(example)


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between LaMP tasks: prompt template, labels, profile fields.

    Attributes:
      name: "LaMP_1" ... "LaMP_7".
      kind: how outputs are scored (see `plug_jax.metrics`).
      labels: the official label list of a classification or rating task, else None.
      input_template: the official prompt, a `str.format` template.
      query_from_input: input -> its non-template part; ValueError if the input does not follow
        the template.
      history_text: profile item -> the text the user embedder encodes.
      history_fields: the profile item fields `history_text` reads (all strings).
      label_field: the profile item's label field (LaMP_2 "tag", LaMP_3 "score"), else None.
      max_new_tokens: a generous decoding budget for this task's outputs.
    """

    name: str
    kind: TaskKind
    labels: tuple[str, ...] | None
    input_template: str
    query_from_input: Callable[[str], str]
    history_text: Callable[[Mapping[str, Any]], str]
    history_fields: tuple[str, ...]
    label_field: str | None
    max_new_tokens: int

    def format_input(self, **fields: str) -> str:
        """Fills the official prompt template, e.g. `format_input(review="...")` for LaMP_3."""
        return self.input_template.format(**fields)


# The official LaMP_2 (movie tags) label list, in the LaMP repository's order.
LAMP2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)

_LAMP1_TEMPLATE = (
    'For an author who has written the paper with the title "{title}", which reference is'
    ' related? Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"')
_LAMP1_PATTERN = re.compile(
    r'For an author who has written the paper with the title "(?P<title>.*)", which reference is'
    r' related\? Just answer with \[1\] or \[2\] without explanation\.'
    r'\s*\[1\]: "(?P<ref1>.*)"\s*\[2\]: "(?P<ref2>.*)"\s*',
    re.DOTALL)


def lamp1_parts(text: str) -> dict[str, str]:
    """A LaMP_1 input's {"title", "ref1", "ref2"}; ValueError if it does not follow the template."""
    match = _LAMP1_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(
            'does not follow the LaMP_1 template (... title "T", ... [1]: "R1" [2]: "R2")')
    return match.groupdict()


def _lamp1_query(text: str) -> str:
    parts = lamp1_parts(text)
    return f"{parts['title']} [1]: {parts['ref1']} [2]: {parts['ref2']}"


_REFERENCE_QUERY_MARKERS = {"LaMP_2": "description: ", "LaMP_3": "review: ", "LaMP_4": "article: ",
                            "LaMP_5": "paper: ", "LaMP_7": "before or after it: "}


def reference_query(task: str | Task, text: str, lamp1_query: str = "title") -> str:
    """The query as rucliujn/PPlug's process_qry cuts it, from a possibly truncated input.

    LaMP_1 with lamp1_query="title": the text between 'title "' and the next '",' (the paper
    title alone); "title_and_refs": our `Task.query_from_input`, falling back to the title cut
    when truncation broke the template. Other tasks: all text after the template's marker. A
    missing marker (truncated away) leaves the whole text rather than the reference's
    off-by-(-1) slice.
    """
    name = get_task(task).name
    if name == "LaMP_1":
        if lamp1_query == "title_and_refs":
            try:
                return get_task(task).query_from_input(text)
            except ValueError:
                pass
        elif lamp1_query != "title":
            raise errors.ConfigError(f"lamp1_query {lamp1_query!r}: expected 'title' or 'title_and_refs'")
        start = text.find('title "')
        if start < 0:
            return text
        start += len('title "')
        end = text.find('",', start)
        return text[start:] if end < 0 else text[start:end]
    marker = _REFERENCE_QUERY_MARKERS[name]
    start = text.find(marker)
    return text if start < 0 else text[start + len(marker):]


def _text_after(marker: str, task_name: str) -> Callable[[str], str]:
    """The query is all text after the template's first `marker`, as PPlug extracts it."""

    def query_from_input(text: str) -> str:
        start = text.find(marker)
        if start < 0:
            raise ValueError(f"does not follow the {task_name} template (no {marker!r})")
        return text[start + len(marker):]

    return query_from_input


def _joined(*names: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda item: " ".join(item[name] for name in names)


# history_text follows rucliujn/PPlug embedding.py: text fields only, never the label (tag, score).
TASKS: dict[str, Task] = {task.name: task for task in (
    Task(
        name="LaMP_1",
        kind="classification",
        labels=("[1]", "[2]"),
        input_template=_LAMP1_TEMPLATE,
        query_from_input=_lamp1_query,
        history_text=_joined("title", "abstract"),
        history_fields=("title", "abstract"),
        label_field=None,
        max_new_tokens=4,
    ),
    Task(
        name="LaMP_2",
        kind="classification",
        labels=LAMP2_TAGS,
        input_template=(
            "Which tag does this movie relate to among the following tags? Just answer with the"
            f" tag name without further explanation. tags: [{', '.join(LAMP2_TAGS)}]"
            " description: {description}"),
        query_from_input=_text_after("description: ", "LaMP_2"),
        history_text=_joined("description"),
        history_fields=("description",),
        label_field="tag",
        max_new_tokens=8,
    ),
    Task(
        name="LaMP_3",
        kind="regression",
        labels=("1", "2", "3", "4", "5"),
        input_template=(
            "What is the score of the following review on a scale of 1 to 5? just answer with"
            " 1, 2, 3, 4, or 5 without further explanation. review: {review}"),
        query_from_input=_text_after("review: ", "LaMP_3"),
        history_text=_joined("text"),
        history_fields=("text",),
        label_field="score",
        max_new_tokens=4,  # "4." and end of turn, with room to spare
    ),
    Task(
        name="LaMP_4",
        kind="generation",
        labels=None,
        input_template="Generate a headline for the following article: {article}",
        query_from_input=_text_after("article: ", "LaMP_4"),
        history_text=_joined("text", "title"),
        history_fields=("text", "title"),
        label_field=None,
        max_new_tokens=32,
    ),
    Task(
        name="LaMP_5",
        kind="generation",
        labels=None,
        input_template="Generate a title for the following abstract of a paper: {abstract}",
        query_from_input=_text_after("paper: ", "LaMP_5"),
        history_text=_joined("title", "abstract"),
        history_fields=("title", "abstract"),
        label_field=None,
        max_new_tokens=32,
    ),
    Task(
        name="LaMP_7",
        kind="generation",
        labels=None,
        input_template=(
            "Paraphrase the following tweet without any explanation before or after it: {tweet}"),
        query_from_input=_text_after("before or after it: ", "LaMP_7"),
        history_text=_joined("text"),
        history_fields=("text",),
        label_field=None,
        max_new_tokens=48,
    ),
)}


def get_task(task: str | Task) -> Task:
    """The `Task` named "LaMP_3" (or "LaMP-3"); a `Task` is returned as is."""
    if isinstance(task, Task):
        return task
    name = task.replace("-", "_")
    if name not in TASKS:
        raise errors.ConfigError(f"unknown LaMP task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------------------------
# Parsing.


def _type_name(value: Any) -> str:
    return {dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _record_at(source: str, index: int, record: Any, kind: str = "record") -> str:
    """"file: record 12 (id 'x')": how every error about one record starts."""
    rid = record.get("id") if isinstance(record, dict) else None
    where = f"{source}: {kind} {index}"
    return f"{where} (id {rid!r})" if isinstance(rid, str) else where


def _field(where: str, record: Mapping[str, Any], name: str, types: type | tuple[type, ...],
           type_name: str, key: str | None = None) -> Any:
    """`record[key]`, checked to be of `types`; errors call the field `name`."""
    key = name if key is None else key
    if key not in record:
        raise LampFormatError(f"{where}: field {name!r} is missing")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):  # JSON true is no integer here
        raise LampFormatError(
            f"{where}: field {name!r} must be {type_name}, got {_type_name(value)}")
    return value


def _date_order(dates: Sequence[str]) -> list[int]:
    """Indices that sort `dates` oldest first; stable, so ties keep the file's order.

    Dates are read as dash-separated integers, as LaMP's own recency sort does: this orders ISO
    dates ("2014-06-12") and Unix times ("971568000" < "1129161600") alike. Anything else falls
    back to string order.
    """
    try:
        keys = [tuple(int(part) for part in date.split("-")) for date in dates]
    except ValueError:
        keys = list(dates)
    return sorted(range(len(dates)), key=keys.__getitem__)


def _parse_question(task: Task, record: Any, where: str, target: str | None) -> Example:
    if not isinstance(record, dict):
        raise LampFormatError(f"{where}: must be an object, got {_type_name(record)}")
    qid = _field(where, record, "id", str, "a string")
    text = _field(where, record, "input", str, "a string")
    profile = _field(where, record, "profile", list, "a list")
    user_id = None
    if record.get("user_id") is not None:
        user_id = _field(where, record, "user_id", str, "a string")
    try:
        query = task.query_from_input(text)
    except ValueError as e:
        raise LampFormatError(f"{where}: field 'input' {e}") from None

    required = task.history_fields + ((task.label_field,) if task.label_field else ())
    texts, labels, dates, items = [], [], [], []
    for j, item in enumerate(profile):
        if not isinstance(item, dict):
            raise LampFormatError(
                f"{where}: field 'profile[{j}]' must be an object, got {_type_name(item)}")
        for name in required:
            _field(where, item, f"profile[{j}].{name}", str, "a string", key=name)
        texts.append(task.history_text(item))
        items.append(tuple((name, item[name]) for name in required))
        if task.label_field:
            labels.append(item[task.label_field])
        if "date" in item:
            date = _field(where, item, f"profile[{j}].date", (str, int), "a string or an integer",
                          key="date")
            dates.append(str(date))

    history_dates = None
    if len(dates) == len(profile):  # Sort only when every item is dated.
        order = _date_order(dates)
        texts = [texts[i] for i in order]
        labels = [labels[i] for i in order] if labels else labels
        items = [items[i] for i in order]
        history_dates = tuple(dates[i] for i in order)
    return Example(
        id=qid,
        user_id=user_id,
        input=text,
        query=query,
        history=tuple(texts),
        target=target,
        history_dates=history_dates,
        history_labels=tuple(labels) if task.label_field else None,
        history_items=tuple(items),
    )


def _parse_outputs(outputs: Any, source: str) -> tuple[str, dict[str, str]]:
    if not isinstance(outputs, dict):
        raise LampFormatError(
            f"{source}: must be an object {{task, golds}}, got {_type_name(outputs)}")
    task_name = _field(source, outputs, "task", str, "a string")
    golds = _field(source, outputs, "golds", list, "a list")
    by_id: dict[str, str] = {}
    for k, gold in enumerate(golds):
        where = _record_at(source, k, gold, kind="gold")
        if not isinstance(gold, dict):
            raise LampFormatError(f"{where}: must be an object, got {_type_name(gold)}")
        gid = _field(where, gold, "id", str, "a string")
        output = _field(where, gold, "output", str, "a string")
        if gid in by_id:
            raise LampFormatError(f"{where}: field 'id' repeats an earlier gold")
        by_id[gid] = output
    return task_name, by_id


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _task_of_ids(questions: Any) -> str | None:
    """"LaMP_3" from a first question id such as "LaMP_3-0e5882dabb-2", if it has that form."""
    if isinstance(questions, list) and questions and isinstance(questions[0], dict):
        match = re.match(r"LaMP_\d+", str(questions[0].get("id", "")))
        return match[0] if match else None
    return None


def parse_examples(
    questions: Any,
    outputs: Any | None,
    task: str | Task | None = None,
    *,
    questions_source: str = "questions",
    outputs_source: str = "outputs",
) -> tuple[Task, list[Example]]:
    """Checks decoded LaMP JSON against the format and turns it into `Example`s.

    Args:
      questions: the decoded `{split}_questions.json`.
      outputs: the decoded `{split}_outputs.json`, or None (targets are then None).
      task: the expected task; None takes it from `outputs["task"]`, else from the "LaMP_N"
        prefix of the first question id. A mismatch is an error.
      questions_source, outputs_source: how error messages name the two files.

    Returns:
      The task and the examples, in the questions' order.

    Raises:
      LampFormatError: one line naming the file, the record (index and id) and the field.
    """
    golds = None
    if outputs is not None:
        file_task, golds = _parse_outputs(outputs, outputs_source)
        if file_task.replace("-", "_") not in TASKS:
            raise LampFormatError(f"{outputs_source}: field 'task' is {file_task!r}, not one of "
                                  f"{', '.join(TASKS)}")
        file_task = file_task.replace("-", "_")
        if task is not None and get_task(task).name != file_task:
            raise LampFormatError(f"{outputs_source}: field 'task' is {file_task!r} but task "
                                  f"{get_task(task).name!r} was asked for")
    else:
        file_task = _task_of_ids(questions)
        if task is not None and file_task not in (None, get_task(task).name):
            raise LampFormatError(f"{questions_source}: record 0: field 'id' names task "
                                  f"{file_task!r} but task {get_task(task).name!r} was asked for")
    if task is None and file_task is None:
        raise LampFormatError(f"{questions_source}: cannot tell the task (no outputs file, no "
                              "LaMP_N id prefix); pass task=")
    resolved = get_task(task if task is not None else file_task)
    if golds is not None and resolved.kind == "regression":
        for k, (gid, output) in enumerate(golds.items()):
            if not _is_finite_number(output):
                raise LampFormatError(f"{outputs_source}: gold {k} (id {gid!r}): field 'output' "
                                      f"must be a score such as \"4\", got {output!r}")

    if not isinstance(questions, list):
        raise LampFormatError(
            f"{questions_source}: must be a list of questions, got {_type_name(questions)}")
    examples, seen = [], set()
    for i, record in enumerate(questions):
        where = _record_at(questions_source, i, record)
        target = None
        if golds is not None and isinstance(record, dict) and isinstance(record.get("id"), str):
            if record["id"] not in golds:
                raise LampFormatError(f"{where}: no gold output in {outputs_source}")
            target = golds[record["id"]]
        example = _parse_question(resolved, record, where, target)
        if example.id in seen:
            raise LampFormatError(f"{where}: field 'id' repeats an earlier question")
        seen.add(example.id)
        examples.append(example)
    if golds is not None and len(golds) != len(seen):
        k, gid = next((k, gid) for k, gid in enumerate(golds) if gid not in seen)
        raise LampFormatError(
            f"{outputs_source}: gold {k} (id {gid!r}): no question with this id in "
            f"{questions_source}")
    return resolved, examples


# --------------------------------------------------------------------------------------------
# Files.


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LampFormatError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LampFormatError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LampFormatError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def load_split(data_dir: str | os.PathLike[str], split: str,
               task: str | Task | None = None) -> list[Example]:
    """Reads `{split}_questions.json` and, when present, `{split}_outputs.json`.

    Args:
      data_dir: a directory in the LaMP layout.
      split: the file name prefix: "train", "dev", "dev_new", "test", ...
      task: the expected task, or None to infer it (see `parse_examples`).

    Returns:
      The examples in the questions file's order; targets are None without an outputs file.

    Raises:
      LampFormatError: a missing questions file, invalid JSON, a record that breaks the format,
        or no question at all; the one-line message names the file, the record and the field.
    """
    data_dir = epath.Path(data_dir)
    questions_path = data_dir / f"{split}_questions.json"
    outputs_path = data_dir / f"{split}_outputs.json"
    if not questions_path.is_file():
        raise LampFormatError(f"{data_dir}: no {questions_path.name} (a LaMP split is "
                              f"{split}_questions.json with an optional {split}_outputs.json)")
    questions = _read_json(questions_path)
    outputs = _read_json(outputs_path) if outputs_path.is_file() else None
    _, examples = parse_examples(questions, outputs, task, questions_source=str(questions_path),
                                 outputs_source=str(outputs_path))
    if not examples:
        raise LampFormatError(f"{questions_path}: no questions (an empty split)")
    return examples


def read_outputs(path: str | os.PathLike[str]) -> tuple[str, dict[str, str]]:
    """Reads a LaMP outputs file (golds or predictions) -> (task name, {id: output})."""
    path = epath.Path(path)
    if not path.is_file():
        raise LampFormatError(f"{path.parent}: no {path.name}")
    return _parse_outputs(_read_json(path), str(path))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes `obj` as UTF-8 JSON atomically: a temporary file, then a rename over `path`."""
    with workdir.open_atomic(path, "w") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_predictions(path: str | os.PathLike[str], task_name: str, ids: Sequence[str],
                      outputs: Sequence[str]) -> None:
    """Writes predictions as LaMP outputs, `{"task", "golds": [{"id", "output"}]}`.

    This is the file the official `LaMPEvaluation.evaluate_task` reads; `read_outputs` reads it
    back.
    """
    task = get_task(task_name)
    ids, outputs = list(ids), list(outputs)
    if len(ids) != len(outputs):
        raise ValueError(f"{len(ids)} ids but {len(outputs)} outputs")
    for name, values in (("ids", ids), ("outputs", outputs)):
        for value in values:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be strings, got {_type_name(value)}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    write_json(path, {"task": task.name,
                      "golds": [{"id": i, "output": o} for i, o in zip(ids, outputs)]})
