"""Benchmarks of our steps against the PyTorch way of running them.

  python -m plug_jax.bench train --config configs/lamp3.py [--peer torch] [--steps N] [--out bench.json]
  python -m plug_jax.bench train --config configs/lamp3.py --history 8,512 [--peer torch]
  python -m plug_jax.bench train --config configs/lamp3.py --variant llm.dtype=bfloat16 [--variant ...]

  python -m plug_jax.bench decode --config configs/lamp3.py [--peer torch] [--steps N]
  python -m plug_jax.bench embed --config configs/lamp3.py [--peer torch] [--texts N]

The first argument names the benchmark (`BENCHMARKS`): a function (config, workdir, *, steps,
warmup, peer) -> result dict, and one that formats the result as a table. The result, with the
machine's description, goes to --out as JSON. Steady-state figures are medians over `steps` timed
repetitions after the first call (ours compiles there: the persistent cache is off) and `warmup`
untimed ones; ours and the peer alternate, so that load from other jobs falls on both alike.

train: the jitted update exactly as `train.run` builds it (donated state, the frozen LLM an
argument) on one featurized batch of the config's shapes, and with --peer torch the same step in
PyTorch (`plug_jax.torch_peer`), alternating step by step in this process, so that load from
other jobs falls on both alike. --history 8,512 times the same step at each of these history sizes,
all in turn, in one process: each example's history, its most recent items as many as the largest
size, cycled to fill every slot (synthetic and LaMP users have far fewer), so that the
aggregator attends over that many real items. --variant llm.dtype=bfloat16 (repeatable; FIELD=VALUE
pairs joined by commas) times the update of the config so changed on the same batch, in turn with
the rest: what a setting costs or buys, under the same load (each update's XLA temporaries, its
activations mostly, are reported beside its time). Model FLOPs per step:
  4 N T  +  6 P Q
N: LLM parameters; T: LLM tokens of the batch (padded length + soft tokens, times batch size),
each costing 2N forward and 2N in the activation-only backward (the LLM's weights get no
gradient); P: plug parameters; Q: query-encoder tokens (padded), at 6P forward + backward.

decode: one batch of config.decode.eval_batch_size questions of the first evaluation split,
answered by our jitted generation (plug, prefill, cached decoding; the configured search, greedy
where it is 'score') and by transformers' `generate` on the same weights, soft tokens, beams and
lengths (`torch_peer.TorchDecodePeer`). Tokens/s counts the answers' tokens up to their EOS.

embed: the distinct history texts of the configured data (--texts caps them), embedded as
training embeds them (`history.encode_texts`: sorted by length, bucketed shapes) and by a
transformers BertModel with the same weights, pooled and normalized the same way
(`torch_peer.sentence_embeddings`, batches padded to their longest).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from plug_jax import cli, decode as decode_lib, errors, evaluate, sharding
from plug_jax import experiment as experiment_lib
from plug_jax import train as train_lib
from plug_jax.data import history as history_lib, pipeline
from plug_jax.models import bert

PEER = flags.DEFINE_enum("peer", None, ["torch"], "Also time the same step in this framework.")
STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the warm-up); the median is reported.")
WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after the first call.")
TEXTS = flags.DEFINE_integer("texts", 0, "embed: the most history texts to embed; 0: all.")
HISTORY = flags.DEFINE_list("history", [], "train: history items per example to time in turn, "
                            "e.g. 8,512 (each example's own items cycled to fill them); empty: "
                            "the batch as featurized (config.data.max_history slots).")


def machine() -> dict:
    """Where the numbers were measured."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "load_average": os.getloadavg(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()]}
    if "torch" in sys.modules:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def count_params(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def train_flops(llm_params: int, plug_params: int, llm_tokens: int, query_tokens: int) -> int:
    """Model FLOPs of one update: 2N forward + 2N activation-only backward per LLM token, and
    6P per query token for the plug's own forward and backward."""
    return 4 * llm_params * llm_tokens + 6 * plug_params * query_tokens


def _seconds(fn: Callable[[], Any]) -> float:
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def _first_call(fn: Callable[[], Any], warmup: int) -> tuple[Any, float]:
    """fn's first result and its seconds (compilation included), then `warmup` untimed calls."""
    tick = time.perf_counter()
    first = fn()
    seconds = time.perf_counter() - tick
    for _ in range(warmup):
        fn()
    return first, seconds


def _alternate(steps: int, *calls: Callable[[], Any] | None) -> list[list[float]]:
    """Seconds of `steps` calls of each (None: not called), in turn, so that load from other jobs
    falls on all alike."""
    times = [[] for _ in calls]
    for _ in range(steps):
        for call, seconds in zip(calls, times):
            if call is not None:
                seconds.append(_seconds(call))
    return times


def _paired_ratio(times: Sequence[float], base_times: Sequence[float]) -> float:
    """The median over rounds of a round's time over the base's in that round: unlike a ratio of
    medians, it holds while the load from other jobs drifts from round to round."""
    return statistics.median(time / base for time, base in zip(times, base_times))


def with_history_items(features: dict[str, np.ndarray], items: int) -> dict[str, np.ndarray]:
    """The batch with `items` history slots per example, filled with its most recent items,
    cycled where it has fewer (oldest first, as featurized); an example without history keeps
    none."""
    history, mask = features["history"], features["history_mask"]
    filled = np.zeros((history.shape[0], items, history.shape[2]), history.dtype)
    filled_mask = np.zeros((history.shape[0], items), bool)
    for row, (vectors, real) in enumerate(zip(history, mask)):
        own = vectors[real][-items:]
        if len(own):
            filled[row] = own[np.arange(items) % len(own)]
            filled_mask[row] = True
    return {**features, "history": filled, "history_mask": filled_mask}


def _summary(step_times: Sequence[float], first_call_s: float, first_loss: float, examples: int,
             target_tokens: float, flops: int) -> dict:
    step = statistics.median(step_times)
    return {"first_call_s": first_call_s, "step_s": step, "step_times_s": list(step_times),
            "examples_per_s": examples / step, "target_tokens_per_s": target_tokens / step,
            "flops_per_s": flops / step, "first_loss": first_loss}


def train(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
          steps: int = 10, warmup: int = 1, peer: str | None = None,
          history: Sequence[int] = (), variants: Sequence[str] = ()) -> dict:
    """Times the training update (and the peer's) on one batch of the config's shapes; with
    `history` sizes, on one batch per size (`with_history_items`); with `variants` (config
    changes, `variant_config`), each variant's update on the first batch too; all in turn."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="plug_jax_bench_"))
    if history:
        config = config.copy_and_resolve_references()
        config.data.max_history = max(history)
    mesh = sharding.make_mesh(config.mesh)
    rules = [tuple(rule) for rule in config.axis_rules]
    cli.echo(f"building the experiment: LLM {config.llm.path}, encoder {config.encoder.path}")
    exp = experiment_lib.build(config, workdir, splits=(config.data.train_split,), mesh=mesh,
                               progress=False)
    variant_exps = {variant: experiment_lib.build(cli.variant_config(config, variant), workdir,
                                                  splits=(config.data.train_split,), mesh=mesh,
                                                  progress=False)
                    for variant in variants}
    for variant_exp in variant_exps.values():  # one copy of frozen weights read alike
        if (variant_exp.config.llm.path, variant_exp.config.llm.dtype) == (config.llm.path,
                                                                           config.llm.dtype):
            variant_exp.llm_params = exp.llm_params
    examples = list(exp.splits[config.data.train_split])
    batch_size = config.optim.batch_size
    llm_length = pipeline.longest_llm_length(exp.llm, examples, config.data, with_targets=True)
    features = pipeline.make_featurize(exp, llm_length)(
        [examples[i % len(examples)] for i in range(batch_size)])
    batches = ({items: with_history_items(features, items) for items in history} if history
               else {int(features["history"].shape[1]): features})
    first_items = next(iter(batches))
    target_tokens = float(features["target_mask"].sum())
    total_steps = train_lib.total_steps(config, len(examples))

    params = exp.init_plug_params(jax.random.key(config.seed), mesh)
    host_params = jax.device_get(params)  # for the peer: the update donates the state
    num_soft = exp.embedder.num_soft_tokens
    shapes = {"task": config.data.task, "llm": config.llm.path, "encoder": config.encoder.path,
              "batch_size": batch_size, "llm_length": llm_length, "soft_tokens": num_soft,
              "query_length": int(features["query_tokens"].shape[1]), "history": first_items,
              "history_items": float(batches[first_items]["history_mask"].sum(1).mean()),
              "target_tokens": target_tokens,
              "llm_params": count_params(exp.llm_params), "plug_params": count_params(params)}
    llm_tokens = batch_size * (llm_length + num_soft)
    query_tokens = batch_size * shapes["query_length"]
    flops = train_flops(shapes["llm_params"], shapes["plug_params"], llm_tokens, query_tokens)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        optimizer = train_lib.make_optimizer(config.optim, total_steps,
                                             config.plug.train_query_encoder)
        states = {}  # each timed update's own, all from the same initial parameters
        compiled = {}  # ahead of time, for the memory XLA plans for it

        def our_step(key, update, llm_params, batch):
            if key not in compiled:
                compiled[key] = update.lower(states[key], llm_params, batch).compile()
            states[key], stats = compiled[key](states[key], llm_params, batch)
            return float(jax.block_until_ready(stats)["loss"])

        # (side, variant, history items) -> one step; '' is the config itself.
        global_batches = {items: train_lib.to_global(batch, mesh, rules, batch_size)
                          for items, batch in batches.items()}
        experiments = {"": exp, **variant_exps}
        keys = [("ours", "", items) for items in batches] + [
            ("ours", variant, first_items) for variant in variants]
        calls = {}
        for key in keys:
            states[key] = train_lib.init_state(optimizer, jax.tree.map(jnp.copy, params), mesh)
            key_exp = experiments[key[1]]
            calls[key] = functools.partial(
                our_step, key, train_lib.jit_update(key_exp, optimizer, states[key], mesh),
                key_exp.llm_params, global_batches[key[2]])
        first_calls = {}
        for key, call in calls.items():  # one compilation each
            cli.echo(f"compiling and running our first step ({key[1] or 'the config'}, "
                     f"history {key[2]})...")
            first_calls[key] = _first_call(call, warmup)
        ours_rss = peak_rss_mb()

        if peer == "torch":
            import torch

            from plug_jax import torch_peer

            torch.set_num_threads(len(os.sched_getaffinity(0)))
            cli.echo(f"building the torch peer ({torch.get_num_threads()} threads)...")
            peer_model = torch_peer.TorchPeer(exp, host_params, total_steps)
            for items, batch in batches.items():
                calls["peer", "", items] = functools.partial(peer_model.step,
                                                             torch_peer.to_torch(batch))
                first_calls["peer", "", items] = _first_call(calls["peer", "", items], warmup)
        elif peer is not None:
            raise ValueError(f"peer {peer!r}: expected 'torch' or None")

        cli.echo(f"timing {steps} steps" + (" of each, in turn" if len(calls) > 1 else ""))
        times = dict(zip(calls, _alternate(steps, *calls.values())))

    def summary(key):
        first_loss, first_call_s = first_calls[key]
        if key[0] == "peer":
            return {"name": "torch", **_summary(times[key], first_call_s, first_loss, batch_size,
                                                target_tokens, flops),
                    "peak_rss_mb": peak_rss_mb()}
        memory = compiled[key].memory_analysis()
        return {**_summary(times[key], first_call_s, first_loss, batch_size, target_tokens,
                           flops),
                "peak_rss_mb": ours_rss,
                "xla_temp_mb": memory.temp_size_in_bytes / 2 ** 20 if memory else float("nan")}

    def run(items):
        both = {side: summary((side, "", items)) for side in ("ours", "peer")
                if (side, "", items) in calls}
        if "peer" in both:
            both["peer_over_ours"] = both["peer"]["step_s"] / both["ours"]["step_s"]
        return both

    result = {"benchmark": "train", "machine": machine(), "shapes": shapes,
              "flops_per_step": flops,
              "flops_formula": "4 * llm_params * llm_tokens + 6 * plug_params * query_tokens",
              "flops_terms": {"llm_tokens": llm_tokens, "query_tokens": query_tokens},
              **run(first_items)}
    if len(batches) > 1:
        runs = {items: run(items) for items in batches}
        result["by_history"] = {str(items): both for items, both in runs.items()}
        result["largest_over_smallest_history"] = {
            side: _paired_ratio(times[side, "", max(batches)], times[side, "", min(batches)])
            for side in ("ours", "peer") if (side, "", first_items) in calls}
    if variants:
        result["variants"] = {
            variant: {"ours": summary(("ours", variant, first_items)),
                      "over_ours": _paired_ratio(times["ours", variant, first_items],
                                                 times["ours", "", first_items])}
            for variant in variants}
    return result


def _machine_line(machine_info: dict) -> str:
    return (f"machine: {machine_info['platform']}, {machine_info['usable_cpus']}/"
            f"{machine_info['cpu_count']} CPUs, load {machine_info['load_average'][0]:.1f}; "
            f"jax {machine_info['jax']} ({machine_info['jax_backend']})"
            + (f", torch {machine_info['torch']} ({machine_info['torch_threads']} threads)"
               if "torch" in machine_info else ""))


def _table(rows: Sequence[tuple[str, str, str, float]], ours: dict, peer: dict | None) -> list[str]:
    """Rows (label, key, format, unit): ours, the peer's, and peer / ours."""
    lines = [f"{'':34}{'ours (JAX)':>14}" + (f"{'torch':>14}{'torch/ours':>12}" if peer else "")]
    for label, key, fmt, unit in rows:
        line = f"{label:34}{fmt.format(ours[key] / unit):>14}"
        if peer:
            ratio = peer[key] / ours[key] if ours[key] else float("nan")
            line += f"{fmt.format(peer[key] / unit):>14}{ratio:>12.2f}"
        lines.append(line)
    return lines


def format_train(result: dict) -> str:
    shapes, ours, peer = result["shapes"], result["ours"], result.get("peer")
    rows = [("first call, s (ours: compile)", "first_call_s", "{:.2f}", 1),
            (f"step, s (median of {len(ours['step_times_s'])})", "step_s", "{:.4f}", 1),
            ("examples / s", "examples_per_s", "{:.2f}", 1),
            ("target tokens / s", "target_tokens_per_s", "{:.1f}", 1),
            ("GFLOP / s", "flops_per_s", "{:.2f}", 1e9),
            ("loss of the first step", "first_loss", "{:.5f}", 1),
            ("peak RSS, MiB (process so far)", "peak_rss_mb", "{:.0f}", 1)]
    lines = [f"train step: {shapes['task']}, LLM {shapes['llm']} ({shapes['llm_params'] / 1e6:.1f}M "
             f"frozen), encoder {shapes['encoder']}, plug {shapes['plug_params'] / 1e6:.2f}M",
             f"batch {shapes['batch_size']} x ({shapes['llm_length']} LLM + "
             f"{shapes['soft_tokens']} soft) tokens, query {shapes['query_length']} tokens, "
             f"history {shapes['history']} ({shapes['history_items']:.1f} items an example), "
             f"{shapes['target_tokens']:.0f} target tokens",
             f"model FLOPs / step = 4 N T + 6 P Q = 4 x {shapes['llm_params']} x "
             f"{result['flops_terms']['llm_tokens']} + 6 x {shapes['plug_params']} x "
             f"{result['flops_terms']['query_tokens']} = {result['flops_per_step'] / 1e9:.2f} GFLOP",
             _machine_line(result["machine"]), ""]
    lines += _table(rows, ours, peer)
    lines.append(f"{'XLA temporaries, MiB (our update)':34}{ours['xla_temp_mb']:>14.0f}")
    if "by_history" in result:
        lines += ["", f"{'step, s, by history items':34}{'ours (JAX)':>14}"
                  + (f"{'torch':>14}{'torch/ours':>12}" if peer else "")]
        for items, run in result["by_history"].items():
            line = f"{items:>34}{run['ours']['step_s']:>14.4f}"
            if peer:
                line += f"{run['peer']['step_s']:>14.4f}{run['peer_over_ours']:>12.2f}"
            lines.append(line)
        growth = result["largest_over_smallest_history"]  # paired by round
        lines.append(f"{'largest / smallest history':34}{growth['ours']:>14.3f}"
                     + (f"{growth['peer']:>14.3f}" if peer else ""))
    if "variants" in result:
        lines += ["", f"{'by variant':34}{'step, s':>14}{'/ config':>14}{'XLA temp, MiB':>16}",
                  f"{'the config':34}{ours['step_s']:>14.4f}{1:>14.3f}{ours['xla_temp_mb']:>16.0f}"]
        for variant, run in result["variants"].items():
            lines.append(f"{variant:34}{run['ours']['step_s']:>14.4f}{run['over_ours']:>14.3f}"
                         f"{run['ours']['xla_temp_mb']:>16.0f}")
    return "\n".join(lines)


def answer_tokens(tokens: np.ndarray, eos_id: int) -> int:
    """Tokens of [B, T] answers up to and including each row's first EOS."""
    return int(sum(min(len(row), len(kept) + 1)
                   for row, kept in zip(tokens, decode_lib.strip_after_eos(tokens, eos_id))))


def _throughput(times: Sequence[float], first_call_s: float, items: int, tokens: int) -> dict:
    step = statistics.median(times)
    return {"first_call_s": first_call_s, "step_s": step, "step_times_s": list(times),
            "examples_per_s": items / step, "tokens_per_s": tokens / step}


def decode(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
           steps: int = 5, warmup: int = 1, peer: str | None = None) -> dict:
    """Times our generation (and transformers' generate) on one evaluation batch."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="plug_jax_bench_"))
    split = config.data.eval_splits[0]
    cli.echo(f"building the experiment: LLM {config.llm.path}, encoder {config.encoder.path}")
    exp = experiment_lib.build(config, workdir, splits=(config.data.train_split, split),
                               progress=False)
    examples = list(exp.splits[split])
    batch_size = config.decode.eval_batch_size
    chosen = [examples[i % len(examples)] for i in range(batch_size)]
    llm_length = pipeline.longest_llm_length(exp.llm, chosen, config.data, with_targets=False)
    features = pipeline.make_featurize(exp, llm_length, with_targets=False)(chosen)
    params = exp.init_plug_params(jax.random.key(config.seed))
    host_params = jax.device_get(params)
    method = "greedy" if config.decode.method == "score" else config.decode.method
    max_new, beams = config.decode.max_new_tokens, config.decode.num_beams
    generate = evaluate.make_generate_fn(exp)  # 'score' generates greedily
    eos_id = exp.llm.eos_id
    shapes = {"task": config.data.task, "llm": config.llm.path, "encoder": config.encoder.path,
              "split": split, "batch_size": batch_size, "prompt_length": llm_length,
              "prompt_tokens": int(features["mask"].sum()),
              "soft_tokens": exp.embedder.num_soft_tokens, "method": method,
              "num_beams": beams if method == "beam" else 1, "max_new_tokens": max_new,
              "llm_params": count_params(exp.llm_params)}

    def ours_once():
        return np.asarray(jax.block_until_ready(generate(exp.llm_params, params, features)))

    cli.echo(f"compiling and running our first {method} decode...")
    our_tokens, our_first_s = _first_call(ours_once, warmup)
    ours_rss = peak_rss_mb()

    peer_model = None
    if peer == "torch":
        import torch

        from plug_jax import torch_peer

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        cli.echo(f"building the torch peer ({torch.get_num_threads()} threads)...")
        peer_model = torch_peer.TorchDecodePeer(exp, host_params)
        peer_batch = torch_peer.to_torch(features)

        def peer_once():
            return peer_model.generate(peer_batch, method=method, max_new_tokens=max_new,
                                       num_beams=beams)

        peer_tokens, peer_first_s = _first_call(peer_once, warmup)
    elif peer is not None:
        raise ValueError(f"peer {peer!r}: expected 'torch' or None")

    cli.echo(f"timing {steps} decodes" + (" of each, alternating" if peer_model else ""))
    our_times, peer_times = _alternate(steps, ours_once, None if peer_model is None else peer_once)

    result = {"benchmark": "decode", "machine": machine(), "shapes": shapes,
              "ours": {**_throughput(our_times, our_first_s, batch_size,
                                     answer_tokens(our_tokens, eos_id)),
                       "peak_rss_mb": ours_rss}}
    if peer_model is not None:
        result["peer"] = {"name": "torch",
                          **_throughput(peer_times, peer_first_s, batch_size,
                                        answer_tokens(peer_tokens, eos_id)),
                          "peak_rss_mb": peak_rss_mb()}
        result["peer_over_ours"] = result["peer"]["step_s"] / result["ours"]["step_s"]
        result["same_answers"] = float(np.mean(
            [a == b for a, b in zip(decode_lib.strip_after_eos(our_tokens, eos_id),
                                    decode_lib.strip_after_eos(peer_tokens, eos_id))]))
    return result


def format_decode(result: dict) -> str:
    shapes, ours, peer = result["shapes"], result["ours"], result.get("peer")
    rows = [("first call, s (ours: compile)", "first_call_s", "{:.2f}", 1),
            (f"batch decode, s (median of {len(ours['step_times_s'])})", "step_s", "{:.4f}", 1),
            ("examples / s", "examples_per_s", "{:.2f}", 1),
            ("answer tokens / s", "tokens_per_s", "{:.1f}", 1),
            ("peak RSS, MiB (process so far)", "peak_rss_mb", "{:.0f}", 1)]
    lines = [f"decode: {shapes['task']} {shapes['split']}, LLM {shapes['llm']} "
             f"({shapes['llm_params'] / 1e6:.1f}M), {shapes['method']} "
             f"(beams {shapes['num_beams']}), at most {shapes['max_new_tokens']} new tokens",
             f"batch {shapes['batch_size']} x ({shapes['prompt_length']} prompt + "
             f"{shapes['soft_tokens']} soft) slots, {shapes['prompt_tokens']} prompt tokens",
             _machine_line(result["machine"]), ""]
    lines += _table(rows, ours, peer)
    if peer:
        lines.append(f"same answers as ours: {result['same_answers']:.0%}")
    return "\n".join(lines)


def history_texts(config: ml_collections.ConfigDict, workdir: str | Path) -> list[str]:
    """The distinct history texts of the configured splits, in the order training embeds them."""
    splits = experiment_lib.load_splits(
        config, workdir, (config.data.train_split,) + tuple(config.data.eval_splits))
    return sorted({text for examples in splits.values() for e in examples for text in e.history})


def embed(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
          steps: int = 3, warmup: int = 0, peer: str | None = None, texts: int = 0) -> dict:
    """Times the history embedding of the configured data's texts (and BertModel's)."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="plug_jax_bench_"))
    chosen = history_texts(config, workdir)
    chosen = chosen[:texts] if texts else chosen
    encoder_config, encoder_params, encoder_dir = experiment_lib.load_encoder(config.encoder)
    encoder = experiment_lib.history_encoder(config, encoder_config, encoder_params, encoder_dir)
    tokens = int(bert.encode_batch(encoder.tokenizer, chosen, encoder.max_length)[1].sum())
    shapes = {"encoder": config.encoder.path, "texts": len(chosen), "tokens": tokens,
              "pooling": encoder_config.pooling, "normalize": encoder_config.normalize,
              "max_length": encoder.max_length, "batch_size": encoder.batch_size,
              "encoder_params": count_params(encoder_params)}

    def ours_once():
        return history_lib.encode_texts(chosen, encoder, encoder.dim, progress=False)

    cli.echo(f"compiling and embedding {len(chosen)} texts...")
    our_vectors, our_first_s = _first_call(ours_once, warmup)
    ours_rss = peak_rss_mb()

    peer_once = None
    if peer == "torch":
        import torch

        from plug_jax import torch_peer

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        model = torch_peer.hf_bert(encoder_config, encoder_params).eval()
        peer_once = functools.partial(
            torch_peer.sentence_embeddings, model, bert.bert_tokenizer(encoder_dir), chosen,
            max_length=encoder.max_length, pooling=encoder_config.pooling,
            normalize=encoder_config.normalize, batch_size=encoder.batch_size)
        peer_vectors, peer_first_s = _first_call(peer_once, warmup)
    elif peer is not None:
        raise ValueError(f"peer {peer!r}: expected 'torch' or None")

    cli.echo(f"timing {steps} passes" + (" of each, alternating" if peer_once else ""))
    our_times, peer_times = _alternate(steps, ours_once, peer_once)

    result = {"benchmark": "embed", "machine": machine(), "shapes": shapes,
              "ours": {**_throughput(our_times, our_first_s, len(chosen), tokens),
                       "peak_rss_mb": ours_rss}}
    if peer_once is not None:
        result["peer"] = {"name": "torch",
                          **_throughput(peer_times, peer_first_s, len(chosen), tokens),
                          "peak_rss_mb": peak_rss_mb()}
        result["peer_over_ours"] = result["peer"]["step_s"] / result["ours"]["step_s"]
        result["max_cosine_distance"] = float(np.max(
            1 - np.sum(our_vectors * peer_vectors, axis=1), initial=0.0))
    return result


