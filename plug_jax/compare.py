"""PPlug beside its ablations and the baselines it must beat, over seeds, on the same questions.

  python -m plug_jax.compare --config configs/lamp3.py \
      --config.data.dir=../shared/data/lamp-real/amazon_music \
      --methods majority,profile,zero_shot,instruction,pplug --seeds 3 --workdir /tmp/compare

Each method runs in <workdir>/<method>/seed<N>: trained methods (plug_jax/methods.py) train once
per seed, with config.seed = N (the plug's init and the data order); the others are
deterministic and run once. A run with metrics.json is done: rerunning resumes the rest. Writes
compare.json, `{method: {split: {metric: {"mean", "std", "seeds"}}}}`, report.md (the headline
metric's figure, mean and std over seeds), and compare.md: the table
(mean ± sample std over seeds), wall times, the command, and whether PPlug's difference from the
best baseline is significant over questions (paired t-test on per-question errors or ROUGE,
McNemar on right/wrong answers; per-question scores averaged over seeds; accuracy: seed 0).
"""

from __future__ import annotations

import copy
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import flags
from etils import epath

from plug_jax import (cli, evaluate, experiment, export, methods, metrics, report,
                      significance, train)
from plug_jax import workdir as workdir_lib
from plug_jax.data import lamp

METHODS = flags.DEFINE_list("methods", ["majority", "profile", "zero_shot", "instruction", "pplug"],
                            f"Methods to run, from {', '.join(methods.METHODS)}.")
SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds of each trained method.")
ALPHA = 0.05


def _run_one(config, method: methods.Method, seed: int, rundir: Path) -> dict:
    """metrics.json of one run, computed unless a finished run left it."""
    if (rundir / "run.json").exists():  # written last: the run finished
        return json.loads((rundir / "metrics.json").read_text())
    config = copy.deepcopy(config)
    config.method, config.seed = method.name, seed
    if method.label_choice:
        config.decode.label_choice = method.label_choice
    started = time.time()
    splits = tuple(config.data.eval_splits)
    if method.trains and method.label_choice:  # the base method's plug, answering another way
        trained = rundir.parent.parent / methods.base_name(method.name) / rundir.name
        _run_one(config, methods.get(methods.base_name(method.name)), seed, trained)
        rundir.mkdir(parents=True, exist_ok=True)
        exp = experiment.build(config, rundir)
        _, plug_params = export.load_plug(trained / "plug")
        results = evaluate.evaluate(exp, plug_params, splits, rundir, method=method.name,
                                    baselines=())
        evaluate.write_metrics(results, rundir)
    elif method.trains:
        results = train.run(config, rundir, baselines=()).metrics
    else:
        rundir.mkdir(parents=True, exist_ok=True)
        exp = experiment.build(config, rundir, with_llm=method.uses_llm)
        results = evaluate.evaluate(exp, None, splits, rundir, method=method.name, baselines=())
        evaluate.write_metrics(results, rundir)
    workdir_lib.write_json(rundir / "run.json", {"seconds": time.time() - started})
    return results


def _summary(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "seeds": values}


def _predictions(rundir: Path, method: str, split: str) -> list[str]:
    return [g["output"] for g in json.loads(
        (rundir / f"predictions_{method}_{split}.json").read_text())["golds"]]


def control_of(plug_method: str) -> str:
    """The persona plug's ablation: the instruction token alone, trained the same way and
    answering by the same rule ("pplug@mean" -> "instruction@mean")."""
    _, at, rule = plug_method.partition("@")
    return "instruction" + at + rule


def significance_against_best(task: lamp.Task, table: dict, rundirs: dict, golds: dict) -> dict:
    """{plug method: {split: {"baseline", "p": {metric: p}, "control"?, "control_p"?}}}: each
    persona plug against the baseline with the best mean headline metric on that split, and
    against its `control_of` when that ran too."""
    headline = metrics.headline_metric(task.name)
    plugs = [m for m in table if methods.get(m).plug == "persona"]
    others = [m for m in table if methods.get(m).plug != "persona"]
    found = {}
    for split, split_golds in golds.items():
        candidates = [m for m in others if split in table[m]]
        if not candidates or any(g is None for g in split_golds):
            continue
        sign = -1 if headline.higher_is_better else 1
        best = min(candidates, key=lambda m: sign * table[m][split][headline.name]["mean"])

        def scores(method):
            per_seed = [significance.per_question_scores(
                task.name, _predictions(d, method, split), split_golds) for d in rundirs[method]]
            return {name: np.mean([s[name] for s in per_seed], axis=0) for name in per_seed[0]}, \
                per_seed[0]

        def p_values(plug, other):
            (plug_mean, plug_first), (other_mean, other_first) = scores(plug), scores(other)
            return {name: (significance.mcnemar(plug_first[name], other_first[name])
                           if name == "accuracy"
                           else significance.paired_test(plug_mean[name], other_mean[name]))
                    for name in plug_mean}

        for plug in plugs:
            if split not in table[plug]:
                continue
            found.setdefault(plug, {})[split] = {"baseline": best, "p": p_values(plug, best)}
            control = control_of(plug)
            if control != best and split in table.get(control, {}):
                found[plug][split].update(control=control, control_p=p_values(plug, control))
    return found


