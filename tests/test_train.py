"""End to end on tiny models: the training step, the run, and what it leaves in the workdir."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lamp3
from plug_jax import llm as llm_lib
from plug_jax import train


def _tiny_config(**fields):
    config = lamp3.get_config("tiny")
    for dotted, value in fields.items():
        node = config
        *path, last = dotted.split("__")
        for name in path:
            node = node[name]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = _tiny_config(optim__max_steps=12, optim__epochs=10.0, optim__lr=1e-2)
    return workdir, train.run(config, workdir)


def test_loss_falls_and_the_step_compiles_once(tiny_run):
    _, result = tiny_run
    assert len(result.losses) == 12
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.05, result.losses
    assert result.compilations == 1


def test_frozen_llm_is_bit_identical_after_training(tiny_run):
    _, result = tiny_run
    _, fresh = llm_lib.load_llm("tiny-llama")
    after = jax.tree.leaves(result.experiment.llm_params)
    assert len(after) == len(jax.tree.leaves(fresh))
    for a, b in zip(after, jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_only_the_plug_trains(tiny_run):
    _, result = tiny_run
    start = result.experiment.init_plug_params(jax.random.key(0))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           result.state["params"], start)
    assert all(jax.tree.leaves(changed["persona_projector"]))
    assert all(jax.tree.leaves(changed["instruction_projector"]))
    assert changed["instruction"]
    assert any(jax.tree.leaves(changed["query_encoder"]))


def test_run_writes_metrics_predictions_and_the_plug(tiny_run):
    workdir, result = tiny_run
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert set(metrics) == {"pplug", "zero_shot", "majority", "profile"}
    for method in metrics:
        assert set(metrics[method]["dev"]) == {"mae", "rmse"}
    assert metrics == result.metrics
    predictions = json.loads((workdir / "predictions_pplug_dev.json").read_text())
    assert predictions["task"] == "LaMP_3"
    attention = json.loads((workdir / "attention.json").read_text())["dev"]
    assert attention["users"] > 0
    assert 0.0 <= attention["entropy"] <= attention["uniform_entropy"] + 1e-6
    assert len(predictions["golds"]) == len(result.experiment.splits["dev"])
    # The reported MAE, recomputed by hand from the written predictions and the gold file.
    gold_file = next((workdir / "data").glob("*/dev_outputs.json"))
    golds = {g["id"]: float(g["output"]) for g in json.loads(gold_file.read_text())["golds"]}
    errors = []
    for p in predictions["golds"]:
        gold = golds[p["id"]]
        try:
            guess = float(p["output"])
        except ValueError:  # the official worst case
            guess = 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0
        errors.append(abs(guess - gold))
    assert metrics["pplug"]["dev"]["mae"] == pytest.approx(np.mean(errors))
    assert (workdir / "plug").is_dir()
    assert list((workdir / "tensorboard").iterdir())


def test_gradient_accumulation_equals_one_big_batch(tiny_run):
    workdir, result = tiny_run
    exp = result.experiment
    from plug_jax.data import pipeline

    batch = pipeline.make_featurize(exp, llm_length=None)(exp.splits["train"][:8])
    params = exp.init_plug_params(jax.random.key(3))
    optimizer = train.make_optimizer(exp.config.optim, 10)
    updated = []
    for accum in (1, 2, 4):
        state = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
        step = jax.jit(functools.partial(train.train_step, embedder=exp.embedder, llm=exp.llm,
                                         optimizer=optimizer, accum_steps=accum))
        new_state, stats = step(state, exp.llm_params, batch)
        updated.append((new_state["params"], float(stats["loss"])))
    for params_k, loss_k in updated[1:]:
        assert loss_k == pytest.approx(updated[0][1], rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     params_k, updated[0][0])


@pytest.mark.usefixtures("sharp_tiny_t5")
def test_t5_family_trains_end_to_end(tmp_path):
    config = _tiny_config(llm__path="tiny-t5", optim__max_steps=8, optim__epochs=10.0,
                          optim__lr=1e-2)
    result = train.run(config, tmp_path, baselines=())
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert result.compilations == 1
    assert set(result.metrics["pplug"]["dev"]) == {"mae", "rmse"}


def test_the_plug_learns_who_the_user_is(tmp_path):
    """Synthetic LaMP-2: each user's answer is their favourite tag, which only their history shows.

    After training, the plug with each user's own history must explain the gold answers clearly
    better than the same plug given other users' histories. A random tiny LLM cannot be steered to
    *generate* the tags, so the measure is the gold answers' likelihood (per-token NLL).
    """
    from configs import lamp2
    from plug_jax import evaluate

    config = lamp2.get_config("tiny")
    config.encoder.path = "minilm"  # real sentence embeddings: users' histories must differ
    config.plug.train_query_encoder = False
    config.data.history_labels = True  # each history text starts with its tag
    config.data.synthetic.update(num_users=48, examples_per_user=4)
    config.optim.update(max_steps=100, epochs=30.0, batch_size=8, lr=3e-3)
    # Measured below, by likelihood: the run decodes one dev question, with no baseline.
    config.data.update(eval_splits=("dev",), max_eval_examples=1)
    result = train.run(config, tmp_path, baselines=())
    exp, params = result.experiment, result.state["params"]

    dev = exp.splits["dev"]
    others = np.random.default_rng(0).permutation(len(dev))
    assert np.mean([dev[i].user_id != dev[j].user_id for i, j in enumerate(others)]) > 0.9
    shuffled = [dataclasses.replace(e, history=dev[j].history) for e, j in zip(dev, others)]
    own_nll = evaluate.target_nll(exp, params, dev)
    shuffled_nll = evaluate.target_nll(exp, params, shuffled)
    zero_shot_nll = evaluate.target_nll(exp, None, dev)
    print(f"dev NLL: own history {own_nll:.3f}, shuffled {shuffled_nll:.3f}, "
          f"zero-shot {zero_shot_nll:.3f}")
    assert own_nll < shuffled_nll - 0.25
    assert own_nll < zero_shot_nll - 0.25


def test_the_exported_plug_reproduces_the_run_metrics(tiny_run, tmp_path):
    from plug_jax import evaluate, export

    workdir, result = tiny_run
    exp = result.experiment
    plug_config, plug_params = export.load_plug(workdir / "plug")
    assert export.user_embedder_from_config(plug_config) == exp.embedder
    shardings = exp.plug_shardings(exp.mesh)  # as the evaluate command places them
    _, placed = export.load_plug(workdir / "plug", shardings)
    assert jax.tree.map(lambda x: x.sharding, placed) == shardings
    again = evaluate.evaluate(exp, plug_params, ("dev",), tmp_path, baselines=())
    assert again["pplug"]["dev"] == result.metrics["pplug"]["dev"]


def test_two_runs_of_one_config_write_the_same_bytes(tiny_trained_run, tmp_path):
    """Same config and seed on the same machine: the same metrics, losses and predictions, byte
    for byte (data order, history cache, initialization and XLA:CPU are all deterministic)."""
    import copy

    workdir, first = tiny_trained_run
    train.run(copy.deepcopy(first.experiment.config), tmp_path)
    for name in ("metrics.json", "train_metrics.jsonl", "predictions_pplug_dev.json",
                 "attention.json"):
        assert (tmp_path / name).read_bytes() == (workdir / name).read_bytes(), name


# The training command with a loss that turns NaN at step 3 (the update itself stays finite).
NAN_FROM_STEP_3 = """
import jax.numpy as jnp
from plug_jax import cli, train

