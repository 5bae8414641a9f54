"""A run's report: <workdir>/report.md with PNG figures beside it (matplotlib, headless).

`write_run_report` (end of training): loss and learning rate over steps (train_metrics.jsonl),
the headline metric of each method (metrics.json), and for a few dev users the aggregator's
attention over their history items with the gold and predicted answers.
`write_compare_report` (end of plug_jax.compare): the headline metric of each method, mean and
spread over seeds (compare.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from etils import epath

from plug_jax import metrics
from plug_jax import workdir as workdir_lib
from plug_jax.data import lamp

if TYPE_CHECKING:
    from matplotlib.figure import Figure

USERS_SHOWN = 3
ITEMS_SHOWN = 8       # per user: the most attended items
LABEL_CHARS = 48      # an item's first words on the figure
ANSWER_CHARS = 56


def _short(text: str, chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[:chars - 1].rstrip() + "…"


# ------------------------------------------------------------------------------------ figures

def _figure(width: float, height: float) -> Figure:
    # matplotlib is imported here: 0.9 s of every start-up. No pyplot: no global state, no display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save_png(figure: Figure, path: epath.PathLike) -> None:
    with workdir_lib.open_atomic(path, "wb") as file:
        figure.savefig(file, format="png", dpi=120)


def loss_figure(records: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training loss and learning rate against the step (train_metrics.jsonl's records)."""
    from matplotlib.ticker import MaxNLocator

    steps = [r["step"] for r in records]
    figure = _figure(7, 5)
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True)
    loss_axes.plot(steps, [r["loss"] for r in records], marker="o", markersize=3)
    loss_axes.set_ylabel("loss (nats / target token)")
    loss_axes.set_title("Training")
    loss_axes.grid(alpha=0.3)
    if all("lr" in r for r in records):
        lr_axes.plot(steps, [r["lr"] for r in records], color="tab:orange", marker="o",
                     markersize=3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_axes.set_xlabel("training step")
    lr_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_axes.grid(alpha=0.3)
    _save_png(figure, path)
    return path


def _mean_std(value: float | Mapping[str, Any]) -> tuple[float, float, int]:
    """A metrics.json value (a float) or a compare.json one ({"mean", "std", "seeds"})."""
    if isinstance(value, Mapping):
        return float(value["mean"]), float(value.get("std") or 0.0), len(value.get("seeds", [1]))
    return float(value), 0.0, 1


def metric_figure(results: Mapping[str, Any], task_name: str, path: Path) -> Path:
    """The headline metric of each method, one panel per split; error bars: the std over seeds."""
    headline = metrics.headline_metric(task_name)
    splits = sorted({split for by_split in results.values() for split in by_split})
    methods = list(results)
    figure = _figure(4 + 3 * len(splits), 1.2 + 0.45 * len(methods))
    all_axes = np.atleast_1d(figure.subplots(1, len(splits), sharey=True))
    all_axes[0].invert_yaxis()  # shared: the first method on top in every panel
    for axes, split in zip(all_axes, splits):
        rows = [(m, _mean_std(results[m][split][headline.name])) for m in methods
                if split in results[m]]
        means = [mean for _, (mean, _, _) in rows]
        stds = [std for _, (_, std, _) in rows]
        y = np.arange(len(rows))
        axes.barh(y, means, color="tab:blue", alpha=0.8)
        spread = [row for row, std in enumerate(stds) if std]
        axes.errorbar([means[r] for r in spread], spread, xerr=[stds[r] for r in spread],
                      fmt="none", ecolor="black", capsize=4)
        axes.set_yticks(y, [f"{m} ({n} seeds)" if n > 1 else m for m, (_, _, n) in rows])
        for row, (mean, std) in enumerate(zip(means, stds)):
            axes.annotate(f"{mean:.3f}" + (f" ± {std:.3f}" if std else ""), (mean + std, row),
                          xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        axes.set_xlim(0, max(m + s for m, s in zip(means, stds)) * 1.35 or 1)
        better = "higher" if headline.higher_is_better else "lower"
        axes.set_xlabel(f"{headline.name} ({better} is better)")
        axes.set_title(f"{task_name}, split {split}")
        axes.grid(axis="x", alpha=0.3)
    _save_png(figure, path)
    return path


def attention_figure(users: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """For each user, the aggregator's weights over their most attended history items."""
    _save_png(draw_attention(users), path)
    return path


def draw_attention(users: Sequence[Mapping[str, Any]]) -> Figure:
    heights = [1.2 + 0.32 * min(len(u["items"]), ITEMS_SHOWN) for u in users]
    figure = _figure(8, 0.6 + sum(heights))
    all_axes = np.atleast_1d(figure.subplots(len(users), 1, height_ratios=heights))
    for axes, user in zip(all_axes, users):
        items = sorted(user["items"], key=lambda item: -item["weight"])[:ITEMS_SHOWN]
        y = np.arange(len(items))
        weights = [item["weight"] for item in items]
        axes.barh(y, weights, color="tab:green", alpha=0.8)
        for row, weight in enumerate(weights):
            axes.annotate(f"{weight:.3f}", (weight, row), xytext=(3, 0),
                          textcoords="offset points", va="center", fontsize=7)
        axes.axvline(1 / len(user["items"]), color="gray", linestyle="--", linewidth=1,
                     label="uniform")
        axes.set_yticks(y, [item["caption"] for item in items], fontsize=8)
        axes.invert_yaxis()
        axes.set_xlim(0, 1)
        shown = (f"top {len(items)} of {len(user['items'])} items"
                 if len(items) < len(user["items"]) else f"{len(items)} items")
        gold, predicted = (_short(user[key], ANSWER_CHARS) for key in ("gold", "predicted"))
        axes.set_title(f"{_short(user['id'], 60)} ({shown})\ngold: {gold!r}\n"
                       f"predicted: {predicted!r}", fontsize=9)
        axes.legend(loc="lower right", fontsize=7)
        axes.grid(axis="x", alpha=0.3)
    all_axes[-1].set_xlabel("attention weight over the user's history (sums to 1)")
    return figure


# -------------------------------------------------------------------------------------- data

def users_to_show(examples: Sequence[lamp.Example], count: int = USERS_SHOWN
                  ) -> list[lamp.Example]:
    """The first `count` examples whose users have 2+ history items (attention has a choice)."""
    shown = []
    for example in examples:
        if len(example.history) >= 2:
            shown.append(example)
        if len(shown) == count:
            break
    return shown


def attention_users(examples: Sequence[lamp.Example], weights: Sequence[np.ndarray],
                    predictions: Mapping[str, str]) -> list[dict]:
    """What the attention figure and table show: per example, its recent items (label, first
    words, weight: weights[i] covers the last len(weights[i]) items), gold and prediction."""
    users = []
    for example, example_weights in zip(examples, weights):
        count = len(example_weights)
        recent = range(len(example.history) - count, len(example.history))
        items = []
        for i, weight in zip(recent, example_weights):
            label = example.history_labels[i] if example.history_labels else None
            if example.history_items is not None:
                text = " ".join(value for name, value in example.history_items[i]
                                if value != label)
            else:
                text = example.history[i]
            words = _short(text, LABEL_CHARS)
            items.append({"label": label, "text": words, "weight": float(weight),
                          "caption": f"[{label}] {words}" if label is not None else words})
        users.append({"id": example.id, "gold": example.target or "",
                      "predicted": predictions.get(example.id, ""), "items": items})
    return users


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def _metric_table(results: Mapping[str, Any]) -> list[str]:
    rows = [(method, split, values) for method, by_split in results.items()
            for split, values in by_split.items()]
    if not rows:
        return ["(no split with gold outputs)"]
    names = list(rows[0][2])
    lines = ["| method | split | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for method, split, values in rows:
        cells = []
        for name in names:
            mean, std, seeds = _mean_std(values[name])
            cells.append(f"{mean:.4f}" + (f" ± {std:.4f} ({seeds} seeds)" if seeds > 1 else ""))
        lines.append(f"| {method} | {split} | " + " | ".join(cells) + " |")
    return lines


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------ reports

def write_run_report(workdir: str | Path, task_name: str, *, method: str,
                     users: Sequence[Mapping[str, Any]] = (), split: str = "dev") -> Path:
    """report.md (and its PNGs) of a training run, from the files it wrote and `users`
    (`attention_users`)."""
    workdir = epath.Path(workdir)
    lines = [f"# {task_name}: {method}", ""]
    records = _read_jsonl(workdir / "train_metrics.jsonl")
    if records:
        loss_figure(records, workdir / "loss.png")
        lines += ["## Training", "",
                  f"{len(records)} logged steps; loss {records[0]['loss']:.4f} at step "
                  f"{records[0]['step']} -> {records[-1]['loss']:.4f} at step "
                  f"{records[-1]['step']}.", "", "![training loss and learning rate](loss.png)", ""]
    results_path = workdir / "metrics.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        lines += ["## Metrics", ""] + _metric_table(results) + [""]
        if results:
            metric_figure(results, task_name, workdir / "metrics.png")
            lines += ["![headline metric by method](metrics.png)", ""]
    if users:
        attention_figure(users, workdir / "attention.png")
        lines += [f"## Attention over history ({split} users)", "",
                  "The aggregator's weights over each user's most recent history items (the "
                  "dashed line: uniform weights).", "", "![attention](attention.png)", ""]
        for user in users:
            lines += [f"**{_md(user['id'])}**: gold `{_md(user['gold'])}`, predicted "
                      f"`{_md(user['predicted'])}`", "", "| weight | label | first words |",
                      "|---|---|---|"]
            for item in sorted(user["items"], key=lambda item: -item["weight"]):
                lines.append(f"| {item['weight']:.3f} | {_md(item['label'] or '')} | "
                             f"{_md(item['text'])} |")
            lines.append("")
    path = workdir_lib.write_text(workdir / "report.md", "\n".join(lines))
    return path


def write_compare_report(workdir: str | Path, task_name: str, table: Mapping[str, Any]) -> Path:
    """report.md of plug_jax.compare: the table and the headline metric with its spread over
    seeds (compare.json's form)."""
    workdir = epath.Path(workdir)
    metric_figure(table, task_name, workdir / "metrics.png")
    lines = [f"# {task_name}: methods compared", ""] + _metric_table(table) + [
        "", "![headline metric by method, mean ± std over seeds](metrics.png)", ""]
    path = workdir_lib.write_text(workdir / "report.md", "\n".join(lines))
    return path
