"""Evaluates a trained persona plug against the same frozen LLM without personalization.

  python -m plug_jax.evaluate --config configs/lamp3.py --workdir /tmp/pplug_lamp3 [--split dev]

Reads the plug saved by plug_jax.train in the workdir, decodes every question of the split(s)
(greedy or beam search, as config.decode says), prints a table of LaMP metrics and writes
predictions in the LaMP outputs format plus `metrics.json`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from etils import epath
from tqdm import tqdm

from plug_jax import (baselines as baselines_lib, cli, decode, errors, export, metrics,
                      sharding)
from plug_jax import workdir as workdir_lib
from plug_jax.methods import LABEL_CHOICES
from plug_jax.data import grain_pipeline, lamp, pipeline

PPLUG = "pplug"
ZERO_SHOT = "zero_shot"  # the frozen LLM alone, on the same inputs
# Run beside every trained plug: they cost one decoding pass (zero_shot) or nothing (the others).
BASELINES = (ZERO_SHOT,) + baselines_lib.METHODS


def _soft_tokens(experiment, plug_params, batch):
    if plug_params is None:
        return None
    return _apply_embedder(experiment.embedder, plug_params, batch)


def _apply_embedder(embedder, plug_params, batch, **kwargs):
    return embedder.apply({"params": plug_params}, batch["query_tokens"], batch["query_mask"],
                          batch["history"], batch["history_mask"], **kwargs)


def _generate(llm_params, plug_params, batch, *, experiment, decode_config):
    # 'score' ranks a task's labels; a task without labels generates its answer greedily.
    method = "greedy" if decode_config.method == "score" else decode_config.method
    return experiment.llm.generate(llm_params, _soft_tokens(experiment, plug_params, batch), batch,
                                   method=method,
                                   max_new_tokens=decode_config.max_new_tokens,
                                   num_beams=decode_config.num_beams)


def _label_nll(llm_params, plug_params, batch, labels, label_mask, *, experiment):
    return experiment.llm.label_nll(llm_params, _soft_tokens(experiment, plug_params, batch),
                                    batch, labels, label_mask)


def _replicated_over(mesh) -> dict:
    """jit options that replicate outputs over the mesh, so that every process can read them
    whole (multi-host runs)."""
    return {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}


def make_generate_fn(experiment):
    return jax.jit(functools.partial(_generate, experiment=experiment,
                                     decode_config=experiment.config.decode),
                   **_replicated_over(experiment.mesh))


def make_label_nll_fn(experiment):
    return jax.jit(functools.partial(_label_nll, experiment=experiment),
                   **_replicated_over(experiment.mesh))


def eval_batches(experiment, examples: Sequence[lamp.Example], *, with_targets: bool = False,
                 llm_length: int | None = None):
    """The examples in order, in batches of config.decode.eval_batch_size that grain featurizes
    ahead of the device; the last one padded (`example_mask`). llm_length None: the examples'
    longest, one shape for the split."""
    if llm_length is None:
        llm_length = pipeline.longest_llm_length(experiment.llm, examples,
                                                 experiment.config.data, with_targets)
    return grain_pipeline.make_eval_dataset(
        examples, batch_size=experiment.config.decode.eval_batch_size,
        featurize=pipeline.make_featurize(experiment, llm_length, with_targets=with_targets))


def predict(generate_fn, experiment, plug_params, examples: Sequence[lamp.Example], *,
            desc: str, llm_length: int | None = None) -> list[str]:
    """Decoded text for every example, in order."""
    llm = experiment.llm
    outputs = []
    with tqdm(total=len(examples), desc=desc, unit="ex", leave=False) as bar:
        for batch in eval_batches(experiment, examples, llm_length=llm_length):
            tokens = np.asarray(generate_fn(experiment.llm_params, plug_params, batch))
            for row in decode.strip_after_eos(tokens[batch["example_mask"]], llm.eos_id):
                outputs.append(llm.tokenizer.decode(row).strip())
            bar.update(int(batch["example_mask"].sum()))
    return outputs


def label_nll(label_nll_fn, experiment, plug_params, examples: Sequence[lamp.Example],
              labels: Sequence[str], *, desc: str = "scoring", llm_length: int | None = None
              ) -> np.ndarray:
    """[examples, labels] negative log-likelihood of each label as the whole answer (with its
    end-of-turn): each prompt runs once, then every label goes through its cache."""
    label_ids, label_mask = experiment.llm.label_ids(labels)
    scores = []
    with tqdm(total=len(examples), desc=desc, unit="ex", leave=False) as bar:
        for batch in eval_batches(experiment, examples, llm_length=llm_length):
            real = batch["example_mask"]
            scores.append(np.asarray(label_nll_fn(experiment.llm_params, plug_params, batch,
                                                  label_ids, label_mask))[real])
            bar.update(int(real.sum()))
    return np.concatenate(scores) if scores else np.zeros((0, len(labels)))


def choose_labels(nll: np.ndarray, labels: Sequence[str], rule: str) -> list[str]:
    """One answer per row of [examples, labels] negative log-likelihoods.

    likeliest: the most likely label. For numeric labels (LaMP-3's scores) the LLM's distribution
    over them, p = softmax(-nll), gives the answers that minimise the expected error instead:
    median, the absolute error's (a label), and mean, the squared error's (a number such as
    "4.27"; LaMP's metric reads any number).
    """
    if rule == "likeliest":
        return [labels[i] for i in np.argmin(nll, axis=1)]
    if rule not in LABEL_CHOICES:
        raise errors.ConfigError(
            f"decode.label_choice {rule!r}: expected one of {', '.join(LABEL_CHOICES)}")
    try:
        values = np.array([float(label) for label in labels])
    except ValueError:
        raise errors.ConfigError(f"decode.label_choice {rule!r} needs numeric labels, not "
                                 f"{list(labels)}") from None
    order = np.argsort(values)
    import scipy.special  # here: 0.4 s of start-up

    probs = scipy.special.softmax(-np.asarray(nll, np.float64)[:, order], axis=1)
    if rule == "mean":
        return [f"{value:.2f}" for value in probs @ values[order]]
    median = np.argmax(np.cumsum(probs, axis=1) >= 0.5, axis=1)
    return [labels[order[i]] for i in median]


def answer(experiment, plug_params, examples: Sequence[lamp.Example], *, desc: str,
           generate_fn=None, label_nll_fn=None, llm_length: int | None = None) -> list[str]:
    """The LLM's answers (personalized when there are plug params), as config.decode says:
    generated, or for a task with a label set and method 'score', its most likely label."""
    labels = experiment.task.labels
    if experiment.config.decode.method == "score" and labels:
        nll = label_nll(label_nll_fn or make_label_nll_fn(experiment), experiment, plug_params,
                        examples, labels, desc=desc, llm_length=llm_length)
        return choose_labels(nll, labels, experiment.config.decode.label_choice)
    return predict(generate_fn or make_generate_fn(experiment), experiment, plug_params,
                   examples, desc=desc, llm_length=llm_length)


def target_nll(experiment, plug_params, examples: Sequence[lamp.Example]) -> float:
    """Mean negative log-likelihood per gold target token (a dev loss), personalized or not."""
    nll = _target_nll_fn(experiment.llm, experiment.embedder, experiment.mesh)
    total, count = 0.0, 0.0
    for batch in eval_batches(experiment, examples, with_targets=True):
        loss_sum, tokens = nll(experiment.llm_params, plug_params, batch)
        total, count = total + float(loss_sum), count + float(tokens)
    return total / max(count, 1.0)


# One program per LLM, plug and mesh, whoever asks (the LLM's weights are arguments: closed over,
# they would be constants that XLA folds, doubling the compile).
@functools.lru_cache(maxsize=8)
def _target_nll_fn(llm, embedder, mesh):
    def nll(llm_params, params, batch):
        masked = {**batch, "target_mask": batch["target_mask"] & batch["example_mask"][:, None]}
        soft = None if params is None else _apply_embedder(embedder, params, batch)
        return llm.loss(llm_params, soft, masked)

    return jax.jit(nll, **_replicated_over(mesh))


@functools.lru_cache(maxsize=8)
def _attention_weights_fn(embedder, mesh):
    return jax.jit(lambda params, batch: _apply_embedder(embedder, params, batch,
                                                         return_weights=True)[1],
                   **_replicated_over(mesh))


def attention_weights(experiment, plug_params, examples: Sequence[lamp.Example], *,
                      llm_length: int | None = None) -> list[np.ndarray]:
    """Per example, the aggregator's weights over its most recent max_history items (oldest
    first; as many as the example has)."""
    weights_fn = _attention_weights_fn(experiment.embedder, experiment.mesh)
    per_example = []
    for batch in eval_batches(experiment, examples, llm_length=llm_length):
        weights = np.asarray(weights_fn(plug_params, batch))
        counts = batch["history_mask"].sum(axis=1)  # the items are a prefix of the rows
        per_example.extend(row[:count] for row, count, real in
                           zip(weights, counts, batch["example_mask"]) if real)
    return per_example


def attention_entropy(experiment, plug_params, examples: Sequence[lamp.Example], *,
                      llm_length: int | None = None) -> dict:
    """Mean entropy (nats) of the aggregator's weights over users with 2+ history items, beside
    the uniform weights' (log n): near-equal figures say the input-aware attention is not used."""
    entropy, uniform = [], []
    for weights in attention_weights(experiment, plug_params, examples, llm_length=llm_length):
        if len(weights) >= 2:
            logs = np.log(np.where(weights > 0, weights, 1.0))
            entropy.append(-(weights * logs).sum())
            uniform.append(np.log(len(weights)))
    return {"entropy": float(np.mean(entropy)) if entropy else float("nan"),
            "uniform_entropy": float(np.mean(uniform)) if uniform else float("nan"),
            "users": len(entropy)}


def evaluated_examples(experiment, splits: Sequence[str]) -> dict[str, Sequence[lamp.Example]]:
    """The questions `evaluate` answers: each split's (its first data.max_eval_examples)."""
    cap = experiment.config.data.max_eval_examples
    return {split: experiment.splits[split][:cap] if cap else experiment.splits[split]
            for split in splits if split in experiment.splits}


def eval_length(experiment, evaluated: dict[str, Sequence[lamp.Example]]) -> int:
    """One LLM length for all evaluated splits: each method compiles once, not once per split."""
    return max((pipeline.longest_llm_length(experiment.llm, examples, experiment.config.data,
                                            with_targets=False)
                for examples in evaluated.values()), default=8)


def evaluate(experiment, plug_params, splits: Sequence[str], workdir: str | Path, *,
             method: str = PPLUG, baselines: Sequence[str] = BASELINES, write: bool = True
             ) -> dict:
    """{method: {split: {metric: value}}}: the plug (or, with plug_params None, the LLM alone)
    under `method`, and each of `baselines` on the same questions, each split answered once per
    method; every method's predictions are written in LaMP's outputs format
    (predictions_{method}_{split}.json)."""
    config, task = experiment.config, experiment.task
    generate_fn, label_nll_fn = make_generate_fn(experiment), make_label_nll_fn(experiment)
    train_targets = [e.target for e in experiment.splits.get(config.data.train_split, [])]
    results: dict[str, dict[str, dict[str, float]]] = {}
    evaluated = evaluated_examples(experiment, splits)
    llm_length = eval_length(experiment, evaluated) if experiment.llm is not None else None
    for split, examples in evaluated.items():
        golds = [e.target for e in examples]
        for name in (method, *[b for b in baselines if b != method]):
            if name in baselines_lib.METHODS:
                outputs = baselines_lib.predict(name, task, examples, train_targets)
            else:
                outputs = answer(experiment, None if name == ZERO_SHOT else plug_params, examples,
                                 desc=f"{name} {split}", generate_fn=generate_fn,
                                 label_nll_fn=label_nll_fn, llm_length=llm_length)
            if write:
                lamp.write_predictions(epath.Path(workdir) / f"predictions_{name}_{split}.json",
                                       task.name, [e.id for e in examples], outputs)
            if all(g is not None for g in golds):
                results.setdefault(name, {})[split] = metrics.evaluate(task.name, outputs, golds)
    return results


def format_table(results: dict, task_name: str) -> str:
    """A plain-text table: one row per method and split, one column per metric."""
    rows = [(method, split, values) for method, by_split in results.items()
            for split, values in by_split.items()]
    if not rows:
        return "(no split with gold outputs to score)"
    names = list(rows[0][2])
    headline = metrics.headline_metric(task_name)
    lines = [f"{'method':<17} {'split':<8} " + " ".join(f"{n:>9}" for n in names)]
    for method, split, values in rows:
        lines.append(f"{method:<17} {split:<8} " + " ".join(f"{values[n]:9.4f}" for n in names))
    lines.append(f"({headline.name}: {'higher' if headline.higher_is_better else 'lower'} is better)")
    return "\n".join(lines)


def write_metrics(results: dict, workdir: str | Path) -> Path:
    return workdir_lib.write_json(epath.Path(workdir) / "metrics.json", results, indent=2,
                                  sort_keys=True)


SPLIT = flags.DEFINE_multi_string("split", None,
                                  "Split(s) to evaluate; default config.data.eval_splits.")


def main(argv: Sequence[str]) -> None:
    del argv
    from plug_jax import experiment as experiment_lib, personalize

    config, workdir = cli.CONFIG.value, cli.WORKDIR.value
    splits = tuple(SPLIT.value) if SPLIT.value else tuple(config.data.eval_splits)
    cli.check_writable(workdir)
    plug_path = epath.Path(workdir) / "plug"
    # The plug must have been trained under this config where it matters: checked before the
    # LLM loads (the config's fields), then against the loaded LLM and encoder (their widths and
    # weights), before anything is written.
    plug_config = export.read_plug_config(plug_path / export.PLUG_CONFIG_FILE)
    problem = export.config_mismatch(plug_config, config)
    if problem:
        raise personalize.MismatchError(f"{plug_path}: {problem}")

    def check(experiment):
        problem = personalize.compatibility_problem(plug_config, experiment)
        if problem:
            raise personalize.MismatchError(f"{plug_path}: {problem}")

    mesh = sharding.make_mesh(config.mesh)
    experiment = experiment_lib.build(config, workdir, splits=splits, mesh=mesh, check=check)
    _, plug_params = export.load_plug(plug_path, experiment.plug_shardings(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in config.axis_rules]):
        results = evaluate(experiment, plug_params, splits, workdir, method=config.method,
                           write=jax.process_index() == 0)
    cli.echo(format_table(results, experiment.task.name))
    cli.echo(f"metrics written to {write_metrics(results, workdir)}")


if __name__ == "__main__":
    cli.run(main, "config", "workdir", distributed=True)
