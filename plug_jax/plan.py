"""Plans a training run on a pod ahead of time: memory per device, FLOPs and fit, from shapes alone.

  python -m plug_jax.plan --config configs/lamp3.py:paper --target v4-32
  python -m plug_jax.plan --config configs/lamp3.py:paper --target v5e-16 --mesh data=2,fsdp=8
  python -m plug_jax.plan --config configs/lamp3.py:paper --target v4-32,v5e-16,h100x8 --search

The update step of plug_jax.train (`train_step`: plug forward, frozen-LLM loss, gradient, AdamW) is
lowered and compiled from abstract arrays (jax.ShapeDtypeStruct carrying their shardings), as
MaxText's train_compile.py does: no weights or data are read and nothing is allocated. A target's
chips are simulated by as many host CPU devices; the program is partitioned by the same SPMD
partitioner jit uses on a TPU or GPU, so per-device argument sizes are exact, while temporaries,
FLOPs and collectives are what the XLA *CPU* compiler makes of it: an estimate of the TPU/GPU
layout, not a measurement. With libtpu importable, `--compiler tpu` compiles for the TPU targets
with the TPU compiler itself (compile-only devices, no TPU needed): their real figures, slower.

Python: `plan(config, "v4-32")` -> dict; `search(config, "v4-32")` -> list of dicts, best first.
Both need the target's device count to exist in this process (`use_cpu_devices(n)` right after
importing jax, before anything runs); the CLI does that itself.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from plug_jax import cli, errors, experiment, llm as llm_lib, sharding
from plug_jax.data import pipeline

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    num_devices: int            # JAX devices in the slice; 0 = the host's CPU devices
    hbm_bytes: float | None     # memory per device
    peak_flops: float | None    # dense bf16 FLOP/s per device: bounds the step time from below
    description: str
    # For --compiler tpu: (topology, chip config, chips per host), as libtpu names them.
    tpu_topology: tuple[str, str, tuple[int, int, int]] | None = None


# One JAX device per chip: a v4 chip's two TensorCores act as one device (megacore).
TARGETS = {
    "v4-32": Target("v4-32", 16, 32 * GiB, 275e12, "Cloud TPU v4-32: 16 chips, 32 GiB HBM each",
                    ("v4:2x2x4", "megacore", (2, 2, 1))),
    "v5e-16": Target("v5e-16", 16, 16 * GiB, 197e12, "Cloud TPU v5e-16: 16 chips, 16 GiB HBM each",
                     ("v5e:4x4", "default", (2, 2, 1))),
    # 81559 MiB is what nvidia-smi reports for an H100 80GB.
    "h100x8": Target("h100x8", 8, 81559 * 2**20, 989e12, "8 x NVIDIA H100 80GB (SXM)"),
    "cpu": Target("cpu", 0, None, None, "this host's CPU devices, sharing its memory"),
}

CAVEATS = {
    "cpu": ("Estimates: the XLA CPU compiler's SPMD partitioning of the same program, standing in "
            "for the TPU/GPU compiler. Parameter, optimizer-state and batch bytes per device are "
            "exact; temporaries, FLOPs and collectives follow the CPU backend's fusion, scheduling "
            "and precision (it gathers and multiplies bf16 weights in f32, which overstates "
            "temporaries and traffic). Leave >= 10% headroom; --compiler tpu gives TPU figures."),
    "tpu": ("TPU compiler (libtpu, compile-only devices): the memory and FLOPs XLA:TPU plans for "
            "this program; the runtime adds a little on top. Leave >= 5% headroom."),
}

# ---------------------------------------------------------------------------------------------
# Devices. The CPU device count is fixed when JAX's backends start, so set it first.


def use_cpu_devices(count: int) -> None:
    """Gives this process `count` CPU devices; call before any JAX computation."""
    if jax.config.jax_num_cpu_devices != count:
        jax.config.update("jax_num_cpu_devices", count)


def target_devices(target: Target, compiler: str = "cpu") -> list[jax.Device]:
    """The devices to compile for: host CPU devices, or libtpu's compile-only TPU devices."""
    if compiler == "tpu":
        return _tpu_devices(target)
    if compiler != "cpu":
        raise ValueError(f"compiler {compiler!r} is not 'cpu' or 'tpu'")
    devices = jax.devices("cpu")
    if target.num_devices == 0:
        return devices
    if len(devices) < target.num_devices:
        raise RuntimeError(
            f"target {target.name} needs {target.num_devices} devices, this process has "
            f"{len(devices)} CPU devices: call plug_jax.plan.use_cpu_devices({target.num_devices}) "
            "right after importing jax, or run python -m plug_jax.plan")
    return devices[:target.num_devices]