update = train.train_step

def nan_from_step_3(state, *args, **kwargs):
    new_state, stats = update(state, *args, **kwargs)
    return new_state, dict(stats, loss=jnp.where(state["step"] >= 2, jnp.nan, stats["loss"]))

train.train_step = nan_from_step_3
cli.run(train.main, "config", "workdir", distributed=True)
"""
NAN_RUN_FIELDS = {"optim.max_steps": 6, "checkpoint.save_every": 2, "log_every": 100,
                  "data.eval_splits": ()}


def test_a_nan_loss_stops_before_any_checkpoint_holds_it_and_logs_stay_quiet(tmp_path):
    """The loss is fetched at logging and checkpoint steps only: NaN at step 3 is seen at step 4's
    save, which does not happen; the run exits 1 with one line naming step 3; a rerun resumes
    from step 2. The terminal shows no INFO line, the workdir's log file holds them."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from plug_jax import checkpoint

    repo = Path(__file__).resolve().parents[1]
    script, workdir = tmp_path / "nan_train.py", tmp_path / "run"
    script.write_text(NAN_FROM_STEP_3)
    overrides = [f"--config.{name}={value}" for name, value in NAN_RUN_FIELDS.items()]
    done = subprocess.run(
        [sys.executable, str(script), "--config=configs/lamp3.py:tiny", *overrides,
         f"--workdir={workdir}"], cwd=repo, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu",
                 JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-6000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-6000:]
    assert errors[0].startswith("error: the training loss is nan at step 3: stopped without "
                                "saving it; the checkpoint of step 2 is intact"), errors
    assert checkpoint.checkpoint_steps(workdir) == [2]
    assert not (workdir / "run.lock").exists()
    assert not re.search(r"\bINFO\b|^I\d{4} ", output, re.MULTILINE), output[-6000:]
    assert "training:" in output  # the progress bar
    log = (workdir / "logs" / "nan_train.log").read_text()
    assert re.search(r" INFO .*orbax", log), log[-3000:]

    config = _tiny_config(**{name.replace(".", "__"): value
                             for name, value in NAN_RUN_FIELDS.items()})
    resumed = train.run(config, workdir)
    assert resumed.start_step == 2
    assert len(resumed.losses) == 4 and np.all(np.isfinite(resumed.losses))
    assert checkpoint.checkpoint_steps(workdir)[-1] == 6


