"""Trains a persona plug for a frozen LLM and reports how much personalization helped.

  python -m plug_jax.train --config configs/lamp3.py --workdir /tmp/pplug_lamp3

Reads top to bottom: mesh -> data, frozen LLM, encoder, history cache -> plug init -> jitted
update -> training loop -> evaluation against the baselines (zero-shot LLM, majority label, the
user's own past labels) -> saved plug. `--config.method=instruction` trains the instruction token
alone, `pplug_bm25` adds retrieved history to the prompt (plug_jax/methods.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from orbax.checkpoint import multihost
from tqdm import tqdm

from plug_jax import checkpoint, cli, errors, evaluate, export, methods, preemption, report
from plug_jax import sharding
from plug_jax import experiment as experiment_lib
from plug_jax import workdir as workdir_lib
from plug_jax.data import grain_pipeline, lamp, pipeline
from plug_jax.models import layers

ENCODER_GROUP, HEAD_GROUP = "encoder", "head"


def lr_schedule(optim: ml_collections.ConfigDict, total_steps: int, peak: float) -> optax.Schedule:
    """Linear warmup to `peak`, then linear decay to 0; update n (from 0) runs at schedule(n)."""
    round_warmup = math.ceil if optim.get("warmup_rounding", "floor") == "ceil" else int
    warmup = max(1, round_warmup(optim.warmup_fraction * total_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.linear_schedule(peak, 0.0, max(1, total_steps - warmup))],
                                [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   train_query_encoder: bool = True) -> optax.GradientTransformation:
    """AdamW with linear warmup and decay; the query encoder has its own learning rate (or is
    frozen: then it has no optimizer state)."""

    def schedule(peak):
        return lr_schedule(optim, total_steps, peak)

    def group(params):
        return {name: jax.tree.map(lambda _: ENCODER_GROUP if name == "query_encoder" else HEAD_GROUP,
                                   subtree) for name, subtree in params.items()}

    # "no_bias_norm": Hugging Face Trainer's rule (the reference's): biases and LayerNorm scales
    # are not decayed.
    decay_mask = None if optim.get("weight_decay_mask", "all") == "all" else (
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params))

    def adamw(peak):
        return optax.adamw(schedule(peak), weight_decay=optim.weight_decay, mask=decay_mask)

    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity(),
        optax.multi_transform({
            HEAD_GROUP: adamw(optim.lr),
            ENCODER_GROUP: (adamw(optim.encoder_lr)
                            if train_query_encoder else optax.set_to_zero()),
        }, group))


def loss_fn(plug_params, llm_params, batch, *, embedder, llm, dropout_rng=None):
    """The batch's summed target-token loss and its number of target tokens. With a dropout_rng
    it runs in train mode: the query encoder's and the frozen LLM's dropout on, as the reference
    trains; without, deterministic."""
    plug_rng = llm_rng = None
    if dropout_rng is not None:
        plug_rng, llm_rng = jax.random.split(dropout_rng)
    soft = embedder.apply({"params": plug_params}, batch["query_tokens"], batch["query_mask"],
                          batch["history"], batch["history_mask"], **layers.apply_mode(plug_rng))
    return llm.loss(llm_params, soft, batch, dropout_rng=llm_rng)


def train_step(state, llm_params, batch, *, embedder, llm, optimizer, accum_steps: int,
               dropout_seed: int = 0):
    """One update of the plug; the frozen LLM is an argument, never differentiated.

    The batch splits into `accum_steps` microbatches whose summed gradients make one update, so
    the result equals one step on the whole batch (token-weighted mean loss).
    Where the embedder or the LLM has dropout, the loss runs in train mode with masks drawn from
    dropout_seed, the step and the microbatch alone: a resumed run draws the masks an
    uninterrupted one would.
    """
    dropout_key = None
    if embedder.dropout_rate or llm.dropout_rate:
        dropout_key = jax.random.fold_in(jax.random.key(dropout_seed), state["step"])
    value_and_grad = jax.value_and_grad(
        lambda params, micro, rng: loss_fn(params, llm_params, micro, embedder=embedder, llm=llm,
                                           dropout_rng=rng),
        has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, one_and_index):
        one, index = one_and_index
        rng = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        (loss_sum, count), grads = value_and_grad(state["params"], one, rng)
        total_loss, total_count, total_grads = carry
        return (total_loss + loss_sum, total_count + count,
                jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count, grads), _ = jax.lax.scan(accumulate, (zero, zero, zeros),
                                               (micro, jnp.arange(accum_steps)))
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


def to_global(batch: dict[str, np.ndarray], mesh, rules, batch_size: int) -> dict[str, jax.Array]:
    """This process's rows -> global arrays of `batch_size` rows, sharded over the batch axes."""
    return {name: jax.make_array_from_process_local_data(
                sharding.batch_sharding(mesh, rules, value.ndim), value,
                (batch_size,) + value.shape[1:])
            for name, value in batch.items()}


