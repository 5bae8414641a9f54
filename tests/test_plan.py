"""plug_jax.plan: ahead-of-time plans of the update step, from shapes alone.

The paper's configuration (Flan-T5-XXL + bge-base, batch 64) is planned by one run of the CLI for
v4-32 and v5e-16 (16 simulated CPU devices; one compile, which v5e-16 reuses), without its dropout:
the masks' Threefry quadruples XLA:CPU's compile of the XXL step and shards as the activations do.
(Another device count is another compile of the XXL step, a minute and a half: the 8-device
h100x8 target is planned, and searched, with the tiny configuration.) The tiny configuration,
with the paper's dropout, is planned and then compiled and run for real with the same shardings,
in a child process with 4 CPU devices (the device count is fixed once JAX starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plug_jax import plan

REPO = Path(__file__).resolve().parents[1]
PAPER_TARGETS = ("v4-32", "v5e-16")
MiB = 2**20


def run_module(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """python ARGS in the repository, which it can import from (installed or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """(plans by target, CLI output) for the paper's configuration on its default mesh."""
    out = tmp_path_factory.mktemp("plan") / "paper.json"
    result = run_module("-m", "plug_jax.plan", "--config", "configs/lamp3.py:paper",
                        "--config.llm.dropout=0", "--config.plug.dropout=0",
                        "--target", ",".join(PAPER_TARGETS), "--json", str(out), timeout=1500)
    return {p["target"]: p for p in json.loads(out.read_text())}, result.stdout


@pytest.mark.parametrize("target", PAPER_TARGETS)
def test_paper_plan_shards_the_llm(paper, target):
    plans, _ = paper
    p = plans[target]
    memory = p["memory"]
    for name in ("argument", "output", "temp", "alias", "total"):
        assert memory[name] > 0, name
    assert memory["total"] == (memory["argument"] + memory["output"] + memory["temp"]
                               + memory["generated_code"] - memory["alias"])
    assert p["flops_per_device"] > 0
    assert p["flops_total"] == p["flops_per_device"] * p["num_devices"]

    counts = p["param_counts"]
    assert 11.0e9 < counts["llm"] < 11.3e9  # Flan-T5-XXL
    assert 100e6 < counts["query_encoder"] < 120e6  # bge-base
    assert counts["trainable"] == counts["plug"]

    # LLM weights shard over fsdp x tensor (data replicates them): per device, the 22 GB of bf16
    # weights divide by that, give or take the replicated norms. The plug state (f32 params and
    # two AdamW moments) is partly replicated (the projectors' first layers), so bound it whole.
    mesh = p["mesh"]
    shards = mesh["fsdp"] * mesh["tensor"]
    assert mesh["data"] * shards == p["num_devices"]
    llm_bytes = 2 * counts["llm"]
    assert llm_bytes / shards <= p["llm_params_bytes_per_device"] <= 1.01 * llm_bytes / shards
    state_bytes = 4 * 3 * counts["plug"]
    assert p["state_bytes_per_device"] < state_bytes / 4
    bound = 1.01 * llm_bytes / shards + state_bytes + p["batch_bytes_per_device"]
    assert memory["argument"] <= bound
    assert memory["argument"] < llm_bytes / 6
    # The plan's argument bytes are the shards' sizes summed from the shardings alone.
    by_shardings = sum(p[f"{n}_bytes_per_device"] for n in ("state", "llm_params", "batch"))
    assert abs(memory["argument"] - by_shardings) <= 0.001 * by_shardings
    assert memory["alias"] == p["state_bytes_per_device"]  # the donated state is reused
    assert p["fits"] and p["headroom"] > 0.1


def test_v4_and_v5e_share_one_program(paper):
    plans, _ = paper
    assert plans["v4-32"]["memory"] == plans["v5e-16"]["memory"]
    assert plans["v4-32"]["hbm_bytes"] == 2 * plans["v5e-16"]["hbm_bytes"]
    assert plans["v5e-16"]["headroom"] < plans["v4-32"]["headroom"]


def test_cli_prints_plans_and_table(paper):
    _, stdout = paper
    assert stdout.count("memory per device:") == len(PAPER_TARGETS)
    assert "parameters: frozen LLM 11.135B" in stdout
    header = next(line for line in stdout.splitlines() if "headroom" in line and "mesh" in line)
    for column in ("target", "args", "temps", "total", "HBM", "TFLOP/dev", "compile s"):
        assert column in header
    rows = [line for line in stdout.splitlines() if line[2:].startswith(PAPER_TARGETS)]
    assert len(rows) == len(PAPER_TARGETS)
    assert "data=1,fsdp=16,tensor=1" in stdout
    assert "XLA CPU compiler" in stdout


def test_cli_search_marks_the_best_mesh():
    result = run_module("-m", "plug_jax.plan", "--config", "configs/lamp3.py:tiny",
                        "--target", "h100x8", "--batch", "16", "--search", timeout=600)
    lines = result.stdout.splitlines()
    rows = [line for line in lines if line[2:].startswith("h100x8")]
    assert len(rows) == len(plan.candidate_meshes(8)) == 6, result.stdout
    best = [line for line in rows if line.startswith("* ")]
    assert len(best) == 1 and rows[0] == best[0]
    assert sum("data=1,fsdp=8,tensor=1" in row for row in rows) == 1
    assert "best fitting mesh" in result.stdout and "memory per device in MiB" in result.stdout


# ---------------------------------------------------------------------------------------------
# The tiny config: plan vs a real compile, in a child process with 4 devices.

TINY_MESH = {"data": 2, "fsdp": 2, "tensor": 1}


def tiny_plan_and_real_compile(out: str) -> None:
    """Plans the tiny config, then builds its real arrays as train.py does, compiles, steps."""
    plan.use_cpu_devices(4)  # before JAX computes anything
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from plug_jax import cli, experiment, sharding, train

    config = cli.load_config("configs/lamp3.py:tiny")
    config.llm.dropout = config.plug.dropout = 0.1  # the paper's: masks drawn under the mesh
    target = plan.Target("cpu-4", 4, None, None, "4 CPU devices")
    planned = plan.plan(config, target, TINY_MESH)

    # Real parameters, the way train.run makes them.
    exp = experiment.build(config, Path(out).parent / "workdir", progress=False)
    llm, llm_params, embedder = exp.llm, exp.llm_params, exp.embedder
    params = exp.init_plug_params(jax.random.key(0))
    optimizer = train.make_optimizer(config.optim, config.optim.max_steps,
                                     config.plug.train_query_encoder)
    state = {"params": params, "opt": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    mesh = sharding.make_mesh(TINY_MESH, jax.devices()[:4])
    rules = [tuple(rule) for rule in config.axis_rules]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        setup = plan.build(config, mesh)
        # Zero tokens and features, every mask on: a real loss over every target slot.
        batch = {name: (np.ones if x.dtype == bool else np.zeros)(x.shape, x.dtype)
                 for name, x in setup.args[2].items()}
        real = (state, llm_params, batch)
        same_shapes = (jax.tree.structure(real) == jax.tree.structure(setup.args) and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(setup.args))))

        real = jax.device_put(real, setup.in_shardings)
        device = jax.devices()[0]
        actual_bytes = sum(shard.data.nbytes for x in jax.tree.leaves(real)
                           for shard in x.addressable_shards if shard.device == device)
        update = jax.jit(functools.partial(train.train_step, embedder=embedder, llm=llm,
                                           optimizer=optimizer,
                                           accum_steps=config.optim.grad_accum_steps),
                         in_shardings=setup.in_shardings, out_shardings=setup.out_shardings,
                         donate_argnums=(0,))
        compiled = update.lower(*real).compile()
        stats = compiled.memory_analysis()
        new_state, step_stats = compiled(*real)
        loss = float(step_stats["loss"])
        sharded = any(not x.sharding.is_fully_replicated
                      for x in jax.tree.leaves(new_state["params"]))

    Path(out).write_text(json.dumps({
        "planned": planned, "same_shapes": same_shapes, "actual_argument_bytes": actual_bytes,
        "real": {"argument": stats.argument_size_in_bytes, "output": stats.output_size_in_bytes,
                 "alias": stats.alias_size_in_bytes, "temp": stats.temp_size_in_bytes},
        "loss": loss, "state_stays_sharded": sharded,
    }))


