"""Evaluates a trained persona plug against the same frozen LLM without personalization.

  python -m plug_jax.evaluate --config configs/lamp3.py --workdir /tmp/pplug_lamp3 [--split dev]

Reads the plug saved by plug_jax.train in the workdir, decodes every question of the split(s)
(greedy or beam search, as config.decode says), prints a table of LaMP metrics and writes
predictions in the LaMP outputs format plus `metrics.json`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from plug_jax import decode, export, metrics, sharding
from plug_jax.data import lamp, pipeline

PPLUG = "pplug"
NO_HISTORY = "pplug-no-history"  # the same plug, every history emptied: what the persona adds
ZERO_SHOT = "zero-shot"          # the frozen LLM alone


def _generate(llm_params, plug_params, batch, *, experiment, decode_config):
    soft = None
    if plug_params is not None:
        soft = experiment.embedder.apply({"params": plug_params}, batch["query_tokens"],
                                         batch["query_mask"], batch["history"],
                                         batch["history_mask"])
    return experiment.llm.generate(llm_params, soft, batch, method=decode_config.method,
                                   max_new_tokens=decode_config.max_new_tokens,
                                   num_beams=decode_config.num_beams)


def _replicated_outputs(experiment) -> dict:
    """jit options that replicate outputs over the experiment's mesh, so that every process can
    read them whole (multi-host runs)."""
    if experiment.mesh is None:
        return {}
    return {"out_shardings": sharding.replicated(experiment.mesh)}


def make_generate_fn(experiment):
    return jax.jit(functools.partial(_generate, experiment=experiment,
                                     decode_config=experiment.config.decode),
                   **_replicated_outputs(experiment))


def predict(generate_fn, experiment, plug_params, features, *, desc: str) -> list[str]:
    """Decoded text for every featurized example, in order."""
    llm, size = experiment.llm, experiment.config.decode.eval_batch_size
    outputs = []
    total = pipeline.num_examples(features)
    with tqdm(total=total, desc=desc, unit="ex", leave=False) as bar:
        for batch in pipeline.batches(features, experiment.table, size):
            tokens = np.asarray(generate_fn(experiment.llm_params, plug_params, batch))
            for row in decode.strip_after_eos(tokens[batch["example_mask"]], llm.eos_id):
                outputs.append(llm.tokenizer.decode(row).strip())
            bar.update(int(batch["example_mask"].sum()))
    return outputs


def target_nll(experiment, plug_params, examples: Sequence[lamp.Example]) -> float:
    """Mean negative log-likelihood per gold target token (a dev loss), personalized or not."""
    config = experiment.config

    @functools.partial(jax.jit, **_replicated_outputs(experiment))
    def nll(params, batch):
        soft = None
        if params is not None:
            soft = experiment.embedder.apply({"params": params}, batch["query_tokens"],
                                             batch["query_mask"], batch["history"],
                                             batch["history_mask"])
        masked = {**batch, "target_mask": batch["target_mask"] & batch["example_mask"][:, None]}
        return experiment.llm.loss(experiment.llm_params, soft, masked)

    features = pipeline.featurize(examples, experiment.llm, experiment.query_tokenizer,
                                  experiment.table, data_config=config.data,
                                  query_instruction=config.encoder.query_instruction,
                                  with_targets=True)
    total, count = 0.0, 0.0
    for batch in pipeline.batches(features, experiment.table, config.decode.eval_batch_size):
        loss_sum, tokens = nll(plug_params, batch)
        total, count = total + float(loss_sum), count + float(tokens)
    return total / max(count, 1.0)


def evaluate(experiment, plug_params, splits: Sequence[str], workdir: str | Path, *,
             baselines: bool = True, generate_fn=None, write: bool = True,
             examples_override: dict[str, list[lamp.Example]] | None = None) -> dict:
    """{method: {split: {metric: value}}} for PPlug and, with `baselines`, the same plug without
    histories and the zero-shot LLM; writes each method's predictions in LaMP format."""
    generate_fn = generate_fn or make_generate_fn(experiment)
    config, task = experiment.config, experiment.task
    results: dict[str, dict[str, dict[str, float]]] = {}
    available = examples_override or experiment.splits
    for split in [s for s in splits if s in available]:
        examples = available[split]
        if config.data.max_eval_examples:
            examples = examples[:config.data.max_eval_examples]
        features = pipeline.featurize(examples, experiment.llm, experiment.query_tokenizer,
                                      experiment.table, data_config=config.data,
                                      query_instruction=config.encoder.query_instruction,
                                      with_targets=False)
        golds = [e.target for e in examples]
        methods = [(PPLUG, plug_params, features)]
        if baselines:
            no_history = {**features, "history_rows": np.full_like(features["history_rows"], -1)}
            methods += [(NO_HISTORY, plug_params, no_history), (ZERO_SHOT, None, features)]
        for method, params, inputs in methods:
            outputs = predict(generate_fn, experiment, params, inputs, desc=f"{method} {split}")
            if write:
                lamp.write_predictions(Path(workdir) / f"predictions_{method}_{split}.json",
                                       task.name, [e.id for e in examples], outputs)
            if all(g is not None for g in golds):
                results.setdefault(method, {})[split] = metrics.evaluate(task.name, outputs, golds)
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
    path = Path(workdir) / "metrics.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: Sequence[str]) -> None:
    del argv
    from plug_jax import experiment as experiment_lib

    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    splits = tuple(flags.FLAGS.split) if flags.FLAGS.split else tuple(config.data.eval_splits)
    mesh = sharding.make_mesh(config.mesh)
    experiment = experiment_lib.build(config, workdir, splits=splits, mesh=mesh)
    try:
        _, plug_params = export.load_plug(Path(workdir) / "plug", experiment.plug_shardings(mesh))
    except (FileNotFoundError, export.PlugFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in config.axis_rules]):
        results = evaluate(experiment, plug_params, splits, workdir,
                           write=jax.process_index() == 0)
    print(format_table(results, experiment.task.name))
    print(f"metrics written to {write_metrics(results, workdir)}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "A configs/lampN.py file (':paper' for the paper).")
    flags.DEFINE_string("workdir", None, "The training run's directory.")
    flags.DEFINE_multi_string("split", None, "Split(s) to evaluate; default config.data.eval_splits.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