def _dots(jaxpr) -> list:
    """Every dot_general in a jaxpr, its sub-jaxprs (scan, jit, remat) included."""
    dots = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dots.append(eqn)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    dots += _dots(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    dots += _dots(sub)
    return dots


def _dot_output_shapes_of(dots) -> list[tuple[int, ...]]:
    return [tuple(eqn.outvars[0].aval.shape) for eqn in dots]


@pytest.mark.parametrize("remat_policy, dropout, dtype", [
    (None, 0.0, "float32"), ("dots_with_no_batch_dims_saveable", 0.0, "float32"),
    (None, 0.1, "float32"), (None, 0.0, "bfloat16")])
def test_the_update_has_no_weight_gradient_dot_for_the_frozen_llm(remat_policy, dropout, dtype,
                                                                  tmp_path):
    """A weight's gradient is a dot over batch and length whose output has the weight's shape;
    activations keep their batch axes. Shapes that only frozen LLM weights have must not be the
    output of any dot in the update, whereas differentiating the LLM too makes them. The LLM in
    train mode (dropout) is as frozen. In bf16 every dot with a frozen weight multiplies bf16 by
    bf16 into a float32 sum, the backward's too."""
    from plug_jax import experiment
    from plug_jax.data import pipeline

    config = _tiny_config(llm__dropout=dropout, plug__dropout=dropout, llm__dtype=dtype)
    if remat_policy:
        config.llm.update(remat=True, remat_policy=remat_policy)
    exp = experiment.build(config, tmp_path, splits=(config.data.train_split,), progress=False)
    examples = exp.splits[config.data.train_split][:config.optim.batch_size]
    length = pipeline.longest_llm_length(exp.llm, examples, config.data, with_targets=True)
    batch = pipeline.make_featurize(exp, length)(examples)
    params = exp.init_plug_params(jax.random.key(0))
    optimizer = train.make_optimizer(config.optim, 4)
    state = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def weight_shapes(tree):
        return {s for x in jax.tree.leaves(tree) if x.ndim == 2 for s in (x.shape, x.shape[::-1])}

    frozen_only = weight_shapes(exp.llm_params) - weight_shapes(params)
    assert len(frozen_only) >= 3, frozen_only
    update = functools.partial(train.train_step, embedder=exp.embedder, llm=exp.llm,
                               optimizer=optimizer, accum_steps=1)
    dots = _dots(jax.make_jaxpr(update)(state, exp.llm_params, batch).jaxpr)
    assert dots and not [s for s in _dot_output_shapes_of(dots) if s in frozen_only]
    with_frozen_weight = [eqn for eqn in dots
                          if any(v.aval.shape in frozen_only for v in eqn.invars)]
    assert len(with_frozen_weight) >= 2 * len(frozen_only)  # forward and backward
    assert {v.aval.dtype.name for eqn in with_frozen_weight for v in eqn.invars} == {dtype}
    assert {eqn.outvars[0].aval.dtype.name for eqn in with_frozen_weight} == {"float32"}

    def loss_of_both(plug_params, llm_params):
        return train.loss_fn(plug_params, llm_params, batch, embedder=exp.embedder,
                             llm=exp.llm)[0]

    both = jax.make_jaxpr(jax.grad(loss_of_both, argnums=(0, 1)))(params, exp.llm_params).jaxpr
    assert [s for s in _dot_output_shapes_of(_dots(both)) if s in frozen_only]


def test_remat_policies_keep_the_gradient_and_a_wrong_name_is_refused(tmp_path):
    from plug_jax import experiment
    from plug_jax.data import pipeline

    grads = []
    for remat, policy in ((False, ""), (True, ""), (True, "dots_with_no_batch_dims_saveable")):
        config = _tiny_config(llm__remat=remat, llm__remat_policy=policy)
        exp = experiment.build(config, tmp_path, splits=(config.data.train_split,), progress=False)
        examples = exp.splits[config.data.train_split][:2]
        length = pipeline.longest_llm_length(exp.llm, examples, config.data, with_targets=True)
        batch = pipeline.make_featurize(exp, length)(examples)
        params = exp.init_plug_params(jax.random.key(0))
        grads.append(jax.jit(jax.grad(lambda p: train.loss_fn(
            p, exp.llm_params, batch, embedder=exp.embedder, llm=exp.llm)[0]))(params))
    for other in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # recomputed: other fusions
    with pytest.raises(ValueError, match="remat_policy 'dots'"):
        llm_lib.load_llm("tiny-llama", remat=True)[0].module.clone(remat_policy="dots").init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))