def format_embed(result: dict) -> str:
    shapes, ours, peer = result["shapes"], result["ours"], result.get("peer")
    rows = [("first call, s (ours: compile)", "first_call_s", "{:.2f}", 1),
            (f"all texts, s (median of {len(ours['step_times_s'])})", "step_s", "{:.4f}", 1),
            ("texts / s", "examples_per_s", "{:.1f}", 1),
            ("tokens / s", "tokens_per_s", "{:.0f}", 1),
            ("peak RSS, MiB (process so far)", "peak_rss_mb", "{:.0f}", 1)]
    lines = [f"embed: {shapes['texts']} history texts ({shapes['tokens']} tokens), encoder "
             f"{shapes['encoder']} ({shapes['encoder_params'] / 1e6:.1f}M), {shapes['pooling']} "
             f"pooling{', normalized' if shapes['normalize'] else ''}, at most "
             f"{shapes['max_length']} tokens, batch {shapes['batch_size']}",
             _machine_line(result["machine"]), ""]
    lines += _table(rows, ours, peer)
    if peer:
        lines.append(f"largest cosine distance from ours: {result['max_cosine_distance']:.2e}")
    return "\n".join(lines)


BENCHMARKS: dict[str, tuple[Callable[..., dict], Callable[[dict], str]]] = {
    "train": (train, format_train),
    "decode": (decode, format_decode),
    "embed": (embed, format_embed),
}


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise errors.UserError(f"usage: python -m plug_jax.bench {{{'|'.join(BENCHMARKS)}}} --config ...")
    # First-call times are compile times only without the persistent compilation cache.
    jax.config.update("jax_enable_compilation_cache", False)
    run_benchmark, format_result = BENCHMARKS[argv[1]]
    if not all(items.isdigit() and int(items) > 0 for items in HISTORY.value):
        raise errors.UserError(f"--history {','.join(HISTORY.value)}: expected item counts, "
                               "like 8,512")
    options = ({"texts": TEXTS.value} if argv[1] == "embed" else
               {"history": [int(items) for items in HISTORY.value], "variants": cli.VARIANTS.value}
               if argv[1] == "train" else {})
    result = run_benchmark(cli.CONFIG.value, cli.WORKDIR.value, steps=STEPS.value,
                           warmup=WARMUP.value, peer=PEER.value, **options)
    cli.echo(format_result(result))
    if cli.OUT.value:
        Path(cli.OUT.value).write_text(json.dumps(result, indent=2) + "\n")
        cli.echo(f"written to {cli.OUT.value}")


if __name__ == "__main__":
    cli.run(main, "config")