def test_abstract_plug_params_move_nothing_to_a_device():
    """`plan --compiler tpu` builds on compile-only TPU devices, which hold no concrete array:
    the abstract plug must come from shapes alone, its random key too."""
    import jax

    from plug_jax import cli, experiment

    exp = experiment.build(cli.load_config("configs/lamp3.py:tiny"), abstract=True, splits=(),
                           progress=False)
    with jax.transfer_guard("disallow"):
        params, axes = exp.abstract_plug_params()
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
                              ).num_leaves == len(leaves)


def test_tiny_plan_agrees_with_a_real_compile(tmp_path):
    out = tmp_path / "tiny.json"
    run_module(__file__, "tiny", str(out), timeout=600)
    result = json.loads(out.read_text())
    planned, real = result["planned"], result["real"]
    assert result["same_shapes"], "the plan's abstract arguments differ from the real ones"
    assert planned["mesh"] == TINY_MESH and planned["num_devices"] == 4
    # Arguments, outputs and aliasing are fixed by the shardings: exact agreement.
    for name in ("argument", "output", "alias"):
        assert planned["memory"][name] == real[name], name
    assert planned["memory"]["argument"] == result["actual_argument_bytes"]
    # Temporaries depend on the schedule (the plan asks XLA:CPU for its memory-minimizing one).
    assert 0 < planned["memory"]["temp"] <= 2 * real["temp"] + MiB
    assert planned["flops_per_device"] > 0
    assert result["loss"] > 0 and result["state_stays_sharded"]


if __name__ == "__main__" and sys.argv[1:2] == ["tiny"]:  # the child of the last test
    tiny_plan_and_real_compile(sys.argv[2])