def test_evaluation_answers_each_split_once_per_method_and_compiles_once(tiny_run, tmp_path,
                                                                         monkeypatch):
    from plug_jax import evaluate

    _, result = tiny_run
    exp, calls, made = result.experiment, [], []

    def counting_label_nll_fn(experiment):
        jitted = make(experiment)
        made.append(jitted)

        def label_nll_fn(llm_params, plug_params, batch, labels, label_mask):
            calls.append((plug_params is None, tuple(batch["index"][batch["example_mask"]])))
            return jitted(llm_params, plug_params, batch, labels, label_mask)

        return label_nll_fn

    make = evaluate.make_label_nll_fn
    monkeypatch.setattr(evaluate, "make_label_nll_fn", counting_label_nll_fn)
    splits = ("dev", "dev_new")
    metrics = evaluate.evaluate(exp, result.state["params"], splits, tmp_path, write=False)
    assert set(metrics["pplug"]) == set(metrics["zero_shot"]) == set(splits)
    sizes = sum(len(exp.splits[split]) for split in splits)
    for zero_shot in (False, True):
        answered = [i for is_zero_shot, rows in calls if is_zero_shot == zero_shot for i in rows]
        assert len(answered) == sizes  # every question of both splits once
    assert len(made) == 1 and made[0]._cache_size() == 2  # one shape: plug, and no plug


def test_the_attention_entropy_of_another_split_compiles_nothing(tiny_run):
    from plug_jax import evaluate

    _, result = tiny_run
    exp, params = result.experiment, result.state["params"]
    length = evaluate.eval_length(exp, evaluate.evaluated_examples(exp, ("dev", "dev_new")))
    weights_fn = evaluate._attention_weights_fn(exp.embedder, exp.mesh)
    dev = evaluate.attention_entropy(exp, params, exp.splits["dev"], llm_length=length)
    compiled = weights_fn._cache_size()
    dev_new = evaluate.attention_entropy(exp, params, exp.splits["dev_new"], llm_length=length)
    assert weights_fn._cache_size() == compiled
    for entropy in (dev, dev_new):
        assert 0 < entropy["entropy"] <= entropy["uniform_entropy"] + 1e-6, entropy


