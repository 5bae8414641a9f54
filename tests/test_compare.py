"""Every method on tiny models, and `compare` end to end over two seeds, resuming."""

import json

import numpy as np
import pytest

from configs import lamp3
from plug_jax import compare, errors, experiment, export, methods, metrics
from plug_jax.data import lamp

SEEDS = 2
EVAL_EXAMPLES = 6


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compare")
    config = lamp3.get_config("tiny")
    config.optim.max_steps = 2
    config.data.eval_splits = ("dev",)
    config.data.max_eval_examples = EVAL_EXAMPLES
    config.decode.method = "score"  # LaMP-3's labels ranked: one forward pass per label
    table = compare.compare(config, workdir, list(methods.METHODS), SEEDS, command="test")
    return workdir, config, table


def test_every_method_writes_lamp_predictions_scored_as_in_the_table(compared):
    workdir, config, table = compared
    data = experiment.data_dir(config, workdir)  # compare wrote the synthetic data there
    golds = [e.target for e in lamp.load_split(data, "dev", "LaMP_3")][:EVAL_EXAMPLES]
    assert set(table) == set(methods.METHODS)
    for name, method in methods.METHODS.items():
        seeds = SEEDS if method.trains else 1
        assert len(table[name]["dev"]["mae"]["seeds"]) == seeds
        for seed in range(seeds):
            task, predictions = lamp.read_outputs(
                workdir / name / f"seed{seed}" / f"predictions_{name}_dev.json")
            assert task == "LaMP_3" and len(predictions) == EVAL_EXAMPLES
            outputs = list(predictions.values())
            if method.uses_llm:  # label scoring answers with a label
                assert set(outputs) <= set(lamp.get_task("LaMP_3").labels)
            scored = metrics.evaluate("LaMP_3", outputs, golds)["mae"]
            assert scored == pytest.approx(table[name]["dev"]["mae"]["seeds"][seed])
        values = table[name]["dev"]["mae"]["seeds"]
        assert table[name]["dev"]["mae"]["mean"] == pytest.approx(np.mean(values))
        expected_std = np.std(values, ddof=1) if len(values) > 1 else 0.0
        assert table[name]["dev"]["mae"]["std"] == pytest.approx(expected_std)


def test_compare_writes_json_markdown_and_significance(compared):
    workdir, _, table = compared
    assert json.loads((workdir / "compare.json").read_text()) == table
    markdown = (workdir / "compare.md").read_text()
    for name in methods.METHODS:
        assert f"| {name} (" in markdown
    tests = json.loads((workdir / "significance.json").read_text())
    for plug in ("pplug", "pplug_bm25"):
        test = tests[plug]["dev"]
        assert methods.get(test["baseline"]).plug != "persona"
        assert set(test["p"]) == {"mae", "rmse"}
        assert all(0.0 <= p <= 1.0 for p in test["p"].values())
    control = tests["pplug"]["dev"]  # against the instruction token alone, unless it is the best
    if control["baseline"] != "instruction":
        assert control["control"] == "instruction" and set(control["control_p"]) == {"mae", "rmse"}
        assert "- pplug against instruction on dev: mae p = " in markdown
    assert [compare.control_of(m) for m in ("pplug", "pplug@mean")] == [
        "instruction", "instruction@mean"]


def test_rerunning_resumes_what_is_done(compared):
    workdir, config, table = compared
    stamps = {path: path.stat().st_mtime_ns for path in workdir.glob("*/seed*/metrics.json")}
    assert len(stamps) == sum(SEEDS if m.trains else 1 for m in methods.METHODS.values())
    again = compare.compare(config, workdir, list(methods.METHODS), SEEDS, command="test")
    assert again == table
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps


def test_a_decision_rule_variant_reuses_the_trained_plug(compared):
    workdir, config, _ = compared
    same = f"pplug@{config.decode.label_choice}"  # the rule pplug itself answered by
    stamps = {path: path.stat().st_mtime_ns for path in (workdir / "pplug").rglob("*")}
    table = compare.compare(config, workdir, ["pplug", same, "pplug@mean"], SEEDS, command="test")
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # nothing retrained
    for seed in range(SEEDS):
        rundir = workdir / same / f"seed{seed}"
        assert not (rundir / "checkpoints").exists()
        _, same_rule = lamp.read_outputs(rundir / f"predictions_{same}_dev.json")
        _, trained = lamp.read_outputs(
            workdir / "pplug" / f"seed{seed}" / "predictions_pplug_dev.json")
        assert same_rule == trained
        _, means = lamp.read_outputs(
            workdir / "pplug@mean" / f"seed{seed}" / "predictions_pplug@mean_dev.json")
        assert all(1.0 <= float(value) <= 5.0 for value in means.values())
        assert set(means.values()) - set(lamp.get_task("LaMP_3").labels)  # numbers, not labels
    assert table[same]["dev"] == table["pplug"]["dev"]


def test_a_config_variant_trains_again_and_is_tested_against_the_config(compared, tmp_path):
    workdir, config, table = compared
    variant = "plug.persona_tokens=2"
    stamps = {path: path.stat().st_mtime_ns for path in (workdir / "pplug").rglob("*")}
    with pytest.raises(errors.UserError, match="'plug.persona_tokenz' is not a config field"):
        compare.compare(config, tmp_path / "refused", ["pplug"], 1, variants=["plug.persona_tokenz=2"])
    assert not (tmp_path / "refused").exists()

    varied = compare.compare(config, workdir, ["pplug", "pplug@mean"], 1, command="test",
                             variants=[variant])
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # the config's: resumed
    name, at_mean = f"pplug+{variant}", f"pplug@mean+{variant}"
    assert set(varied) == {"pplug", "pplug@mean", name, at_mean}
    assert varied["pplug"]["dev"]["mae"]["seeds"] == table["pplug"]["dev"]["mae"]["seeds"][:1]
    assert compare.split_label(at_mean) == ("pplug@mean", variant)
    plug_config, _ = export.load_plug(workdir / name / "seed0" / "plug")
    assert plug_config["embedder"]["persona_tokens"] == 2
    assert not (workdir / at_mean / "seed0" / "checkpoints").exists()  # the variant's plug, reused
    tests = json.loads((workdir / "significance.json").read_text())
    for run, unvaried in ((name, "pplug"), (at_mean, "pplug@mean")):
        test = tests[run]["dev"]
        assert test["unvaried"] == unvaried and set(test["unvaried_p"]) == {"mae", "rmse"}
        assert all(0.0 <= p <= 1.0 for p in test["unvaried_p"].values())
        assert f"- {run} against {unvaried} on dev: mae p = " in (workdir / "compare.md").read_text()
