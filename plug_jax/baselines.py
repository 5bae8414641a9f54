"""LLM-free LaMP baselines, and the LaMP paper's BM25 retrieval-augmented prompts.

Predictions (one output string per `lamp.Example`, ready for `plug_jax.metrics.evaluate`):

- `majority`: LaMP_1/2/3 the most frequent label among the training targets; LaMP_4/5/7 the
  user's most recent past output (`latest_output`).
- `profile`: the user's own history alone (see `profile` for each task's rule); a user with no
  history gets the training majority.

Retrieval (`retrieve`, `retrieval_prompt`): the user's top-k profile items by BM25 (`bm25s`)
against the question, written into the input the way the LaMP repository builds its
retrieval-augmented prompts (LaMP/prompts/prompts.py), with a character budget in place of its
token budget.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from plug_jax.data.lamp import Example, Task, get_task, lamp1_parts

METHODS = ("majority", "profile")



@functools.cache
def _bm25s():
    """bm25s, imported on first use: importing it starts JAX's backend (it can score with JAX),
    which must wait for jax.distributed in multi-host runs."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # a DEBUG line per index otherwise
    return bm25s

# The profile field that holds what the user wrote as output: a past headline, title or tweet.
OUTPUT_FIELD = {"LaMP_4": "title", "LaMP_5": "title", "LaMP_7": "text"}


# --------------------------------------------------------------------------------------------
# Majority and profile baselines.


def majority_label(task: str | Task, train_targets: Iterable[str | None]) -> str:
    """The most frequent label among the training targets (ties: the earlier label in
    `task.labels`); targets outside the label list are ignored."""
    task = get_task(task)
    if task.labels is None:
        raise ValueError(f"{task.name} is a generation task: it has no majority label")
    counts = collections.Counter(t.strip() for t in train_targets if t is not None)
    best = max(task.labels, key=lambda label: (counts[label], -task.labels.index(label)))
    if counts[best] == 0:
        raise ValueError(f"no training target of {task.name} is one of its labels")
    return best


def latest_output(task: str | Task, example: Example) -> str | None:
    """The user's most recent past output (LaMP_4/5 the newest item's title, LaMP_7 its text), or
    None when the history is empty."""
    field = OUTPUT_FIELD[get_task(task).name]
    items = example.profile_items()
    return items[-1][field] if items else None


def majority(task: str | Task, examples: Sequence[Example],
             train_targets: Iterable[str | None] | None = None) -> list[str]:
    """The majority baseline: one training label for every question (LaMP_1/2/3), or each user's
    latest output (LaMP_4/5/7; "" for a user with no history: free text has no majority)."""
    task = get_task(task)
    if task.kind == "generation":
        return [_or_empty(latest_output(task, example)) for example in examples]
    label = majority_label(task, _required(train_targets, task))
    return [label] * len(examples)


def profile(task: str | Task, examples: Sequence[Example],
            train_targets: Iterable[str | None] | None = None) -> list[str]:
    """The profile baseline: an answer from the user's history alone.

    - LaMP_1: the reference ([1] or [2]) that shares more distinct content words (lowercased
      words of 2+ characters, English stopwords dropped) with the titles of the user's papers.
    - LaMP_2: the user's most frequent tag among the official tags (ties: the more recent tag).
    - LaMP_3: the median of the user's past scores, rounded half up (a median of 4.5 answers
      "5"), as "1".."5".
    - LaMP_4/5/7: the user's latest output, as `majority`.

    A user with no usable history (and a LaMP_1 tie) gets the training majority, so
    `train_targets` is needed for LaMP_1/2/3.
    """
    task = get_task(task)
    if task.kind == "generation":
        return majority(task, examples)
    fallback = majority_label(task, _required(train_targets, task))
    answer = {"LaMP_1": _closer_reference, "LaMP_2": _favourite_tag,
              "LaMP_3": _median_score}[task.name]
    outputs = []
    for example in examples:
        guess = answer(task, example)
        outputs.append(fallback if guess is None else guess)
    return outputs