@functools.cache
def _tpu_devices(target: Target) -> list[jax.Device]:
    if target.tpu_topology is None:
        raise ValueError(f"--compiler tpu: target {target.name} is not a TPU slice")
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError("--compiler tpu needs libtpu (the version jax[tpu] pins); install it "
                           "apart and put it on PYTHONPATH for planning only: pip install --target "
                           "DIR --no-deps 'libtpu==0.0.42.*'")
    from jax.experimental import topologies
    name, chip_config, host_bounds = target.tpu_topology
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu",
                                            chip_config_name=chip_config,
                                            chips_per_host_bounds=host_bounds, num_slices=1)
    return list(topology.devices)


def get_target(target: str | Target) -> Target:
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise errors.ConfigError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return TARGETS[target]


# ---------------------------------------------------------------------------------------------
# Abstract arguments of train_step.


def abstract_batch(config: ml_collections.ConfigDict, llm: llm_lib.FrozenLM,
                   history_width: int, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch at its largest, dtypes as the pipeline makes them.

    T5's encoder takes max_input_tokens ids; a decoder-only LLM the chat prompt with
    max_input_tokens of text, then the answer span, rounded up as pipeline.round_up does.
    """
    data = config.data
    spec = lambda shape, dtype: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
    batch = {
        "query_tokens": spec((data.max_query_tokens,), jnp.int32),
        "query_mask": spec((data.max_query_tokens,), bool),
        "history": spec((data.max_history, history_width), jnp.float32),
        "history_mask": spec((data.max_history,), bool),
    }
    if isinstance(llm, llm_lib.EncoderDecoderLM):
        length = data.max_input_tokens
        batch.update(targets=spec((data.max_target_tokens,), jnp.int32),
                     target_mask=spec((data.max_target_tokens,), bool))
    else:
        overhead = len(llm._prompt_ids("", 0))  # chat header and generation prompt
        span = data.max_target_tokens + 1
        length = pipeline.round_up(overhead + data.max_input_tokens + span)
        batch.update(targets=spec((span,), jnp.int32), target_mask=spec((span,), bool),
                     target_positions=spec((span,), jnp.int32))
    batch.update(tokens=spec((length,), jnp.int32), mask=spec((length,), bool))
    return batch


@dataclasses.dataclass
class Setup:
    """Everything train_step takes, abstract, with shardings over one mesh."""

    step_fn: Any
    args: tuple            # (state, llm_params, batch) of ShapeDtypeStructs
    in_shardings: tuple
    out_shardings: tuple
    param_counts: dict[str, int]


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """train_step with the plug state, LLM params and batch abstract and sharded over `mesh`."""
    from plug_jax import train  # its top level pulls in tensorboard etc.: only when planning

    rules = [tuple(rule) for rule in config.axis_rules]
    exp = experiment.build(config, abstract=True)
    plug_params, plug_axes = exp.abstract_plug_params()
    total_steps = config.optim.max_steps or 1000  # shapes do not depend on the schedule
    optimizer = train.make_optimizer(config.optim, total_steps, config.plug.train_query_encoder)
    state = {"params": plug_params, "opt": jax.eval_shape(optimizer.init, plug_params),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    batch = abstract_batch(config, exp.llm, exp.encoder_config.hidden_size,
                           config.optim.batch_size)

    state_shardings = sharding.train_state_shardings(state["opt"], plug_params, plug_axes, mesh,
                                                     rules)
    batch_shardings = {name: sharding.batch_sharding(mesh, rules, len(x.shape))
                       for name, x in batch.items()}
    step_fn = functools.partial(train.train_step, embedder=exp.embedder, llm=exp.llm,
                                optimizer=optimizer, accum_steps=config.optim.grad_accum_steps)
    count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    counts = {"llm": count(exp.llm_params), "plug": count(plug_params),
              "query_encoder": count(plug_params.get("query_encoder", {}))}
    # The LLM never trains; the query encoder may be frozen (then it has no optimizer state).
    counts["trainable"] = counts["plug"] - (0 if config.plug.train_query_encoder
                                            else counts["query_encoder"])
    return Setup(step_fn=step_fn, args=(state, exp.llm_params, batch),
                 in_shardings=(state_shardings, exp.llm_shardings(mesh), batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 param_counts=counts)


# ---------------------------------------------------------------------------------------------
# Compiling and reading the compiled program.

_COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-done)?\(")
_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16|f8e\w+)\[([\d,]*)\]")


def _array_bytes(type_text: str) -> int:
    """Bytes of the arrays in an HLO type: 'bf16[4096,640]{1,0}', or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        bits = 8 if dtype == "pred" or dtype.startswith("f8") else int(dtype.lstrip("bsufc"))
        total += bits // 8 * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each collective of the per-device program produces, summed per kind.

    A coarse communication measure: it counts each op once (a loop body once) and ignores the
    topology; -start/-done pairs count at -done.
    """
    totals: dict[str, int] = collections.defaultdict(int)
    for line in hlo_text.splitlines():
        if "-start(" in line:
            continue
        match = _COLLECTIVE.search(line)
        if match:
            totals[match["op"]] += _array_bytes(match["type"])
    return dict(totals)


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return cost or {}


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes of the largest shard of each array (shards are equal unless a dimension is uneven)."""
    return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


# XLA:CPU's default scheduler favours concurrency and starts every weight all-gather up front, so
# all of the gathered LLM is live at once (85 GiB per device for the paper's config on v4-32); the
# memory-minimizing one keeps them near their use, as the TPU/GPU schedulers do (7.8 GiB).
_CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

_COMPILED: dict[tuple, dict] = {}  # same program, mesh and devices -> same figures (v4-32, v5e-16)


def compile_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                 mesh_config: Mapping[str, int]) -> dict:
    """Lowers and compiles train_step for `mesh_config` over `devices`; the raw figures."""
    shape = sharding.mesh_shape(mesh_config, len(devices))
    platform = devices[0].platform
    key = (config.to_json_best_effort(sort_keys=True), shape, platform,
           tuple(d.id for d in devices))
    if key in _COMPILED:
        return _COMPILED[key]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices)
    rules = [tuple(rule) for rule in config.axis_rules]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = build(config, mesh)
        args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            setup.args, setup.in_shardings)
        update = jax.jit(setup.step_fn, in_shardings=setup.in_shardings,
                         out_shardings=setup.out_shardings, donate_argnums=(0,))
        tick = time.perf_counter()
        lowered = update.lower(*args)
        lower_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        compiled = lowered.compile(
            compiler_options=_CPU_COMPILER_OPTIONS if platform == "cpu" else None)
        compile_seconds = time.perf_counter() - tick

    stats = compiled.memory_analysis()
    memory = {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "generated_code": stats.generated_code_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
    }
    # Donated state is both argument and output: count it once.
    memory["total"] = (memory["argument"] + memory["output"] + memory["temp"]
                       + memory["generated_code"] - memory["alias"])
    cost = _cost(compiled)
    collectives = collective_bytes(compiled.as_text())
    result = {
        "mesh": dict(zip(sharding.MESH_AXES, shape)),
        "compiler": platform,
        "memory": memory,
        "flops_per_device": float(cost.get("flops", 0.0)),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "collective_bytes_per_device": sum(collectives.values()),
        "collectives": collectives,
        "param_counts": setup.param_counts,
        "lower_seconds": lower_seconds,
        "compile_seconds": compile_seconds,
    }
    # What the arguments hold, per device, from their shardings alone (a check on "argument").
    for name, tree, shardings in zip(("state", "llm_params", "batch"), setup.args,
                                     setup.in_shardings):
        result[f"{name}_bytes_per_device"] = bytes_per_device(tree, shardings)
    _COMPILED[key] = result
    return result