# ---------------------------------------------------------------------------------------------
# Dropout in the training loss (config :paper: 0.1 in the query encoder and the frozen LLM).


def _dropout_config(cache_dir, **fields):
    return _tiny_config(plug__dropout=0.1, llm__dropout=0.1, optim__max_steps=12,
                        optim__epochs=10.0, optim__lr=1e-2, data__eval_splits=("dev",),
                        data__max_eval_examples=8, data__cache_dir=str(cache_dir), **fields)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("dropout_cache")
    workdir = tmp_path_factory.mktemp("dropout_run")
    return cache, train.run(_dropout_config(cache), workdir, baselines=())


def test_a_run_with_dropout_trains_the_plug_alone_and_evaluates_deterministically(dropout_run):
    from plug_jax import evaluate

    _, result = dropout_run
    exp = result.experiment
    assert exp.embedder.dropout_rate == exp.llm.dropout_rate == 0.1
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.05, result.losses
    assert result.compilations == 1
    _, fresh = llm_lib.load_llm("tiny-llama")
    for a, b in zip(jax.tree.leaves(exp.llm_params), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Evaluation runs without dropout: twice the same, and the same as without any dropout rate.
    examples, params = exp.splits["dev"][:8], result.state["params"]
    without_dropout = dataclasses.replace(
        exp, embedder=exp.embedder.clone(dropout_rate=0.0),
        llm=dataclasses.replace(exp.llm, module=exp.llm.module.clone(dropout_rate=0.0)))
    nll = evaluate.target_nll(exp, params, examples)
    assert evaluate.target_nll(exp, params, examples) == nll
    assert evaluate.target_nll(without_dropout, params, examples) == nll


def test_dropout_masks_follow_the_step(dropout_run):
    """The update is a function of the state (its step included), the batch and the seed: the
    same state updates alike whenever it runs (so a resumed run goes on as an uninterrupted
    one), while the next step draws other masks."""
    from plug_jax.data import pipeline

    _, result = dropout_run
    exp = result.experiment
    examples = exp.splits["train"][:4]
    length = pipeline.longest_llm_length(exp.llm, examples, exp.config.data, with_targets=True)
    batch = pipeline.make_featurize(exp, length)(examples)
    batch = {k: v for k, v in batch.items() if k not in ("index", "example_mask")}
    params = exp.init_plug_params(jax.random.key(3))
    optimizer = train.make_optimizer(exp.config.optim, 10)
    update = jax.jit(functools.partial(train.train_step, embedder=exp.embedder, llm=exp.llm,
                                       optimizer=optimizer, accum_steps=2, dropout_seed=0))

    def loss(step):
        state = {"params": params, "opt": optimizer.init(params),
                 "step": jnp.asarray(step, jnp.int32)}
        return float(update(state, exp.llm_params, batch)[1]["loss"])

    assert loss(5) == loss(5) != loss(6)


def test_a_run_with_dropout_stopped_and_resumed_ends_as_an_uninterrupted_one(dropout_run,
                                                                            tmp_path,
                                                                            monkeypatch):
    from plug_jax import preemption

    cache, uninterrupted = dropout_run
    config = _dropout_config(cache)
    with monkeypatch.context() as patch:
        patch.setattr(preemption.PreemptionGuard, "should_stop", lambda self, step: step >= 3)
        with pytest.raises(SystemExit):
            train.run(config, tmp_path, baselines=())
    resumed = train.run(config, tmp_path, baselines=())
    assert resumed.start_step == 3
    assert resumed.losses == uninterrupted.losses[3:]
    for a, b in zip(jax.tree.leaves(resumed.state["params"]),
                    jax.tree.leaves(uninterrupted.state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