def init_state(optimizer: optax.GradientTransformation, params: Any, mesh) -> dict:
    """{"params", "opt", "step"}: Adam's moments sharded as their parameters (left to the
    compiler, they would be replicated). Call inside the mesh and axis-rules context."""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: {"params": p, "opt": optimizer.init(p),
                              "step": jnp.zeros((), jnp.int32)},
                   out_shardings={"params": param_shardings,
                                  "opt": sharding.optimizer_state_shardings(
                                      jax.eval_shape(optimizer.init, params), params,
                                      param_shardings, mesh),
                                  "step": sharding.replicated(mesh)})(params)


def jit_update(exp, optimizer: optax.GradientTransformation, state: dict, mesh):
    """The jitted `train_step` (state, llm_params, batch) -> (state, stats): the state is donated
    and keeps its shardings step after step, so it compiles once; the frozen LLM is an argument.
    Dropout masks come from config.seed and the step."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(functools.partial(train_step, embedder=exp.embedder, llm=exp.llm,
                                     optimizer=optimizer,
                                     accum_steps=exp.config.optim.grad_accum_steps,
                                     dropout_seed=exp.config.seed),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def wait_for_every_process_to_compile(update, *args) -> None:
    """With several processes, compile the update ahead and wait for the slowest host: on CPUs,
    gloo's collectives give up on a peer that arrives 30 s late, and compile times differ."""
    if jax.process_count() == 1:
        return
    update.lower(*args).compile()
    multihost.sync_global_processes("plug_jax.update_compiled", timeout=3600,
                                    processes=set(range(jax.process_count())))


