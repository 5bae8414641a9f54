"""Property-based checks: the LaMP parser and the metrics' output parsers, over hundreds to
thousands of generated inputs, never fail but in the one way they document."""

import math

from hypothesis import given, settings, strategies as st

from plug_jax import metrics
from plug_jax.data import lamp

# A few seconds each on a 2-core CPU.
def examples(n):
    return settings(max_examples=n, deadline=None)

# JSON-like values, biased towards the LaMP shapes so that generation reaches deep fields.
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
field_values = st.sampled_from(["review: ", "x"]).flatmap(
    lambda prefix: st.text(max_size=12).map(lambda text: prefix + text)) | json_values
profile_items = st.fixed_dictionaries(
    {}, optional={"text": field_values, "score": field_values, "date": field_values,
                  "id": field_values})
questions = st.fixed_dictionaries(
    {}, optional={"id": st.sampled_from(["q0", "q1"]) | json_values,
                  "input": st.just("What is the score ... review: good") | field_values,
                  "profile": st.lists(profile_items | json_values, max_size=3) | json_values,
                  "user_id": field_values})
outputs = st.fixed_dictionaries(
    {}, optional={"task": st.sampled_from(["LaMP_3", "LaMP-3", "LaMP_9"]) | json_values,
                  "golds": st.lists(st.fixed_dictionaries(
                      {}, optional={"id": st.sampled_from(["q0", "q1"]) | json_values,
                                    "output": field_values}) | json_values, max_size=3)
                  | json_values})


@examples(400)
@given(questions=st.lists(questions | json_values, max_size=3) | json_values,
       outputs=st.none() | outputs | json_values, task=st.sampled_from([None, "LaMP_3"]))
def test_parse_examples_gives_examples_or_a_one_line_lamp_format_error(questions, outputs, task):
    try:
        parsed_task, examples = lamp.parse_examples(questions, outputs, task)
    except lamp.LampFormatError as error:
        assert "\n" not in str(error).replace("\\n", "")
        return
    assert parsed_task.name == "LaMP_3"
    assert all(isinstance(e, lamp.Example) and isinstance(e.input, str) for e in examples)
    assert len({e.id for e in examples}) == len(examples)


@examples(1000)
@given(prediction=st.text() | st.floats().map(str) | st.integers().map(str),
       gold=st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0]))
def test_lamp3_parsing_is_always_a_finite_score_within_the_worst_case(prediction, gold):
    score = metrics.parse_rating(prediction, gold)
    assert math.isfinite(score)
    try:
        parsed = float(prediction.strip())
    except ValueError:
        parsed = math.nan
    assert score == (parsed if math.isfinite(parsed) else (1.0 if gold > 3 else 5.0))


@examples(300)
@given(predictions=st.lists(st.text(max_size=12) | st.sampled_from(lamp.LAMP2_TAGS), min_size=1,
                            max_size=6),
       data=st.data())
def test_label_matching_never_fails_and_stays_in_range(predictions, data):
    golds = data.draw(st.lists(st.sampled_from(lamp.LAMP2_TAGS), min_size=len(predictions),
                               max_size=len(predictions)))
    indices = metrics.label_indices(predictions, lamp.LAMP2_TAGS)
    assert all(-1 <= i < len(lamp.LAMP2_TAGS) for i in indices)
    assert all((i >= 0) == (p.strip() in lamp.LAMP2_TAGS) for i, p in zip(indices, predictions))
    scores = metrics.evaluate("LaMP_2", predictions, golds)
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["f1"] <= 1.0
    scores = metrics.evaluate("LaMP_3", predictions, ["3"] * len(predictions))
    assert math.isfinite(scores["mae"]) and math.isfinite(scores["rmse"])
