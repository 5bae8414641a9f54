"""The run's report: report.md with decodable PNGs; the attention figure names the items it
shows."""

import json

import numpy as np
from matplotlib.image import imread

from plug_jax import evaluate, report
from plug_jax.data import lamp

FIGURES = ("loss.png", "metrics.png", "attention.png")


def test_training_writes_a_report_with_figures(tiny_trained_run):
    workdir, _ = tiny_trained_run
    text = (workdir / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in text
        image = imread(workdir / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0
    log = (workdir / "train_metrics.jsonl").read_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("lr" in r for r in records)
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # linear warmup from 0


def test_attention_section_lists_the_items_shown(tiny_trained_run):
    workdir, result = tiny_trained_run
    exp = result.experiment
    shown = report.users_to_show(exp.splits["dev"][:exp.config.data.max_eval_examples])
    _, predictions = lamp.read_outputs(workdir / "predictions_pplug_dev.json")
    users = report.attention_users(
        shown, evaluate.attention_weights(exp, result.state["params"], shown), predictions)
    assert len(users) == report.USERS_SHOWN
    text = (workdir / "report.md").read_text()
    for user in users:
        assert f"predicted `{predictions[user['id']]}`" in text
        assert abs(sum(item["weight"] for item in user["items"]) - 1) < 1e-5
        for item in user["items"]:
            assert f"| {item['label']} | {item['text']} |" in text
    figure = report.draw_attention(users)
    captions = {label.get_text() for axes in figure.axes for label in axes.get_yticklabels()}
    shown_items = min(len(users[0]["items"]), report.ITEMS_SHOWN)
    assert sum(item["caption"] in captions for item in users[0]["items"]) == shown_items
    assert all(user["id"] in " ".join(axes.get_title() for axes in figure.axes) for user in users)


def test_compare_report_shows_the_spread_over_seeds(tmp_path):
    table = {"majority": {"dev": {"mae": {"mean": 0.9, "std": 0.0, "seeds": [0.9]}}},
             "pplug": {"dev": {"mae": {"mean": 0.7, "std": 0.05, "seeds": [0.65, 0.7, 0.75]}}}}
    path = report.write_compare_report(tmp_path, "LaMP_3", table)
    assert "0.7000 ± 0.0500 (3 seeds)" in path.read_text()
    assert np.asarray(imread(tmp_path / "metrics.png")).std() > 0