@dataclasses.dataclass
class RunResult:
    experiment: Any
    state: Any
    metrics: dict
    losses: list[float]
    compilations: int  # of the update function: 1 when shapes never change
    start_step: int    # > 0 when the run resumed from a checkpoint


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: the run stopped without saving that state."""


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike,
        baselines: Sequence[str] = evaluate.BASELINES) -> RunResult:
    """Trains config.method's plug (resuming from the workdir's latest checkpoint), evaluates it
    against the baselines, and exports it. SIGTERM saves a checkpoint and exits.

    The workdir is a local path, a shared file system or a bucket (gs://...), shared by all
    processes and used by one run at a time (WorkdirError otherwise). A loss that is not finite
    raises NonFiniteLoss before any checkpoint holds its state.
    """
    if not methods.get(config.method).trains:
        raise errors.ConfigError(f"config.method {config.method!r} trains nothing: evaluate it with "
                         "python -m plug_jax.compare --methods ...")
    cli.check_writable(workdir)
    workdir = workdir_lib.path(workdir)
    started = time.time()
    mesh = sharding.make_mesh(config.mesh)
    # Built outside the mesh context, which keys JAX's caches of eager ops: the inits compile
    # once per process, whatever the mesh; the LLM and the plug go to their shardings by name.
    cli.echo(f"building the experiment: task {config.data.task}, LLM {config.llm.path}, "
             f"encoder {config.encoder.path}, data {config.data.dir or 'synthetic'}, "
             f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es)")
    exp = experiment_lib.build(config, workdir, mesh=mesh)  # reads and checks every input first
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.check_shared(workdir)
    with workdir_lib.hold(workdir):
        return _run(config, workdir, exp, mesh, baselines, started)


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, exp: experiment_lib.Experiment,
         mesh: jax.sharding.Mesh, baselines: Sequence[str], started: float) -> RunResult:
    is_main = jax.process_index() == 0
    if is_main:
        workdir_lib.write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    rules = [tuple(rule) for rule in config.axis_rules]

    train_examples = exp.splits[config.data.train_split]
    llm_length = pipeline.longest_llm_length(exp.llm, train_examples, config.data,
                                             with_targets=True)
    augment_from = config.data.get("augment_from", "recent")
    num_train = grain_pipeline.num_train_examples(train_examples, config.data.augment_copies,
                                                  config.data.max_history, augment_from)
    steps = total_steps(config, num_train)
    rows = sharding.process_rows(sharding.batch_sharding(mesh, rules, 1), config.optim.batch_size)
    cli.echo(f"{num_train} training examples, {steps} steps of batch {config.optim.batch_size}; "
             f"history table: {len(exp.table)} texts ({exp.table.path})")

    # ---------------------------------------------------------------- plug init + optimizer
    params = exp.init_plug_params(jax.random.key(config.seed), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        optimizer = make_optimizer(config.optim, steps, config.plug.train_query_encoder)
        head_lr = lr_schedule(config.optim, steps, config.optim.lr)
        state = init_state(optimizer, params, mesh)
        num_params = sum(x.size for x in jax.tree.leaves(params))
        cli.echo(f"plug parameters: {num_params / 1e6:.2f}M (LLM frozen: "
                 f"{sum(x.size for x in jax.tree.leaves(exp.llm_params)) / 1e6:.1f}M)")

        # ------------------------------------------------------------ resume
        export.write_run_plug_config(workdir, export.plug_config_for(exp))
        checkpointer = checkpoint.TrainCheckpointer.from_config(workdir, config)
        # Every process walks the same global batches, so the data are the same whatever the
        # number of processes, and featurizes only the rows its devices hold (all of them where
        # the batch axes do not span the processes), in grain's prefetch thread.
        dataset = grain_pipeline.make_train_dataset(
            train_examples, seed=config.seed, batch_size=config.optim.batch_size,
            featurize=pipeline.make_featurize(exp, llm_length), rows=rows,
            augment_copies=config.data.augment_copies, max_history=config.data.max_history,
            augment_from=augment_from)
        batches = iter(dataset)
        start = 0
        restored = checkpointer.restore_latest(checkpoint.abstract_of(state))
        if restored is not None:
            state, data_state, start = restored
            batches.set_state(data_state)
            cli.echo(f"resumed from the checkpoint of step {start} in {workdir / 'checkpoints'}")

        # ------------------------------------------------------------ jitted update
        update = jit_update(exp, optimizer, state, mesh)

        # ------------------------------------------------------------ training loop
        writer = None
        if is_main:
            import tensorboardX  # here: it imports torch, 2 s of every start-up where installed

            writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
        train_log = workdir_lib.JsonLines(workdir / "train_metrics.jsonl") if is_main else None
        # The stats stay on the device until a logging or checkpoint step fetches them (no
        # per-step host sync), and every state saved has had its losses checked.
        losses, pending, tick = [], [], time.time()
        with preemption.PreemptionGuard() as guard, \
                tqdm(total=steps, initial=start, desc="training", unit="step",
                     disable=not is_main) as bar:
            for step in range(start + 1, steps + 1):
                batch = next(batches)
                del batch["index"], batch["example_mask"]  # no padding in training batches
                batch = to_global(batch, mesh, rules, config.optim.batch_size)
                data_state = batches.get_state()
                if step == start + 1:
                    wait_for_every_process_to_compile(update, state, exp.llm_params, batch)
                state, stats = update(state, exp.llm_params, batch)
                pending.append(stats)
                bar.update(1)
                stop = guard.should_stop(step)
                save = stop or step == steps or checkpointer.should_save(step)
                log = step % config.log_every == 0 or step in (1, steps)
                if not (save or log):
                    continue
                fetched = jax.device_get(pending)
                seconds = (time.time() - tick) / len(pending)
                first = step - len(pending) + 1
                pending, tick = [], time.time()
                for at, values in enumerate(fetched, first):
                    if not np.isfinite(values["loss"]):
                        batches.close()
                        checkpointer.close()  # a save of an earlier, checked state finishes
                        last = checkpointer.latest_step()
                        raise NonFiniteLoss(
                            f"the training loss is {values['loss']} at step {at}: stopped "
                            f"without saving it; " + (
                                f"the checkpoint of step {last} is intact and a rerun resumes "
                                f"from it" if last else "no checkpoint was saved") +
                            " (a lower --config.optim.lr or --config.optim.grad_clip may help)")
                    losses.append(float(values["loss"]))
                stats = fetched[-1]
                if writer and log:
                    for name, value in stats.items():
                        writer.add_scalar(f"train/{name}", float(value), step)
                    writer.add_scalar("train/examples_per_second",
                                      config.optim.batch_size / seconds, step)
                    lr = float(head_lr(step - 1))  # the rate this step's update ran at
                    writer.add_scalar("train/lr", lr, step)
                    train_log.append({"step": step, "lr": lr,
                                      **{k: float(v) for k, v in stats.items()}})
                bar.set_postfix(loss=f"{stats['loss']:.3f}",
                                ex_per_s=f"{config.optim.batch_size / seconds:.1f}")
                checkpointer.save(step, state, data_state=data_state, force=stop or step == steps)
                if stop:
                    checkpointer.close()
                    cli.echo(f"stopped by a signal at step {step}: checkpoint saved; rerun the "
                             "same command to resume")
                    raise SystemExit(0)
        batches.close()  # its prefetch thread would featurize on, beside evaluation's
        checkpointer.close()
        if losses:
            cli.echo(f"loss: first {np.mean(losses[:5]):.4f} -> last "
                     f"{np.mean(losses[-5:]):.4f} (mean of 5 steps)")

        # ------------------------------------------------------------ export + evaluate
        plug_path = workdir / "plug"
        # Every process: the export gathers params sharded over processes (a collective).
        export.export_plug(plug_path, state["params"], export.plug_config_for(exp, step=steps))
        results = evaluate.evaluate(exp, state["params"], tuple(config.data.eval_splits), workdir,
                                    method=config.method, baselines=baselines, write=is_main)
        attention, shown, shown_weights = {}, [], []
        report_split = next((s for s in config.data.eval_splits if s in exp.splits), None)
        if exp.embedder.persona_tokens:  # is the input-aware attention used, or near uniform?
            # The aggregator never reads the LLM tokens: evaluation's length, its compiled shape.
            eval_length = evaluate.eval_length(
                exp, evaluate.evaluated_examples(exp, config.data.eval_splits))
            attention = {split: evaluate.attention_entropy(exp, state["params"], exp.splits[split],
                                                           llm_length=eval_length)
                         for split in config.data.eval_splits if split in exp.splits}
            if report_split:  # on every process: the plug may be sharded over them
                shown = report.users_to_show(
                    evaluate.evaluated_examples(exp, (report_split,))[report_split])
                shown_weights = evaluate.attention_weights(exp, state["params"], shown,
                                                           llm_length=eval_length)
        if writer:
            for method, by_split in results.items():
                for split, values in by_split.items():
                    for name, value in values.items():
                        writer.add_scalar(f"{method}/{split}/{name}", value, steps)
            writer.close()

    cli.echo(evaluate.format_table(results, exp.task.name))
    for split, values in attention.items():
        cli.echo(f"aggregator attention on {split}: mean entropy {values['entropy']:.3f} nats, "
                 f"uniform {values['uniform_entropy']:.3f} ({values['users']} users with 2+ items)")
    if is_main:
        workdir_lib.write_json(workdir / "attention.json", attention, indent=2)
        metrics_path = evaluate.write_metrics(results, workdir)
        predictions = workdir / f"predictions_{config.method}_{report_split}.json"
        users = report.attention_users(
            shown, shown_weights, lamp.read_outputs(predictions)[1]
            if shown and predictions.exists() else {})
        report_path = report.write_run_report(workdir, exp.task.name, method=config.method,
                                              users=users, split=report_split or "")
        print(f"plug exported to {plug_path}; metrics written to {metrics_path}; report: "
              f"{report_path}; {time.time() - started:.0f} s in all")
    return RunResult(exp, state, results, losses, update._cache_size(), start)


def main(argv: Sequence[str]) -> None:
    del argv
    try:
        run(cli.CONFIG.value, cli.WORKDIR.value)
    except (NonFiniteLoss, workdir_lib.WorkdirError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli.run(main, "config", "workdir", distributed=True)