def predict(method: str, task: str | Task, examples: Sequence[Example],
            train_targets: Iterable[str | None] | None = None) -> list[str]:
    """`majority` or `profile` by name."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(METHODS)}")
    return {"majority": majority, "profile": profile}[method](task, examples, train_targets)


def _required(train_targets: Iterable[str | None] | None, task: Task) -> Iterable[str | None]:
    if train_targets is None:
        raise ValueError(f"{task.name} needs the training targets for its majority label")
    return train_targets


def _or_empty(text: str | None) -> str:
    return "" if text is None else text


def content_words(text: str) -> set[str]:
    """Lowercased words of 2+ characters without English stopwords (bm25s's tokenization)."""
    stopwords = _stopwords()
    return {word for word in re.findall(r"\b\w\w+\b", text.lower()) if word not in stopwords}


@functools.cache
def _stopwords() -> frozenset[str]:
    _bm25s()
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def _closer_reference(task: Task, example: Example) -> str | None:
    parts = lamp1_parts(example.input)
    titles = set().union(*(content_words(item["title"]) for item in example.profile_items()))
    overlaps = [len(content_words(parts[ref]) & titles) for ref in ("ref1", "ref2")]
    if overlaps[0] == overlaps[1]:
        return None
    return task.labels[int(np.argmax(overlaps))]


def _favourite_tag(task: Task, example: Example) -> str | None:
    tags = [tag for tag in example.history_labels or () if tag in task.labels]
    if not tags:
        return None
    counts = collections.Counter(tags)
    last_seen = {tag: i for i, tag in enumerate(tags)}  # history is oldest first
    return max(counts, key=lambda tag: (counts[tag], last_seen[tag]))


def _median_score(task: Task, example: Example) -> str | None:
    scores = []
    for label in example.history_labels or ():
        try:
            scores.append(float(label))
        except ValueError:
            continue
    if not scores:
        return None
    rounded = math.floor(statistics.median(scores) + 0.5)
    low, high = int(task.labels[0]), int(task.labels[-1])
    return str(min(max(rounded, low), high))


# --------------------------------------------------------------------------------------------
# BM25 retrieval.


def retrieval_query(task: str | Task, example: Example) -> str:
    """What LaMP's retriever searches the profile with: LaMP_1 the two references, otherwise the
    input without its template (`example.query`)."""
    task = get_task(task)
    if task.name == "LaMP_1":
        parts = lamp1_parts(example.input)
        return f"{parts['ref1']} {parts['ref2']}"
    return example.query.strip()


def retrieve(task: str | Task, example: Example, k: int) -> list[int]:
    """Indices into `example.history` of the user's k best profile items by BM25, best first.

    The corpus is each item's `history` text (the fields LaMP's retriever indexes); scoring is
    `bm25s` (Lucene BM25, k1=1.5, b=0.75) over `bm25s.tokenize` words with English stopwords
    dropped. Ties, including a query or profile with no words at all, go to the more recent item.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    texts = list(example.history)
    if not texts or k == 0:
        return []
    scores = _bm25_scores(texts, retrieval_query(task, example))
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], -i))
    return order[:k]


def _bm25_scores(texts: list[str], query: str) -> np.ndarray:
    bm25s = _bm25s()
    tokenized = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
    query_tokens = bm25s.tokenize([query], stopwords="en", return_ids=False,
                                  show_progress=False)[0]
    vocabulary = {token for tokens in tokenized for token in tokens}
    query_tokens = [token for token in query_tokens if token in vocabulary]
    if not query_tokens:
        return np.zeros(len(texts))
    retriever = bm25s.BM25(k1=1.5, b=0.75)
    retriever.index(tokenized, show_progress=False)
    return np.asarray(retriever.get_scores(query_tokens), dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How LaMP writes one task's retrieved items into the input.

    Attributes:
      item: a `str.format` template over a profile item's fields.
      cut_field: the long field that is shortened to fit the budget (text, abstract, ...).
      wrap: (joined items, original input) -> the augmented input.
    """

    item: str
    cut_field: str
    wrap: Callable[[str, str], str]


def _after_first_title(items: str, text: str) -> str:
    # LaMP_1 puts the user's titles right after the word "title" of the input.
    at = text.find("title")
    if at < 0:
        return text
    return f"{text[:at + 5]}, and {items}{text[at + 5:]}"


ITEM_SEPARATOR = ", and "

PROMPT_FORMATS = {
    "LaMP_1": PromptFormat('"{title}"', "title", _after_first_title),
    "LaMP_2": PromptFormat('the tag for the movie: "{description}" is "{tag}" ', "description",
                           lambda items, text: f"{items}. {text}"),
    "LaMP_3": PromptFormat('{score} is the score for "{text}" ', "text",
                           lambda items, text: f"{items}. {text}"),
    "LaMP_4": PromptFormat('"{title}" is the title for "{text}" ', "text",
                           lambda items, text: f"{items}. {text}"),
    "LaMP_5": PromptFormat('"{title}" is a title for "{abstract}" ', "abstract",
                           lambda items, text: f"{items}. Following the given patterns {text}"),
    "LaMP_7": PromptFormat('"{text}" ', "text",
                           lambda items, text:
                           f"{items} are written by a person. Following the given patterns {text}"),
}


def retrieval_prompt(task: str | Task, example: Example, k: int, *, max_chars: int = 2048,
                     max_input_share: float = 0.6) -> str:
    """The input with the user's top-k BM25 items written in, in LaMP's format for the task.

    For example LaMP_3 with two items:
    `5 is the score for "Great." , and 2 is the score for "Meh." . What is the score ...`.

    The budget follows LaMP's prompt builder in characters instead of tokens: the items get
    `max_chars` less the input's length (the input counted as at most `max_input_share` of
    `max_chars`), shared evenly, with what one item leaves unused passed to the next; each item's
    long field (`PromptFormat.cut_field`) is cut to fit, and items whose fixed part alone no
    longer fits are left out. The input itself is never cut. With no history it is returned as is.
    """
    task = get_task(task)
    prompt_format = PROMPT_FORMATS[task.name]
    chosen = retrieve(task, example, k)
    if not chosen:
        return example.input
    items = example.profile_items()
    budget = max_chars - min(len(example.input), int(max_input_share * max_chars))
    budget -= len(prompt_format.wrap("", ""))
    budget -= len(ITEM_SEPARATOR) * (len(chosen) - 1)
    share, spare = budget // len(chosen), 0
    written = []
    for index in chosen:
        item = items[index]
        fixed = len(prompt_format.item.format(**{**item, prompt_format.cut_field: ""}))
        room = share + spare - fixed
        if room < 0:
            spare += share
            continue
        cut = item[prompt_format.cut_field][:room]
        written.append(prompt_format.item.format(**{**item, prompt_format.cut_field: cut}))
        spare = room - len(cut)
    if not written:
        return example.input
    return prompt_format.wrap(ITEM_SEPARATOR.join(written), example.input)
