"""PPlug beside its ablations and the baselines it must beat, over seeds, on the same questions.

  python -m plug_jax.compare --config configs/lamp3.py \
      --config.data.dir=../shared/data/lamp-real/amazon_music \
      --methods majority,profile,zero_shot,instruction,pplug --seeds 3 --workdir /tmp/compare

`--variant FIELD=VALUE[,...]` (repeatable) trains the trained methods again with those config
fields changed, as `method+FIELD=VALUE` (an ablation: `--variant plug.persona_tokens=4`), and
tests each against the method as configured.

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


def label(method_name: str, variant: str = "") -> str:
    """A run's name in the tables and its directory: the method, and the variant it ran under
    (no glob characters: Orbax globs checkpoint paths)."""
    return f"{method_name}+{variant}" if variant else method_name


def split_label(run_label: str) -> tuple[str, str]:
    """label's inverse: 'pplug@mean+plug.persona_tokens=4' -> ('pplug@mean', 'plug.persona_tokens=4')."""
    method_name, _, variant = run_label.partition("+")
    return method_name, variant


def run_dir(workdir: Path, run_label: str, seed: int) -> Path:
    return workdir / run_label / f"seed{seed}"


def _run_one(config, method: methods.Method, seed: int, workdir: Path, variant: str = "") -> dict:
    """metrics.json of one run (of `config`, the variant's if any), computed unless a finished
    run left it."""
    rundir = run_dir(workdir, label(method.name, variant), seed)
    if (rundir / "run.json").exists():  # written last: the run finished
        return json.loads((rundir / "metrics.json").read_text())
    given, config = config, copy.deepcopy(config)
    config.method, config.seed = method.name, seed
    if method.label_choice:
        config.decode.label_choice = method.label_choice
    started = time.time()
    splits = tuple(config.data.eval_splits)
    if method.trains and method.label_choice:  # the base method's plug, answering another way
        base = methods.get(methods.base_name(method.name))
        _run_one(given, base, seed, workdir, variant)  # its own rule, unless already run
        trained = run_dir(workdir, label(base.name, variant), seed)
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
    """{plug run: {split: {"baseline", "p": {metric: p}, "control"?, "control_p"?, "unvaried"?,
    "unvaried_p"?}}}: each persona plug against the baseline with the best mean headline metric
    on that split, against its `control_of` when that ran too, and a variant's against the
    method as configured."""
    headline = metrics.headline_metric(task.name)

    def is_plug(run_label):
        return methods.get(split_label(run_label)[0]).plug == "persona"

    plugs = [m for m in table if is_plug(m)]
    others = [m for m in table if not is_plug(m)]
    found = {}
    for split, split_golds in golds.items():
        if any(g is None for g in split_golds):
            continue
        candidates = [m for m in others if split in table[m]]
        sign = -1 if headline.higher_is_better else 1
        best = min(candidates, key=lambda m: sign * table[m][split][headline.name]["mean"],
                   default=None)

        def scores(run_label):
            method = split_label(run_label)[0]
            per_seed = [significance.per_question_scores(
                task.name, _predictions(d, method, split), split_golds)
                for d in rundirs[run_label]]
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
            method, variant = split_label(plug)
            control = label(control_of(method), variant)
            test = {"baseline": best, "p": p_values(plug, best)} if best else {}
            if control != best and split in table.get(control, {}):
                test.update(control=control, control_p=p_values(plug, control))
            if variant and split in table.get(method, {}):
                test.update(unvaried=method, unvaried_p=p_values(plug, method))
            if test:
                found.setdefault(plug, {})[split] = test
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
             f"significant at p < {ALPHA}. method+FIELD=VALUE: trained with those config "
             f"fields changed (--variant).", "",
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
            for against, p_key in (("baseline", "p"), ("control", "control_p"),
                                   ("unvaried", "unvaried_p")):
                if against in test:
                    p = ", ".join(f"{name} p = {value:.3g}" for name, value in test[p_key].items())
                    lines.append(f"- {method} against {test[against]} on {split}: {p}")
    lines += ["", f"{total_seconds:.0f} s in all on {platform.machine()} "
              f"({platform.processor() or 'cpu'}), Python {platform.python_version()}."]
    return "\n".join(lines) + "\n"


def compare(config, workdir: str | Path, method_names: Sequence[str], seeds: int,
            command: str = "", variants: Sequence[str] = ()) -> dict:
    """Runs the methods, and the trained ones again under each variant (resuming), writes
    compare.json and compare.md; returns the table."""
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
    for variant in variants:
        experiment.build(cli.variant_config(config, variant), splits=(), abstract=True)
    workdir.mkdir(parents=True, exist_ok=True)
    # Every run reads the same data and shares one history-embedding cache.
    config.data.dir = str(experiment.data_dir(config, workdir))
    config.data.cache_dir = config.data.cache_dir or str(workdir / "cache")
    configs = {"": config, **{variant: cli.variant_config(config, variant)
                              for variant in variants}}
    table, rundirs, seconds = {}, {}, {}
    for variant, method in [("", m) for m in chosen] + [
            (v, m) for v in variants for m in chosen if m.trains]:
        name = label(method.name, variant)
        seed_list = range(seeds) if method.trains else range(1)
        rundirs[name] = [run_dir(workdir, name, seed) for seed in seed_list]
        runs = []
        for seed, rundir in zip(seed_list, rundirs[name]):
            cli.echo(f"== {name}, seed {seed}: {rundir}")
            runs.append(_run_one(configs[variant], method, seed, workdir, variant)[method.name])
        table[name] = {split: {metric: _summary([run[split][metric] for run in runs])
                               for metric in runs[0][split]} for split in runs[0]}
        seconds[name] = float(np.mean([json.loads((d / "run.json").read_text())["seconds"]
                                       for d in rundirs[name]]))
    splits = dict.fromkeys(split for by_split in table.values() for split in by_split)
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
    compare(cli.CONFIG.value, cli.WORKDIR.value, METHODS.value, SEEDS.value, command,
            cli.VARIANTS.value)


if __name__ == "__main__":
    cli.run(main, "config", "workdir")
