"""LLM-free baselines, BM25 retrieval prompts and significance tests, on hand-made and real data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from plug_jax import baselines, metrics, significance
from plug_jax.data import lamp



def _examples(task_name, inputs_and_profiles):
    """Examples parsed from LaMP records, so history_items is filled as from the files."""
    task = lamp.get_task(task_name)
    questions = [{"id": f"{task.name}-q{i}", "input": text, "profile": profile}
                 for i, (text, profile) in enumerate(inputs_and_profiles)]
    return lamp.parse_examples(questions, None, task)[1]


def _lamp1_input(title, ref1, ref2):
    return lamp.get_task("LaMP_1").format_input(title=title, ref1=ref1, ref2=ref2)


def _review(text, score, date):
    return {"id": f"r{date}", "text": text, "score": score, "date": date}


# --------------------------------------------------------------------------------------------
# Example.history_items


def test_history_items_follow_history_order_and_stay_out_of_equality():
    [example] = _examples("LaMP_3", [(
        lamp.get_task("LaMP_3").format_input(review="Now."),
        [_review("Later.", "2", "2001-01-01"), _review("Earlier.", "4", "1999-01-01")])])
    assert example.history == ("Earlier.", "Later.")
    assert example.profile_items() == [{"text": "Earlier.", "score": "4"},
                                       {"text": "Later.", "score": "2"}]
    without = lamp.Example(**{**example.__dict__, "history_items": None})
    assert without == example and hash(without) == hash(example)
    with pytest.raises(ValueError, match="no history_items"):
        without.profile_items()


# --------------------------------------------------------------------------------------------
# majority and profile


def test_majority_label_counts_train_targets_and_breaks_ties_by_label_order():
    assert baselines.majority_label("LaMP_3", ["4", "5", "5", " 4", "3", None, "x"]) == "4"
    assert baselines.majority_label("LaMP_2", ["comedy", "sci-fi"]) == "sci-fi"
    with pytest.raises(ValueError, match="generation"):
        baselines.majority_label("LaMP_4", ["a"])
    with pytest.raises(ValueError, match="needs the training targets"):
        baselines.majority("LaMP_3", [])


def test_lamp3_majority_and_profile_median_rounds_half_up():
    review = lamp.get_task("LaMP_3").format_input(review="New.")
    examples = _examples("LaMP_3", [
        (review, [_review("a", "1", "1"), _review("b", "2", "2"), _review("c", "5", "3")]),
        (review, [_review("a", "4", "1"), _review("b", "5", "2")]),  # median 4.5 -> 5
        (review, [_review("a", "3", "1"), _review("b", "4", "2")]),  # median 3.5 -> 4
        (review, []),
    ])
    train = ["5", "4", "4"]
    assert baselines.majority("LaMP_3", examples, train) == ["4"] * 4
    assert baselines.profile("LaMP_3", examples, train) == ["2", "5", "4", "4"]


def test_lamp2_profile_is_the_users_favourite_tag():
    task = lamp.get_task("LaMP_2")
    text = task.format_input(description="A film.")
    movie = lambda tag, date: {"id": date, "description": "d", "tag": tag, "date": date}
    examples = _examples("LaMP_2", [
        (text, [movie("comedy", "1"), movie("romance", "2"), movie("comedy", "3")]),
        (text, [movie("comedy", "1"), movie("romance", "2")]),  # tie: the more recent tag
        (text, []),
    ])
    assert baselines.profile("LaMP_2", examples, ["classic", "classic", "action"]) == [
        "comedy", "romance", "classic"]


def test_lamp1_profile_picks_the_reference_sharing_more_title_words():
    paper = lambda title: {"id": title, "title": title, "abstract": "we study graphs"}
    profile = [paper("Neural machine translation with attention"),
               paper("Low-resource translation of speech")]
    examples = _examples("LaMP_1", [
        (_lamp1_input("Mine", "Protein folding in cells", "Speech translation at scale"), profile),
        (_lamp1_input("Mine", "Attention for translation", "Cooking pasta"), profile),
        (_lamp1_input("Mine", "Cooking pasta", "Growing tomatoes"), profile),  # tie
    ])
    assert baselines.profile("LaMP_1", examples, ["[2]", "[2]", "[1]"]) == ["[2]", "[1]", "[2]"]


@pytest.mark.parametrize("task_name,item,expected", [
    ("LaMP_4", lambda d: {"id": d, "title": f"Headline {d}", "text": "body", "date": d},
     "Headline 2"),
    ("LaMP_5", lambda d: {"id": d, "title": f"Title {d}", "abstract": "abs", "date": d},
     "Title 2"),
    ("LaMP_7", lambda d: {"id": d, "text": f"tweet {d}", "date": d}, "tweet 2"),
])
def test_generation_baselines_answer_the_users_latest_output(task_name, item, expected):
    text = lamp.get_task(task_name).input_template.format(article="x", abstract="x", tweet="x")
    examples = _examples(task_name, [(text, [item("2"), item("1")]), (text, [])])
    assert baselines.majority(task_name, examples) == [expected, ""]
    assert baselines.predict("profile", task_name, examples) == [expected, ""]


# --------------------------------------------------------------------------------------------
# BM25 retrieval and LaMP prompts


def test_bm25_picks_the_relevant_item_and_ties_go_to_the_recent_one():
    review = lamp.get_task("LaMP_3").format_input(review="A jazz fusion album with great drums.")
    [example] = _examples("LaMP_3", [(review, [
        _review("Pop singer with catchy hooks.", "3", "1"),
        _review("Jazz fusion drumming at its best, what drums!", "5", "2"),
        _review("A quiet folk record.", "2", "3"),
    ])])
    assert baselines.retrieve("LaMP_3", example, 1) == [1]
    assert baselines.retrieve("LaMP_3", example, 5) == [1, 2, 0]
    assert baselines.retrieve("LaMP_3", example, 0) == []


def test_lamp3_retrieval_prompt_has_lamps_format():
    review = lamp.get_task("LaMP_3").format_input(review="Jazz drums.")
    [example] = _examples("LaMP_3", [(review, [
        _review("Jazz drums rule.", "5", "1"), _review("More jazz.", "4", "2"),
        _review("Folk.", "1", "3")])])
    assert baselines.retrieval_prompt("LaMP_3", example, 2) == (
        '5 is the score for "Jazz drums rule." , and 4 is the score for "More jazz." . '
        + review)


def test_lamp1_and_lamp7_prompts_and_the_budget():
    [paper] = _examples("LaMP_1", [(_lamp1_input("Mine", "Graph nets", "Soup"), [
        {"id": "1", "title": "Graph neural nets", "abstract": "a"},
        {"id": "2", "title": "Cooking", "abstract": "b"}])])
    assert baselines.retrieval_prompt("LaMP_1", paper, 1) == (
        'For an author who has written the paper with the title, and "Graph neural nets" "Mine",'
        + paper.input.split('"Mine",', 1)[1])
    tweet = lamp.get_task("LaMP_7").format_input(tweet="coffee again")
    long_text = "coffee " * 200
    [example] = _examples("LaMP_7", [(tweet, [{"id": "1", "text": long_text, "date": "1"}])])
    prompt = baselines.retrieval_prompt("LaMP_7", example, 3, max_chars=300)
    assert prompt.endswith(" are written by a person. Following the given patterns " + tweet)
    assert prompt.startswith('"coffee coffee') and len(prompt) == 300
    [empty] = _examples("LaMP_7", [(tweet, [])])
    assert baselines.retrieval_prompt("LaMP_7", empty, 3) == tweet


# --------------------------------------------------------------------------------------------
# Significance


def test_mcnemar_matches_hand_computed_values():
    # A right and B wrong on 6 questions, the reverse on 1, 3 questions agree.
    a = [1] * 6 + [0] + [1, 1, 0]
    b = [0] * 6 + [1] + [1, 1, 0]
    assert significance.mcnemar(a, b) == 2 * (1 + 7) / 2 ** 7  # 2 P(X <= 1), X ~ B(7, 1/2)
    chi2 = (abs(6 - 1) - 1) ** 2 / 7
    assert significance.mcnemar(a, b, exact=False) == pytest.approx(math.erfc(math.sqrt(chi2 / 2)))
    assert significance.mcnemar(a, a) == 1.0
    assert significance.mcnemar([1] * 40, [0] * 40) < 1e-10


def test_paired_t_test_matches_scipy_and_hand_values():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.5, 2.0, 4.5]
    # Differences 1, .5, 1, -.5: mean .5, sd sqrt(0.5), t = .5 / (sqrt(.5) / 2) = sqrt(2).
    assert significance.paired_test(a, b) == pytest.approx(2 * stats.t.sf(math.sqrt(2), df=3))
    assert significance.paired_test(a, a) == 1.0
    rng = np.random.default_rng(0)
    noise = rng.normal(size=200)
    assert significance.paired_test(noise + 1.0, noise + rng.normal(scale=0.1, size=200)) < 1e-10


def test_per_question_scores_average_to_the_official_metrics():
    predictions, golds = ["5", "x", "3"], ["4", "2", "3"]
    scores = significance.per_question_scores("LaMP_3", predictions, golds)
    np.testing.assert_allclose(scores["mae"], [1, 3, 0])
    official = metrics.evaluate("LaMP_3", predictions, golds)
    assert np.mean(scores["mae"]) == pytest.approx(official["mae"])
    assert math.sqrt(np.mean(scores["rmse"])) == pytest.approx(official["rmse"])
    np.testing.assert_array_equal(
        significance.per_question_scores("LaMP_1", [" [1]", "[2]", "?"], ["[1]", "[1]", "[2]"])
        ["accuracy"], [1, 0, 0])
    rouge = significance.per_question_scores("LaMP_4", ["a b", "c"], ["a b", "d"])
    np.testing.assert_allclose(rouge["rouge-1"], [1, 0])
    assert set(significance.compare("LaMP_4", ["a b", "c"], ["a", "d"], ["a b", "d"])) == {
        "rouge-1", "rouge-L"}


# --------------------------------------------------------------------------------------------
# Real data


def test_real_amazon_music_baselines(lamp_real):
    train = lamp.load_split(lamp_real / "amazon_music", "train")
    dev = lamp.load_split(lamp_real / "amazon_music", "dev")
    train_targets, golds = [e.target for e in train], [e.target for e in dev]
    majority = baselines.majority("LaMP_3", dev, train_targets)
    assert set(majority) == {"5"}
    profile = baselines.profile("LaMP_3", dev, train_targets)
    mae = metrics.evaluate("LaMP_3", profile, golds)["mae"]
    assert 0.3 < mae < 0.7
    assert 0 <= significance.compare("LaMP_3", profile, majority, golds)["mae"] <= 1
    prompt = baselines.retrieval_prompt("LaMP_3", dev[0], 4)
    assert prompt.endswith(". " + dev[0].input) and " is the score for \"" in prompt
