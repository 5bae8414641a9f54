"""Is method A better than method B on the same questions? Per-question scores and paired tests.

`per_question_scores` splits each official metric (`plug_jax.metrics`) into one number per
question whose mean is the metric: correctness for accuracy, absolute error for MAE, squared error
for RMSE (the test compares the mean squared errors, which RMSE orders the same way), ROUGE-1 and
ROUGE-L F-measure. Macro-F1 does not split per question and has no test here.

`compare` tests each metric with the paired test that fits it: McNemar for accuracy (two methods'
right/wrong on the same questions), a paired t-test for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from plug_jax import metrics
from plug_jax.data.lamp import get_task


def per_question_scores(task_name: str, predictions: Sequence[str],
                        golds: Sequence[str]) -> dict[str, np.ndarray]:
    """One score per question for each splittable metric of the task.

    Returns:
      LaMP_1/2: {"accuracy": 1.0 right / 0.0 wrong}; LaMP_3: {"mae": |error|, "rmse": error**2};
      LaMP_4/5/7: {"rouge-1", "rouge-L"}, each F-measure. Scored exactly as `metrics.evaluate`.
    """
    task = get_task(task_name)
    if task.kind == "classification":
        metrics.classification_metrics(predictions, golds, task.labels)  # checks the lengths
        right = (metrics.label_indices(predictions, task.labels)
                 == metrics.label_indices(golds, task.labels))
        return {"accuracy": right.astype(np.float64)}
    if task.kind == "regression":
        metrics.rating_metrics(predictions, golds)  # checks lengths and golds
        gold = np.array([float(str(g).strip()) for g in golds])
        error = np.array([metrics.parse_rating(p, g) for p, g in zip(predictions, gold)]) - gold
        return {"mae": np.abs(error), "rmse": error ** 2}
    return metrics.rouge_per_question(predictions, golds)


def paired_test(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of a paired t-test (scipy `ttest_rel`) on per-question scores.

    Identical scores give 1.0 (scipy's nan: no difference to test).
    """
    a, b = _paired(a, b)
    if len(a) < 2:
        raise ValueError("a paired t-test needs at least 2 questions")
    p_value = float(stats.ttest_rel(a, b).pvalue)
    return 1.0 if np.isnan(p_value) else p_value


def mcnemar(a_correct: Sequence[bool | float], b_correct: Sequence[bool | float], *,
            exact: bool = True) -> float:
    """Two-sided p-value of McNemar's test on two methods' right/wrong answers to the same
    questions.

    Only discordant questions count: n01 (A right, B wrong) and n10 (A wrong, B right). Exact:
    a binomial test of n01 out of n01 + n10 at 1/2 (scipy `binomtest`); otherwise the chi-squared
    statistic with continuity correction, (|n01 - n10| - 1)^2 / (n01 + n10), on 1 degree of
    freedom. No discordant question gives 1.0.
    """
    a, b = _paired(a_correct, b_correct)
    a, b = a.astype(bool), b.astype(bool)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    if exact:
        return float(stats.binomtest(a_only, discordant, 0.5).pvalue)
    statistic = (abs(a_only - b_only) - 1) ** 2 / discordant
    return float(stats.chi2.sf(statistic, df=1))


def compare(task_name: str, predictions_a: Sequence[str], predictions_b: Sequence[str],
            golds: Sequence[str]) -> dict[str, float]:
    """p-values that A and B differ, per metric (keys as `per_question_scores`): McNemar (exact)
    for accuracy, a paired t-test otherwise."""
    scores_a = per_question_scores(task_name, predictions_a, golds)
    scores_b = per_question_scores(task_name, predictions_b, golds)
    return {name: (mcnemar(scores_a[name], scores_b[name]) if name == "accuracy"
                   else paired_test(scores_a[name], scores_b[name]))
            for name in scores_a}


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of one length, got shapes "
                         f"{a.shape} and {b.shape}")
    return a, b
