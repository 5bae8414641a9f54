"""Training checkpoints, preemption and plug export, on tiny pytrees and a tiny embedder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from plug_jax import checkpoint, export, plug
from plug_jax.models import bert
from plug_jax.models.layers import unboxed

REPO = Path(__file__).resolve().parents[1]


def _tree_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(leaves_a, leaves_b))


def _optimizer():
    """Like the trainer's: clipping, then AdamW per parameter group (masked states inside)."""
    groups = {"encoder": {"w": "slow"}, "head": {"w": "fast", "b": "fast"}}
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.multi_transform({"fast": optax.adamw(1e-2), "slow": optax.adamw(1e-4)},
                                             groups))


def _state(seed: int = 0, steps: int = 2):
    """A train state whose optimizer moments are non-zero."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"encoder": {"w": jax.random.normal(keys[0], (8, 4))},
              "head": {"w": jax.random.normal(keys[1], (4, 6)), "b": jnp.zeros((6,))}}
    optimizer = _optimizer()
    opt = optimizer.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
        updates, opt = optimizer.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    return {"params": params, "opt": opt, "step": jnp.asarray(steps, jnp.int32)}


def _run(script: str, tmp_path: Path, *, devices: int = 1, **popen) -> subprocess.Popen:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, str(path)], cwd=REPO, env=env, text=True, **popen)


# --------------------------------------------------------------------- TrainCheckpointer

@pytest.mark.parametrize("data_state", [{"next_index": 17, "epoch": [1, "a"]}, b"\x00grain\xff",
                                        None])
def test_round_trip(tmp_path, data_state):
    state, rng = _state(), jax.random.fold_in(jax.random.key(42), 3)
    with checkpoint.TrainCheckpointer(tmp_path, save_every=5) as saver:
        assert saver.restore_latest(checkpoint.abstract_of(state), rng) is None
        abstract = checkpoint.abstract_of(state)
        assert saver.save(5, state, rng=rng, data_state=data_state)
        # save returns once arrays are off the devices: the trainer may donate them right away
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        saver.wait()
    with checkpoint.TrainCheckpointer(tmp_path, save_every=5) as loader:  # a fresh process's view
        restored, restored_rng, restored_data, step = loader.restore_latest(abstract, rng)
    assert step == 5 and restored_data == data_state
    assert _tree_equal(restored, _state())
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    assert jax.dtypes.issubdtype(restored_rng.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))
    assert np.array_equal(jax.random.normal(restored_rng, (3,)), jax.random.normal(rng, (3,)))


def test_raw_uint32_key_round_trips(tmp_path):
    state, rng = _state(), jax.random.PRNGKey(3)
    with checkpoint.TrainCheckpointer(tmp_path, save_every=1) as saver:
        saver.save(1, state, rng=rng)
        _, restored_rng, _, _ = saver.restore_latest(checkpoint.abstract_of(state), rng)
    assert restored_rng.dtype == jnp.uint32 and np.array_equal(restored_rng, rng)


def test_every_n_keep_n_and_force(tmp_path):
    state, rng = _state(), jax.random.key(0)
    with checkpoint.TrainCheckpointer(tmp_path, save_every=3, max_to_keep=2) as saver:
        saved = [step for step in range(1, 11) if saver.save(step, state, rng=rng)]
        assert saved == [3, 6, 9]
        assert saver.save(10, state, rng=rng, force=True)          # e.g. on SIGTERM
        assert not saver.save(10, state, rng=rng, force=True)      # the final save, same step
        saver.wait()
        assert saver.all_steps() == [9, 10] and saver.latest_step() == 10
    assert checkpoint.checkpoint_steps(tmp_path) == [9, 10]


def test_from_config(tmp_path):
    config = common.lamp_config("LaMP_3", "tiny")
    config.checkpoint = dict(save_every=4, max_to_keep=1, async_save=False)
    with checkpoint.TrainCheckpointer.from_config(tmp_path, config) as saver:
        for step in range(1, 10):
            saver.save(step, _state(), rng=jax.random.key(0))
        assert saver.all_steps() == [8]


def test_restore_into_mesh_shardings(tmp_path):
    """Saved on one device, restored onto a 1-device mesh: each array gets its target sharding."""
    state, rng = _state(), jax.random.key(1)
    with checkpoint.TrainCheckpointer(tmp_path, save_every=1) as saver:
        saver.save(1, state, rng=rng)
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = NamedSharding(mesh, P("fsdp"))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=sharded if x.ndim else NamedSharding(mesh, P())),
        checkpoint.abstract_of(state))
    abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, P()))
    with checkpoint.TrainCheckpointer(tmp_path) as loader:
        restored, restored_rng, _, _ = loader.restore_latest(abstract, abstract_rng)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert leaf.sharding == target.sharding
    assert restored_rng.sharding == abstract_rng.sharding
    assert _tree_equal(restored, state)


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
from plug_jax import checkpoint

assert jax.device_count() == 4
workdir = {workdir!r}
mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,))
on = lambda spec: NamedSharding(mesh, spec)
params = {{"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), on(P("fsdp"))),
          "v": jax.device_put(jnp.arange(12.0).reshape(3, 4), on(P(None, "fsdp")))}}
optimizer = optax.adamw(1e-2)
opt = optimizer.init(params)
updates, opt = optimizer.update(jax.tree.map(jnp.ones_like, params), opt, params)
state = {{"params": optax.apply_updates(params, updates), "opt": opt,
         "step": jax.device_put(jnp.int32(7), on(P()))}}
rng = jax.device_put(jax.random.key(5), on(P()))
with checkpoint.TrainCheckpointer(workdir, save_every=7) as saver:
    assert saver.save(7, state, rng=rng, data_state={{"next_index": 9}})

# Restore onto the same mesh, and onto another one (2 x 2, sharded the other way).
other = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
def resharded(x):
    spec = P() if x.ndim == 0 else P("fsdp", "data") if x.shape[0] % 2 == 0 else P(None, "fsdp")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, spec))
same = checkpoint.abstract_of(state)
for abstract in (same, jax.tree.map(resharded, same)):
    with checkpoint.TrainCheckpointer(workdir) as loader:
        restored, restored_rng, data, step = loader.restore_latest(abstract,
                                                                   checkpoint.abstract_of(rng))
    assert step == 7 and data == {{"next_index": 9}}
    for leaf, target, original in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract),
                                      jax.tree.leaves(state)):
        assert leaf.sharding == target.sharding, (leaf.sharding, target.sharding)
        assert np.array_equal(np.asarray(leaf), np.asarray(original))
    assert restored_rng.sharding == rng.sharding
    assert np.array_equal(jax.random.key_data(restored_rng), jax.random.key_data(rng))
shards = restored["params"]["w"].addressable_shards
assert len(shards) == 4 and shards[0].data.shape == (4, 2), [s.data.shape for s in shards]

# Export gathers the sharded params into one host copy.
checkpoint.export_plug(workdir + "/plug", state["params"], {{"embedder": {{}}}})
import orbax.checkpoint as ocp
with ocp.StandardCheckpointer() as reader:
    host = reader.restore(workdir + "/plug/params")
assert np.array_equal(host["w"], np.asarray(state["params"]["w"]))
print("MESH OK")
"""


