"""LaMP metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from plug_jax import evaluate, metrics


def test_lamp1_accuracy_f1_with_an_unknown_label():
    golds = ["[1]", "[1]", "[2]", "[2]"]
    predictions = [" [1] ", "[2]", "[2]", "3"]  # stripped first; "3" is no label -> index -1
    result = metrics.evaluate("LaMP_1", predictions, golds)
    # Indices: predicted [0, 1, 1, -1], gold [0, 0, 1, 1]: rows 0 and 2 agree -> accuracy 2/4.
    assert result["accuracy"] == pytest.approx(0.5)
    # "[1]": tp 1, fp 0, fn 1 -> P 1, R 1/2, F1 2/3.
    # "[2]": tp 1, fp 1 (row 1), fn 1 (row 3, the unknown output) -> P 1/2, R 1/2, F1 1/2.
    # The unknown output is no class of its own: the mean is over the 2 labels only.
    assert result["f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # 7/12


def test_lamp2_macro_f1_counts_every_label_in_the_list():
    golds = ["comedy", "comedy", "action"]
    predictions = ["comedy", "horror", "action"]  # "horror" is not a LaMP_2 tag
    result = metrics.evaluate("LaMP_2", predictions, golds)
    assert result["accuracy"] == pytest.approx(2 / 3)
    # comedy: tp 1, fn 1 -> F1 2/3; action: tp 1 -> F1 1; the 13 tags never seen or predicted
    # have F1 0 (zero division) and still count: (2/3 + 1) / 15 = 1/9.
    assert result["f1"] == pytest.approx(1 / 9)


def test_lamp3_mae_rmse_with_unparseable_outputs():
    golds = ["4", "2", "5", "1"]
    predictions = ["4", "3.5", "five", "?"]
    result = metrics.evaluate("LaMP_3", predictions, golds)
    # Errors: |4-4| = 0; |3.5-2| = 1.5;
    # "five" vs gold 5: |1-5| = 4 > |5-5| = 0 -> worst case 1.0, error 4;
    # "?" vs gold 1: |1-1| = 0 > |5-1| = 4 is false -> worst case 5.0, error 4.
    assert result["mae"] == pytest.approx((0 + 1.5 + 4 + 4) / 4)  # 2.375
    assert result["rmse"] == pytest.approx(math.sqrt((0 + 2.25 + 16 + 16) / 4))  # 2.926...


def test_parse_rating_worst_case_both_ways():
    assert metrics.parse_rating(" 4 ", 1.0) == 4.0
    assert metrics.parse_rating("", 4.0) == 1.0  # gold nearer 5: worst is 1
    assert metrics.parse_rating("n/a", 2.0) == 5.0  # gold nearer 1: worst is 5
    assert metrics.parse_rating("n/a", 3.0) == 5.0  # a tie goes to 5.0, as in the official code


def test_rouge_unigram_overlap_and_lcs():
    golds = ["police arrest the suspect downtown", "Council Approves New Park Budget"]
    predictions = ["downtown police arrest a suspect", " Council Approves Budget! "]
    result = metrics.evaluate("LaMP_4", predictions, golds)
    # Pair 1, 5 tokens each. Shared unigrams: police, arrest, suspect, downtown = 4
    #   -> P = R = 4/5, ROUGE-1 F = 0.8.
    #   LCS: police arrest suspect = 3 (downtown comes first in one, last in the other)
    #   -> P = R = 3/5, ROUGE-L F = 0.6.
    # Pair 2 (lower-cased, punctuation dropped): prediction "council approves budget" (3 tokens),
    #   gold 5 tokens; overlap 3 and LCS 3 -> P = 1, R = 3/5, F = 2 * 0.6 / 1.6 = 0.75 for both.
    assert result["rouge-1"] == pytest.approx((0.8 + 0.75) / 2)  # 0.775
    assert result["rouge-L"] == pytest.approx((0.6 + 0.75) / 2)  # 0.675


def test_evaluate_keys_per_task():
    assert set(metrics.evaluate("LaMP_1", ["[1]"], ["[1]"])) == {"accuracy", "f1"}
    assert set(metrics.evaluate("LaMP-2", ["comedy"], ["comedy"])) == {"accuracy", "f1"}
    assert metrics.evaluate("LaMP_3", ["3"], ["3"]) == {"mae": 0.0, "rmse": 0.0}
    for task in ("LaMP_4", "LaMP_5", "LaMP_7"):
        assert metrics.evaluate(task, ["a b"], ["a b"]) == {"rouge-1": 1.0, "rouge-L": 1.0}


def test_evaluate_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 golds"):
        metrics.evaluate("LaMP_3", ["1", "2"], ["1"])
    with pytest.raises(ValueError, match="no golds"):
        metrics.evaluate("LaMP_4", [], [])


def test_headline_metric():
    assert metrics.headline_metric("LaMP_2") == metrics.HeadlineMetric("accuracy", True)
    mae = metrics.headline_metric("LaMP_3")
    assert mae.name == "mae" and not mae.higher_is_better and mae.is_better(0.2, than=0.3)
    assert metrics.headline_metric("LaMP_7").name == "rouge-1"
    for task in ("LaMP_1", "LaMP_2", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"):
        name = metrics.headline_metric(task).name
        assert name in metrics.evaluate(task, ["1"], ["1"])


def test_label_choices_minimise_the_expected_error_by_hand():
    labels = ("1", "2", "3", "4", "5")
    probs = np.array([[0.1, 0.1, 0.1, 0.3, 0.4],     # median 4 (cumulative 0.6), mean 3.8
                      [0.0, 0.0, 0.0, 0.0, 1.0],     # 5 by every rule
                      [0.3, 0.1, 0.05, 0.1, 0.45]])  # likeliest 5, median 4 (0.55), mean 3.30
    nll = -np.log(np.maximum(probs, 1e-30))
    assert evaluate.choose_labels(nll, labels, "likeliest") == ["5", "5", "5"]
    assert evaluate.choose_labels(nll, labels, "median") == ["4", "5", "4"]
    assert evaluate.choose_labels(nll, labels, "mean") == ["3.80", "5.00", "3.30"]
    shuffled = (4, 0, 2, 1, 3)  # the rules read label values, not their order
    assert evaluate.choose_labels(nll[:, shuffled], [labels[i] for i in shuffled], "median") == [
        "4", "5", "4"]
    with pytest.raises(ValueError, match="numeric labels"):
        evaluate.choose_labels(nll[:, :2], ["[1]", "[2]"], "median")


def test_a_number_that_is_not_finite_is_unparsable():
    for output in ("nan", "NaN", "inf", "-inf", "1e999", " Infinity "):
        assert metrics.parse_rating(output, 2.0) == 5.0, output
        assert metrics.parse_rating(output, 4.0) == 1.0, output
    assert metrics.rating_metrics(["nan", "inf", "4"], ["1", "5", "4"]) == {
        "mae": (4 + 4 + 0) / 3, "rmse": ((16 + 16) / 3) ** 0.5}
