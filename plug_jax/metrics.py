"""LaMP metrics, computed as the official evaluation does (LaMP repository, eval/evaluation.py).

- LaMP_1, LaMP_2: accuracy and macro-F1 over the task's label list. Outputs are stripped and
  mapped to their index in the list; anything else maps to -1, which is wrong for every gold label
  and is left out of the F1 label set (sklearn `f1_score(labels=range(L), average="macro")`).
- LaMP_3: MAE and RMSE of the parsed scores; an output `float()` cannot parse takes the worst
  case, 1.0 when the gold is nearer 5 and 5.0 otherwise. So does one that parses to no finite
  number ("nan", "inf", "1e999"), which would otherwise poison the mean.
- LaMP_4, LaMP_5, LaMP_7: ROUGE-1 and ROUGE-L F-measure (`rouge_score`, no stemming).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from plug_jax.data.lamp import get_task


def _check_lengths(predictions: Sequence[str], golds: Sequence[str]) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} golds")
    if not golds:
        raise ValueError("nothing to evaluate: no golds")


def label_indices(texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Index of each stripped text in `labels`, or -1 when it is not a label."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(str(text).strip(), -1) for text in texts], dtype=np.int64)


def macro_f1(predicted: np.ndarray, gold: np.ndarray, num_labels: int) -> float:
    """Macro-F1 over labels 0..num_labels-1, as sklearn with `labels=range(num_labels)`.

    Label -1 (an unknown output) counts against the labels it was mistaken for but has no F1 of its
    own. A label with no gold and no prediction has F1 0 (sklearn's zero_division) and still
    counts in the mean.
    """
    scores = []
    for label in range(num_labels):
        tp = np.sum((predicted == label) & (gold == label))
        fp = np.sum((predicted == label) & (gold != label))
        fn = np.sum((predicted != label) & (gold == label))
        # 2PR / (P + R) written without the divisions, so P or R = 0/0 gives 0.
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def classification_metrics(predictions: Sequence[str], golds: Sequence[str],
                           labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of LaMP_1 / LaMP_2 outputs against the task's label list."""
    _check_lengths(predictions, golds)
    predicted, gold = label_indices(predictions, labels), label_indices(golds, labels)
    # Compared as indices, like the official code (so two unknown strings would "agree").
    return {"accuracy": float(np.mean(predicted == gold)),
            "f1": macro_f1(predicted, gold, len(labels))}


def parse_rating(prediction: str, gold: float) -> float:
    """The predicted score, or the worst case for an output that is no finite number."""
    try:
        score = float(str(prediction).strip())
    except ValueError:
        score = math.nan
    if math.isfinite(score):
        return score
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def rating_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """MAE and RMSE of LaMP_3 scores (golds must parse as numbers)."""
    _check_lengths(predictions, golds)
    gold = np.array([float(str(g).strip()) for g in golds])
    predicted = np.array([parse_rating(p, g) for p, g in zip(predictions, gold)])
    error = predicted - gold
    return {"mae": float(np.mean(np.abs(error))),
            "rmse": math.sqrt(float(np.mean(error ** 2)))}


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer  # here: with nltk, 1.2 s of start-up

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_metrics(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure of LaMP_4/5/7 outputs.

    The official code goes through HF `evaluate`, whose default aggregator reports the median of
    bootstrap resamples of the mean; we report the plain mean, which that estimates.
    """
    scores = rouge_per_question(predictions, golds)
    return {name: float(np.mean(values)) for name, values in scores.items()}


def rouge_per_question(predictions: Sequence[str], golds: Sequence[str]) -> dict[str, np.ndarray]:
    """Each output's ROUGE-1 and ROUGE-L F-measure: {"rouge-1": [...], "rouge-L": [...]}."""
    _check_lengths(predictions, golds)
    rouge1, rougeL = [], []
    for prediction, gold in zip(predictions, golds):
        scores = _rouge().score(gold.strip(), prediction.strip())  # (target, prediction)
        rouge1.append(scores["rouge1"].fmeasure)
        rougeL.append(scores["rougeL"].fmeasure)
    return {"rouge-1": np.array(rouge1), "rouge-L": np.array(rougeL)}


def evaluate(task_name: str, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """The official metrics of one LaMP task, for predictions aligned with golds.

    Returns:
      LaMP_1/2: {"accuracy", "f1"}; LaMP_3: {"mae", "rmse"};
      LaMP_4/5/7: {"rouge-1", "rouge-L"}.
    """
    task = get_task(task_name)
    if task.kind == "classification":
        return classification_metrics(predictions, golds, task.labels)
    if task.kind == "regression":
        return rating_metrics(predictions, golds)
    return rouge_metrics(predictions, golds)


@dataclasses.dataclass(frozen=True)
class HeadlineMetric:
    """The one number a task is judged by (for model selection and reports)."""

    name: str
    higher_is_better: bool

    def is_better(self, value: float, than: float) -> bool:
        """Whether `value` beats `than` (strictly)."""
        return value > than if self.higher_is_better else value < than


_HEADLINE = {
    "classification": HeadlineMetric("accuracy", higher_is_better=True),
    "regression": HeadlineMetric("mae", higher_is_better=False),
    "generation": HeadlineMetric("rouge-1", higher_is_better=True),
}


def headline_metric(task_name: str) -> HeadlineMetric:
    """LaMP_1/2: accuracy; LaMP_3: MAE (lower is better); LaMP_4/5/7: ROUGE-1."""
    return _HEADLINE[get_task(task_name).kind]