def plan(config: ml_collections.ConfigDict, target: str | Target = "cpu",
         mesh: Mapping[str, int] | None = None, compiler: str = "cpu") -> dict:
    """Compiles one update step for `target` (over `mesh`, default config.mesh) and sizes it.

    Returns per-device memory in bytes (argument, output, temp, generated_code, alias, total),
    FLOPs per device and in all, collective traffic, parameter counts, whether it fits the
    target's memory and the headroom left, compile times, and what the figures are worth.
    compiler: 'cpu' (simulated devices, an estimate) or 'tpu' (libtpu, TPU targets only).
    """
    target = get_target(target)
    devices = target_devices(target, compiler)
    mesh_config = dict(mesh if mesh is not None else config.mesh)
    figures = compile_step(config, devices, mesh_config)
    result = {
        "target": target.name,
        "description": target.description,
        "num_devices": len(devices),
        "batch_size": config.optim.batch_size,
        "accum_steps": config.optim.grad_accum_steps,
        "llm": config.llm.path,
        "encoder": config.encoder.path,
        **figures,
        "flops_total": figures["flops_per_device"] * len(devices),
        "caveat": CAVEATS[compiler],
    }
    hbm = target.hbm_bytes
    if target.name == "cpu":  # host devices share the machine's memory
        hbm = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)
    result["hbm_bytes"] = hbm
    result["fits"] = figures["memory"]["total"] <= hbm if hbm else None
    result["headroom"] = 1.0 - figures["memory"]["total"] / hbm if hbm else None
    result["min_step_seconds"] = (figures["flops_per_device"] / target.peak_flops
                                  if target.peak_flops else None)
    return result


