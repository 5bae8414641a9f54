"""Trains a persona plug for a frozen LLM and reports how much personalization helped.

  python -m plug_jax.train --config configs/lamp3.py --workdir /tmp/pplug_lamp3

Reads top to bottom: mesh -> data, frozen LLM, encoder, history cache -> plug init -> jitted
update -> training loop -> evaluation of PPlug against the zero-shot LLM -> saved plug.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags
from tensorboardX import SummaryWriter
from tqdm import tqdm

from plug_jax import checkpoint, evaluate, sharding
from plug_jax import experiment as experiment_lib
from plug_jax.data import pipeline

ENCODER_GROUP, HEAD_GROUP = "encoder", "head"


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   train_query_encoder: bool = True) -> optax.GradientTransformation:
    """AdamW with linear warmup and decay; the query encoder has its own learning rate (or is
    frozen: then it has no optimizer state)."""

    def schedule(peak):
        warmup = max(1, int(optim.warmup_fraction * total_steps))
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup))],
                                    [warmup])

    def group(params):
        return {name: jax.tree.map(lambda _: ENCODER_GROUP if name == "query_encoder" else HEAD_GROUP,
                                   subtree) for name, subtree in params.items()}

    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.multi_transform({
            HEAD_GROUP: optax.adamw(schedule(optim.lr), weight_decay=optim.weight_decay),
            ENCODER_GROUP: (optax.adamw(schedule(optim.encoder_lr), weight_decay=optim.weight_decay)
                            if train_query_encoder else optax.set_to_zero()),
        }, group))


def loss_fn(plug_params, llm_params, batch, *, embedder, llm):
    soft = embedder.apply({"params": plug_params}, batch["query_tokens"], batch["query_mask"],
                          batch["history"], batch["history_mask"])
    return llm.loss(llm_params, soft, batch)


def train_step(state, llm_params, batch, *, embedder, llm, optimizer, accum_steps: int):
    """One update of the plug; the frozen LLM is an argument, never differentiated.

    The batch splits into `accum_steps` microbatches whose summed gradients make one update, so
    the result equals one step on the whole batch (token-weighted mean loss).
    """
    value_and_grad = jax.value_and_grad(
        lambda params, micro: loss_fn(params, llm_params, micro, embedder=embedder, llm=llm),
        has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, one):
        (loss_sum, count), grads = value_and_grad(state["params"], one)
        total_loss, total_count, total_grads = carry
        return (total_loss + loss_sum, total_count + count,
                jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (zero, zero, zeros), micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    stats = {"loss": loss_sum / count, "target_tokens": count, "grad_norm": optax.tree.norm(grads)}
    return {"params": params, "opt": opt_state, "step": state["step"] + 1}, stats


def total_steps(config: ml_collections.ConfigDict, num_train: int) -> int:
    per_epoch = max(1, num_train // config.optim.batch_size)
    epochs_steps = max(1, int(round(config.optim.epochs * per_epoch)))
    return min(epochs_steps, config.optim.max_steps) if config.optim.max_steps else epochs_steps


def train_batches(features, table, config, start_step: int):
    """An endless, seeded stream of training batches (a new shuffle every epoch)."""
    size = config.optim.batch_size
    per_epoch = max(1, pipeline.num_examples(features) // size)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        yield from pipeline.batches(features, table, size, seed=config.seed + epoch,
                                    drop_remainder=pipeline.num_examples(features) >= size,
                                    start=offset)
        epoch, offset = epoch + 1, 0


@dataclasses.dataclass
class RunResult:
    experiment: Any
    state: Any
    metrics: dict
    losses: list[float]
    compilations: int  # of the update function: 1 when shapes never change


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> RunResult:
    """Trains, evaluates PPlug against the zero-shot LLM, and saves the plug."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    started = time.time()

    # ---------------------------------------------------------------- mesh
    mesh = sharding.make_mesh(config.mesh)
    rules = [tuple(rule) for rule in config.axis_rules]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # ------------------------------------------------------------ data, LLM, encoder
        print(f"building the experiment: task {config.data.task}, LLM {config.llm.path}, "
              f"encoder {config.encoder.path}, data {config.data.dir or 'synthetic'}")
        exp = experiment_lib.build(config, workdir)
        train_features = pipeline.featurize(
            exp.splits[config.data.train_split], exp.llm, exp.query_tokenizer, exp.table,
            data_config=config.data, query_instruction=config.encoder.query_instruction,
            with_targets=True)
        train_features = pipeline.augment(train_features, config.data.augment_copies, config.seed)
        steps = total_steps(config, pipeline.num_examples(train_features))
        print(f"{pipeline.num_examples(train_features)} training examples, {steps} steps of "
              f"batch {config.optim.batch_size}; history table: {len(exp.table)} texts "
              f"({exp.table.path})")

        # ------------------------------------------------------------ plug init + optimizer
        params = exp.init_plug_params(jax.random.key(config.seed))
        optimizer = make_optimizer(config.optim, steps, config.plug.train_query_encoder)
        state = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
        num_params = sum(x.size for x in jax.tree.leaves(params))
        print(f"plug parameters: {num_params / 1e6:.2f}M (LLM frozen: "
              f"{sum(x.size for x in jax.tree.leaves(exp.llm_params)) / 1e6:.1f}M)")

        # ------------------------------------------------------------ jitted update
        update = jax.jit(functools.partial(train_step, embedder=exp.embedder, llm=exp.llm,
                                           optimizer=optimizer,
                                           accum_steps=config.optim.grad_accum_steps),
                         donate_argnums=(0,))

        # ------------------------------------------------------------ training loop
        writer = SummaryWriter(str(workdir / "tensorboard"))
        batches = train_batches(train_features, exp.table, config, start_step=0)
        history = []
        with tqdm(total=steps, desc="training", unit="step") as bar:
            for step in range(1, steps + 1):
                batch = next(batches)
                batch.pop("example_mask")
                tick = time.time()
                state, stats = update(state, exp.llm_params, batch)
                stats = jax.device_get(stats)
                seconds = time.time() - tick
                history.append(float(stats["loss"]))
                if step % config.log_every == 0 or step in (1, steps):
                    for name, value in stats.items():
                        writer.add_scalar(f"train/{name}", float(value), step)
                    writer.add_scalar("train/examples_per_second",
                                      config.optim.batch_size / seconds, step)
                bar.set_postfix(loss=f"{stats['loss']:.3f}",
                                ex_per_s=f"{config.optim.batch_size / seconds:.1f}")
                bar.update(1)
        print(f"loss: first {np.mean(history[:5]):.4f} -> last {np.mean(history[-5:]):.4f} "
              f"(mean of 5 steps)")

        # ------------------------------------------------------------ save + evaluate
        plug_path = checkpoint.save_plug(workdir / "plug", state["params"])
        results = evaluate.evaluate(exp, state["params"], tuple(config.data.eval_splits), workdir)
        for method, by_split in results.items():
            for split, values in by_split.items():
                for name, value in values.items():
                    writer.add_scalar(f"{method}/{split}/{name}", value, steps)
        writer.close()

    print(evaluate.format_table(results, exp.task.name))
    print(f"plug saved to {plug_path}; metrics written to {evaluate.write_metrics(results, workdir)}; "
          f"{time.time() - started:.0f} s in all")
    return RunResult(exp, state, results, history, update._cache_size())


def main(argv: Sequence[str]) -> None:
    del argv
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "A configs/lampN.py file (':paper' for the paper).")
    flags.DEFINE_string("workdir", None, "Where checkpoints, caches, metrics and logs go.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