def test_restore_into_4_device_mesh(tmp_path):
    process = _run(MESH_SCRIPT.format(workdir=str(tmp_path)), tmp_path, devices=4,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0 and "MESH OK" in output, output[-4000:]


# --------------------------------------------------------------------- PreemptionGuard

def test_guard_sets_a_flag_and_restores_handlers():
    previous_term, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with checkpoint.PreemptionGuard(sigint=True) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the guard
        assert guard.received == signal.SIGTERM
        assert guard.should_stop(2) and guard.stop_step == 2 and guard.should_stop(3)
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert signal.getsignal(signal.SIGINT) is previous_int


def test_second_sigint_interrupts():
    with checkpoint.PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


PREEMPTED_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp
from plug_jax import checkpoint

state = {{"params": {{"w": jnp.zeros((4,))}}, "step": jnp.int32(0)}}
rng = jax.random.key(0)
with checkpoint.TrainCheckpointer({workdir!r}, save_every=0) as saver, \\
        checkpoint.PreemptionGuard() as guard:
    step = 0
    while True:
        step += 1
        state = {{"params": {{"w": state["params"]["w"] + 1.0}}, "step": state["step"] + 1}}
        rng, _ = jax.random.split(rng)
        if step == 3:
            print("ready", flush=True)
        if guard.should_stop(step):
            saver.save(step, state, rng=rng, data_state={{"step": step}}, force=True)
            saver.wait()
            print(f"stopped at step {{step}}", flush=True)
            break
        saver.save(step, state, rng=rng, data_state={{"step": step}})
        time.sleep(0.02)
sys.exit(0)
"""


def test_sigterm_saves_and_exits_zero(tmp_path):
    process = _run(PREEMPTED_SCRIPT.format(workdir=str(tmp_path)), tmp_path,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in process.stdout:
            if line.strip() == "ready":
                break
        process.send_signal(signal.SIGTERM)
        output, errors = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, errors[-4000:]
    stopped = int(output.split("stopped at step ")[1].split()[0])
    assert stopped >= 3 and "SIGTERM" in errors
    assert checkpoint.checkpoint_steps(tmp_path) == [stopped]
    abstract = {"params": {"w": jax.ShapeDtypeStruct((4,), jnp.float32)},
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with checkpoint.TrainCheckpointer(tmp_path) as loader:
        state, _, data_state, step = loader.restore_latest(abstract, jax.random.key(0))
    assert step == stopped and int(state["step"]) == stopped and data_state == {"step": stopped}
    assert np.array_equal(state["params"]["w"], np.full((4,), float(stopped)))


MULTIPROCESS_WORKER = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, port, service, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
jax.config.update("jax_enable_preemption_service", service)
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
import jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from plug_jax import checkpoint

mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
replicated = NamedSharding(mesh, P())
shardings = {"params": {"w": NamedSharding(mesh, P("fsdp"))}, "step": replicated}
state = jax.jit(lambda: {"params": {"w": jnp.zeros((8,))}, "step": jnp.int32(0)},
                out_shardings=shardings)()
rng = jax.jit(lambda: jax.random.key(0), out_shardings=replicated)()
add = jax.jit(lambda s: {"params": {"w": s["params"]["w"] + 1}, "step": s["step"] + 1})
with checkpoint.TrainCheckpointer(workdir, save_every=0) as saver, \\
        checkpoint.PreemptionGuard() as guard:
    restored = saver.restore_latest(checkpoint.abstract_of(state), checkpoint.abstract_of(rng))
    step = 0
    if restored is not None:
        state, rng, data_state, step = restored
        assert data_state == {"process": process, "step": step}, data_state
        assert int(state["step"]) == step and state["params"]["w"].sharding.spec == P("fsdp")
        print(f"resumed at step {step}", flush=True)
    start = step
    while step < start + 500:
        step += 1
        state = add(state)
        if step == start + 3:
            print("ready", flush=True)
        if guard.should_stop(step):
            saver.save(step, state, rng=rng, data_state={"process": process, "step": step},
                       force=True)
            saver.wait()
            print(f"stopped at step {step}", flush=True)
            break
        time.sleep(0.03 * (process + 1))  # the processes run at different speeds
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("service", [False, True], ids=["allgather", "preemption_service"])
def test_two_processes_stop_at_the_same_step(tmp_path, service):
    """SIGTERM to one of two processes: both save the same step, exit 0, and resume from it."""
    worker = tmp_path / "worker.py"
    worker.write_text(MULTIPROCESS_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    previous = None
    for _ in range(2):  # the second round resumes from the first one's checkpoint
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            port = probe.getsockname()[1]
        processes = [subprocess.Popen([sys.executable, str(worker), str(index), str(port),
                                       str(int(service)), str(tmp_path / "run")],
                                      cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE) for index in range(2)]
        try:
            seen = ""
            for line in processes[1].stdout:
                seen += line
                if line.strip() == "ready":
                    break
            processes[1].send_signal(signal.SIGTERM)  # the other process hears of it from this one
            results = [process.communicate(timeout=120) for process in processes]
        finally:
            for process in processes:
                process.kill()
        for process, (_, errors) in zip(processes, results):
            assert process.returncode == 0, errors[-4000:]
        outputs = [results[0][0], seen + results[1][0]]
        stopped = {int(output.split("stopped at step ")[1].split()[0]) for output in outputs}
        assert len(stopped) == 1, outputs
        if previous is not None:
            assert all(f"resumed at step {previous}" in output for output in outputs), outputs
        previous = stopped.pop()
        assert previous in checkpoint.checkpoint_steps(tmp_path / "run")


# --------------------------------------------------------------------- export

def _tiny_embedder() -> plug.UserEmbedder:
    return plug.UserEmbedder(encoder_config=bert.BertConfig.tiny("cls"), llm_width=24,
                             soft_token_rms=0.7, projector_hidden=16)


def _embedder_inputs(width: int):
    keys = jax.random.split(jax.random.key(9), 2)
    tokens = jax.random.randint(keys[0], (3, 6), 1, 100)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], bool)
    history = jax.random.normal(keys[1], (3, 5, width))
    history_mask = jnp.array([[1] * 5, [1] * 2 + [0] * 3, [0] * 5], bool)
    return tokens, mask, history, history_mask


def _tiny_plug(seed: int = 0):
    embedder = _tiny_embedder()
    inputs = _embedder_inputs(embedder.encoder_config.hidden_size)
    variables = jax.jit(embedder.init)(jax.random.key(seed), *inputs)
    # Boxed (logical axis names), as the trainer's params are.
    params = jax.jit(lambda tree: jax.tree.map(lambda x: x + 0.01, tree))(dict(variables["params"]))
    assert isinstance(params["instruction"], nn.meta.AxisMetadata)
    config = common.lamp_config("LaMP_3", "tiny")
    return embedder, params, checkpoint.make_plug_config(embedder, config, llm_family="llama",
                                                         step=12)


def test_export_round_trip(tmp_path):
    embedder, params, plug_config = _tiny_plug()
    path = checkpoint.export_plug(tmp_path / "plug", params, plug_config)
    loaded_config, loaded = checkpoint.load_exported_plug(path)

    assert _tree_equal(loaded, unboxed(params))  # exports hold plain arrays
    assert loaded_config["step"] == 12 and loaded_config["task"] == "LaMP_3"
    assert loaded_config["llm"] == {"path": "tiny-llama", "family": "llama", "dtype": "float32",
                                    "soft_token_position": "after_chat_header"}
    assert loaded_config["encoder"]["pooling"] == "cls"
    assert loaded_config["plug_jax_version"] == checkpoint.plug_jax_version() != "unknown"
    rebuilt = checkpoint.user_embedder_from_config(loaded_config)
    assert rebuilt == embedder
    inputs = _embedder_inputs(embedder.encoder_config.hidden_size)
    expected = jax.jit(embedder.apply)({"params": params}, *inputs)
    assert expected.shape == (3, plug.NUM_SOFT_TOKENS, 24)
    np.testing.assert_array_equal(jax.jit(rebuilt.apply)({"params": loaded}, *inputs), expected)
    # load_plug (what evaluate uses) reads the export into the structure of `like`
    like_trained = checkpoint.load_plug(path, params)
    assert jax.tree.structure(like_trained) == jax.tree.structure(params)
    assert _tree_equal(like_trained, params)


def test_export_is_only_the_plug(tmp_path):
    embedder, params, plug_config = _tiny_plug()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    optimizer = optax.adamw(1e-3)

    @jax.jit
    def moments(params):  # non-zero, incompressible Adam moments, like a trained run's
        grads = jax.tree.map(lambda x: jnp.sin(1e3 * x), params)
        return optimizer.update(grads, optimizer.init(params), params)[1]

    state = {"params": params, "opt": moments(params), "step": jnp.int32(12)}
    with checkpoint.TrainCheckpointer(tmp_path / "run", save_every=12) as saver:
        saver.save(12, state, rng=jax.random.key(0))
    path = checkpoint.export_plug(tmp_path / "plug", params, plug_config)
    export_bytes = checkpoint.export_size_bytes(path)
    train_bytes = checkpoint.export_size_bytes(tmp_path / "run" / checkpoint.CHECKPOINT_DIR)
    assert param_bytes < export_bytes < param_bytes + 64_000  # params plus a little metadata
    assert export_bytes < train_bytes / 2.5  # no Adam moments


def test_export_cli(tmp_path):
    """A training run's checkpoint -> `python -m plug_jax.export` -> the same plug."""
    embedder, params, plug_config = _tiny_plug(seed=3)
    optimizer = optax.adamw(1e-3)
    state = {"params": params, "opt": optimizer.init(params), "step": jnp.int32(8)}
    run = tmp_path / "run"
    with checkpoint.TrainCheckpointer(run, save_every=4,
                                      plug_config=dict(plug_config, step=None)) as saver:
        saver.save(4, jax.tree.map(jnp.zeros_like, state), rng=jax.random.key(0))
        saver.save(8, state, rng=jax.random.key(0))

    result = subprocess.run([sys.executable, "-m", "plug_jax.export", f"--workdir={run}",
                             f"--out={tmp_path / 'plug'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("exported the plug of step 8 (") and str(tmp_path / "plug") in last
    loaded_config, loaded = checkpoint.load_exported_plug(tmp_path / "plug")
    assert loaded_config["step"] == 8 and _tree_equal(loaded, unboxed(params))

    export.export(run, tmp_path / "plug4", step=4)  # an older step, in-process
    _, older = checkpoint.load_exported_plug(tmp_path / "plug4")
    assert all(not np.any(x) for x in jax.tree.leaves(older))
    with pytest.raises(FileNotFoundError, match="step 5"):
        export.export(run, tmp_path / "plug5", step=5)


def test_export_without_plug_config_rebuilds_it_from_config_json(tmp_path):
    """No plug_config next to the checkpoints: export rebuilds it from config.json (tiny LLM)."""
    config = common.lamp_config("LaMP_3", "tiny")
    config.plug.projector_hidden = 8
    plug_config = export.plug_config_from_run_config(config)
    embedder = checkpoint.user_embedder_from_config(plug_config)
    assert embedder.projector_hidden == 8 and embedder.soft_token_rms > 0
    params = jax.jit(lambda: jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype),
                                          checkpoint.abstract_plug_params(embedder)))()
    run = tmp_path / "run"
    with checkpoint.TrainCheckpointer(run, save_every=2) as saver:
        saver.save(2, {"params": params, "step": jnp.int32(2)}, rng=jax.random.key(0))
    (run / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    export.export(run, tmp_path / "plug")
    loaded_config, loaded = checkpoint.load_exported_plug(tmp_path / "plug")
    assert loaded_config == dict(plug_config, step=2, num_params=loaded_config["num_params"])
    assert _tree_equal(loaded, params)


def test_load_exported_plug_refuses_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported plug"):
        checkpoint.load_exported_plug(tmp_path)