def candidate_meshes(num_devices: int) -> list[dict[str, int]]:
    """FSDP first, then part of it turned into data or tensor parallelism."""
    meshes = [{"data": 1, "fsdp": num_devices, "tensor": 1}]
    for data, tensor in ((2, 1), (4, 1), (1, 2), (2, 2), (1, 4)):
        if num_devices % (data * tensor) == 0 and data * tensor < num_devices:
            meshes.append({"data": data, "fsdp": num_devices // (data * tensor), "tensor": tensor})
    return meshes


def search(config: ml_collections.ConfigDict, target: str | Target,
           meshes: Sequence[Mapping[str, int]] | None = None, compiler: str = "cpu") -> list[dict]:
    """Plans every mesh; the list is sorted best first and the best has 'best': True.

    Best: the one that fits with the most headroom, which is what these figures measure well.
    Speed is another matter: the table's FLOPs and collective traffic per device inform it, but
    the CPU compiler's are rough (tensor parallelism costs FLOPs it does not show). A mesh that
    cannot partition the program (a dimension not divisible by its axis) comes last, with 'error'.
    """
    target = get_target(target)
    meshes = meshes or candidate_meshes(len(target_devices(target, compiler)))
    plans = []
    for mesh in meshes:
        try:
            plans.append(plan(config, target, mesh, compiler))
        except ValueError as e:  # e.g. an axis that does not divide a parameter or the batch
            plans.append({"target": target.name, "mesh": dict(mesh),
                          "error": str(e).split("\n")[0]})
    rank = lambda p: ("error" in p, not p.get("fits", False), -(p.get("headroom") or 0),
                      p.get("collective_bytes_per_device", 0))
    plans.sort(key=rank)
    if plans and plans[0].get("fits"):
        plans[0]["best"] = True
    return plans


# ---------------------------------------------------------------------------------------------
# Printing.


def _size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= 0.1 * GiB else f"{value / 2**20:.1f} MiB"


def _mesh_text(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{axis}={mesh[axis]}" for axis in sharding.MESH_AXES)


def format_plan(result: dict) -> str:
    memory, counts = result["memory"], result["param_counts"]
    lines = [
        f"target {result['target']} ({result['description']}), {result['num_devices']} devices, "
        f"mesh {_mesh_text(result['mesh'])}",
        f"LLM {result['llm']}, encoder {result['encoder']}, batch {result['batch_size']} "
        f"({result['accum_steps']} microbatch{'es' if result['accum_steps'] > 1 else ''})",
        f"parameters: frozen LLM {counts['llm'] / 1e9:.3f}B, plug {counts['plug'] / 1e6:.1f}M "
        f"(query encoder {counts['query_encoder'] / 1e6:.1f}M), "
        f"trainable {counts['trainable'] / 1e6:.1f}M",
        "memory per device:",
        f"  arguments       {_size(memory['argument']):>12}   "
        f"(plug state {_size(result['state_bytes_per_device'])}, "
        f"LLM {_size(result['llm_params_bytes_per_device'])}, "
        f"batch {_size(result['batch_bytes_per_device'])})",
        f"  outputs         {_size(memory['output']):>12}",
        f"  temporaries     {_size(memory['temp']):>12}",
        f"  generated code  {_size(memory['generated_code']):>12}",
        f"  aliased         {_size(memory['alias']):>12}   (donated state, counted once)",
        f"  total           {_size(memory['total']):>12}",
    ]
    if result["hbm_bytes"]:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {_size(result['hbm_bytes'])} per device: headroom "
                     f"{100 * result['headroom']:.1f}%")
    lines.append(f"FLOPs per step: {result['flops_per_device'] / 1e12:.2f} TFLOP per device, "
                 f"{result['flops_total'] / 1e12:.1f} TFLOP over {result['num_devices']} devices "
                 "(XLA cost analysis of the per-device program; replicated work counts on each)")
    if result["min_step_seconds"]:
        lines.append(f"step time >= {result['min_step_seconds'] * 1e3:.0f} ms at peak bf16 FLOP/s "
                     "(a bound: real MFU is lower)")
    kinds = ", ".join(f"{kind} {size / GiB:.2f}"
                      for kind, size in sorted(result["collectives"].items()))
    lines.append(f"collectives per device: {result['collective_bytes_per_device'] / GiB:.2f} GiB "
                 f"({kinds or 'none'})")
    lines.append(f"lowered in {result['lower_seconds']:.1f} s, compiled by XLA:"
                 f"{result['compiler'].upper()} in {result['compile_seconds']:.1f} s")
    return "\n".join(lines)


def format_table(plans: Sequence[dict]) -> str:
    sized = [p for p in plans if "memory" in p]
    small = sized and max(p["memory"]["total"] for p in sized) < GiB
    unit, scale = ("MiB", 2**20) if small else ("GiB", GiB)
    header = (f"{'':2}{'target':8} {'mesh':24} {'args':>8} {'temps':>8} {'total':>8} {'HBM':>8} "
              f"{'headroom':>9} {'TFLOP/dev':>10} {'comm GiB':>9} {'compile s':>10}")
    lines = [header, "-" * len(header)]
    for p in plans:
        mark = "* " if p.get("best") else "  "
        if "error" in p:
            lines.append(f"{mark}{p['target']:8} {_mesh_text(p['mesh']):24} cannot partition: "
                         f"{p['error'][:70]}")
            continue
        m = p["memory"]
        hbm = f"{p['hbm_bytes'] / scale:.1f}" if p["hbm_bytes"] else "-"
        headroom = f"{100 * p['headroom']:.1f}%" if p["headroom"] is not None else "-"
        if p.get("fits") is False:
            headroom += " X"
        lines.append(
            f"{mark}{p['target']:8} {_mesh_text(p['mesh']):24} {m['argument'] / scale:8.2f} "
            f"{m['temp'] / scale:8.2f} {m['total'] / scale:8.2f} {hbm:>8} {headroom:>9} "
            f"{p['flops_per_device'] / 1e12:10.2f} {p['collective_bytes_per_device'] / GiB:9.2f} "
            f"{p['compile_seconds']:10.1f}")
    lines.append(f"memory per device in {unit}; comm: bytes out of collectives per device and "
                 "step; * best fitting mesh (most headroom); X does not fit")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_mesh(text: str) -> dict[str, int]:
    mesh = {}
    for item in filter(None, text.split(",")):
        axis, _, size = item.partition("=")
        if axis not in sharding.MESH_AXES or not size.lstrip("-").isdigit():
            raise errors.UserError(f"--mesh: {item!r} is not AXIS=SIZE with AXIS in {sharding.MESH_AXES}")
        mesh[axis] = int(size)
    return mesh


TARGET = flags.DEFINE_list("target", ["v4-32"], f"Targets, from {', '.join(TARGETS)}.")
MESH = flags.DEFINE_string("mesh", "", "data=1,fsdp=16,tensor=1 (default: config.mesh).")
BATCH = flags.DEFINE_integer("batch", 0, "Global batch (default: the config's).")
SEARCH = flags.DEFINE_bool("search", False, "Try several meshes per target; mark the best.")
COMPILER = flags.DEFINE_enum("compiler", "cpu", ["cpu", "tpu"],
                             "cpu: simulated devices; tpu: libtpu, for TPU targets.")
JSON = flags.DEFINE_string("json", "", "Also write the results to this file.")


def main(argv: Sequence[str]) -> list[dict]:
    del argv
    targets = [get_target(name) for name in TARGET.value]
    if COMPILER.value == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server to ask here
    else:  # before JAX starts its backends: enough CPU devices for the largest target
        needed = max((t.num_devices for t in targets), default=0)
        if needed:
            use_cpu_devices(needed)

    config = cli.CONFIG.value
    if BATCH.value:
        config.optim.batch_size = BATCH.value
    mesh = _parse_mesh(MESH.value) if MESH.value else None

    results = []
    for target in targets:
        if SEARCH.value:
            plans = search(config, target, compiler=COMPILER.value)
            results.extend(plans)
            best = next((p for p in plans if p.get("best")), None)
            if best:
                print(format_plan(best), end="\n\n")
        else:
            result = plan(config, target, mesh, COMPILER.value)
            results.append(result)
            print(format_plan(result), end="\n\n")
    print(format_table(results))
    print(CAVEATS[COMPILER.value])
    if JSON.value:
        Path(JSON.value).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    cli.run(main, "config")