def format_markdown(task: lamp.Task, table: dict, tests: dict, seconds: dict,
                    command: str, total_seconds: float) -> str:
    splits = list(dict.fromkeys(s for by_split in table.values() for s in by_split))
    names = list(dict.fromkeys(n for by_split in table.values() for values in by_split.values()
                               for n in values))
    headline = metrics.headline_metric(task.name)
    header = ["method"] + [f"{split} {name}" for split in splits for name in names] + ["s / run"]
    lines = [f"# {task.name}: PPlug against its baselines", "",
             f"`{command}`", "",
             f"Mean ± sample std over seeds ({headline.name}: "
             f"{'higher' if headline.higher_is_better else 'lower'} is better). "
             f"* marks a persona plug whose difference from the split's best other method is "
             f"significant at p < {ALPHA}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_split in table.items():
        cells = [f"{method} ({len(next(iter(by_split.values()))[names[0]]['seeds'])} seed(s))"]
        for split in splits:
            for name in names:
                value = by_split.get(split, {}).get(name)
                if value is None:
                    cells.append("")
                    continue
                p = tests.get(method, {}).get(split, {}).get("p", {}).get(name)
                mark = "*" if p is not None and p < ALPHA else ""
                cells.append(f"{value['mean']:.3f} ± {value['std']:.3f}{mark}")
        cells.append(f"{seconds[method]:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for method, by_split in tests.items():
        for split, test in by_split.items():
            p = ", ".join(f"{name} p = {value:.3g}" for name, value in test["p"].items())
            lines.append(f"- {method} against {test['baseline']} on {split}: {p}")
            if "control" in test:
                p = ", ".join(f"{name} p = {value:.3g}" for name, value in test["control_p"].items())
                lines.append(f"- {method} against {test['control']} on {split}: {p}")
    lines += ["", f"{total_seconds:.0f} s in all on {platform.machine()} "
              f"({platform.processor() or 'cpu'}), Python {platform.python_version()}."]
    return "\n".join(lines) + "\n"


def compare(config, workdir: str | Path, method_names: Sequence[str], seeds: int,
            command: str = "") -> dict:
    """Runs the methods (resuming), writes compare.json and compare.md; returns the table."""
    cli.check_writable(workdir)
    workdir = epath.Path(workdir)
    started = time.time()
    config = copy.deepcopy(config)
    task = lamp.get_task(config.data.task)
    chosen = [methods.get(name) for name in method_names]
    # Bad input stops here, before anything is written: the data are read, the models' configs,
    # tokenizers and shapes too (their weights load in the runs).
    if config.data.dir:
        experiment.load_splits(config, workdir, (config.data.train_split,
                                                 *config.data.eval_splits))
    experiment.build(config, splits=(), abstract=True)
    workdir.mkdir(parents=True, exist_ok=True)
    # Every run reads the same data and shares one history-embedding cache.
    config.data.dir = str(experiment.data_dir(config, workdir))
    config.data.cache_dir = config.data.cache_dir or str(workdir / "cache")
    table, rundirs, seconds = {}, {}, {}
    for method in chosen:
        seed_list = range(seeds) if method.trains else range(1)
        rundirs[method.name] = [workdir / method.name / f"seed{seed}" for seed in seed_list]
        runs = []
        for seed, rundir in zip(seed_list, rundirs[method.name]):
            cli.echo(f"== {method.name}, seed {seed}: {rundir}")
            runs.append(_run_one(config, method, seed, rundir)[method.name])
        table[method.name] = {split: {name: _summary([run[split][name] for run in runs])
                                      for name in runs[0][split]} for split in runs[0]}
        seconds[method.name] = float(np.mean([json.loads((d / "run.json").read_text())["seconds"]
                                              for d in rundirs[method.name]]))
    splits = {split for by_split in table.values() for split in by_split}
    golds = {split: [e.target for e in lamp.load_split(config.data.dir, split, task)]
             for split in splits}
    if config.data.max_eval_examples:
        golds = {split: g[:config.data.max_eval_examples] for split, g in golds.items()}
    tests = significance_against_best(task, table, rundirs, golds)
    workdir_lib.write_json(workdir / "compare.json", table, indent=2)
    workdir_lib.write_json(workdir / "significance.json", tests, indent=2)
    markdown = format_markdown(task, table, tests, seconds, command, time.time() - started)
    workdir_lib.write_text(workdir / "compare.md", markdown)
    report.write_compare_report(workdir, task.name, table)
    cli.echo(markdown)
    return table


def main(argv: Sequence[str]) -> None:
    del argv
    command = "python -m plug_jax.compare " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    compare(cli.CONFIG.value, cli.WORKDIR.value, METHODS.value, SEEDS.value, command)


if __name__ == "__main__":
    cli.run(main, "config", "workdir")
