"""Training checkpoints and preemption, on tiny pytrees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from plug_jax import checkpoint, preemption

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
    flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    return subprocess.Popen([sys.executable, str(path)], cwd=REPO, env=env, text=True, **popen)


# --------------------------------------------------------------------- TrainCheckpointer

@pytest.mark.parametrize("data_state", [{"next_index": 17, "epoch": [1, "a"]}, b"\x00grain\xff",
                                        None])
def test_round_trip(tmp_path, data_state):
    state = _state()
    with checkpoint.TrainCheckpointer(tmp_path, save_every=5) as saver:
        assert saver.restore_latest(checkpoint.abstract_of(state)) is None
        abstract = checkpoint.abstract_of(state)
        assert saver.save(5, state, data_state=data_state)
        # save returns once arrays are off the devices: the trainer may donate them right away
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        saver.wait()
    with checkpoint.TrainCheckpointer(tmp_path, save_every=5) as loader:  # a fresh process's view
        restored, restored_data, step = loader.restore_latest(abstract)
    assert step == 5 and restored_data == data_state
    assert _tree_equal(restored, _state())
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    items = (tmp_path / checkpoint.CHECKPOINT_DIR / "5").iterdir()
    assert sorted(p.name for p in items if p.is_dir()) == ["data", "state"]  # no PRNG key


def test_every_n_keep_n_and_force(tmp_path):
    state = _state()
    with checkpoint.TrainCheckpointer(tmp_path, save_every=3, max_to_keep=2) as saver:
        saved = [step for step in range(1, 11) if saver.save(step, state)]
        assert saved == [3, 6, 9]
        assert saver.save(10, state, force=True)          # e.g. on SIGTERM
        assert not saver.save(10, state, force=True)      # the final save, same step
        saver.wait()
        assert saver.all_steps() == [9, 10] and saver.latest_step() == 10
    assert checkpoint.checkpoint_steps(tmp_path) == [9, 10]


def test_from_config(tmp_path):
    config = common.lamp_config("LaMP_3", "tiny")
    config.checkpoint = dict(save_every=4, max_to_keep=1, async_save=False)
    with checkpoint.TrainCheckpointer.from_config(tmp_path, config) as saver:
        for step in range(1, 10):
            saver.save(step, _state())
        assert saver.all_steps() == [8]


def test_restore_into_mesh_shardings(tmp_path):
    """Saved on one device, restored onto a 1-device mesh: each array gets its target sharding."""
    state = _state()
    with checkpoint.TrainCheckpointer(tmp_path, save_every=1) as saver:
        saver.save(1, state)
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = NamedSharding(mesh, P("fsdp"))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=sharded if x.ndim else NamedSharding(mesh, P())),
        checkpoint.abstract_of(state))
    with checkpoint.TrainCheckpointer(tmp_path) as loader:
        restored, _, _ = loader.restore_latest(abstract)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert leaf.sharding == target.sharding
    assert _tree_equal(restored, state)


MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
from plug_jax import checkpoint, export

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
with checkpoint.TrainCheckpointer(workdir, save_every=7) as saver:
    assert saver.save(7, state, data_state={{"next_index": 9}})

# Restore onto the same mesh, and onto another one (2 x 2, sharded the other way).
other = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
def resharded(x):
    spec = P() if x.ndim == 0 else P("fsdp", "data") if x.shape[0] % 2 == 0 else P(None, "fsdp")
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(other, spec))
same = checkpoint.abstract_of(state)
for abstract in (same, jax.tree.map(resharded, same)):
    with checkpoint.TrainCheckpointer(workdir) as loader:
        restored, data, step = loader.restore_latest(abstract)
    assert step == 7 and data == {{"next_index": 9}}
    for leaf, target, original in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract),
                                      jax.tree.leaves(state)):
        assert leaf.sharding == target.sharding, (leaf.sharding, target.sharding)
        assert np.array_equal(np.asarray(leaf), np.asarray(original))
shards = restored["params"]["w"].addressable_shards
assert len(shards) == 4 and shards[0].data.shape == (4, 2), [s.data.shape for s in shards]

# Export gathers the sharded params into one host copy.
export.export_plug(workdir + "/plug", state["params"], {{"embedder": {{}}}})
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
    with preemption.PreemptionGuard(sigint=True) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the guard
        assert guard.received == signal.SIGTERM
        assert guard.should_stop(2) and guard.stop_step == 2 and guard.should_stop(3)
    assert signal.getsignal(signal.SIGTERM) is previous_term
    assert signal.getsignal(signal.SIGINT) is previous_int


def test_second_sigint_interrupts():
    with preemption.PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


PREEMPTED_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp
from plug_jax import checkpoint, preemption

state = {{"params": {{"w": jnp.zeros((4,))}}, "step": jnp.int32(0)}}
with checkpoint.TrainCheckpointer({workdir!r}, save_every=0) as saver, \\
        preemption.PreemptionGuard() as guard:
    step = 0
    while True:
        step += 1
        state = {{"params": {{"w": state["params"]["w"] + 1.0}}, "step": state["step"] + 1}}
        if step == 3:
            print("ready", flush=True)
        if guard.should_stop(step):
            saver.save(step, state, data_state={{"step": step}}, force=True)
            saver.wait()
            print(f"stopped at step {{step}}", flush=True)
            break
        saver.save(step, state, data_state={{"step": step}})
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
        state, data_state, step = loader.restore_latest(abstract)
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
from plug_jax import checkpoint, preemption

mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
replicated = NamedSharding(mesh, P())
shardings = {"params": {"w": NamedSharding(mesh, P("fsdp"))}, "step": replicated}
state = jax.jit(lambda: {"params": {"w": jnp.zeros((8,))}, "step": jnp.int32(0)},
                out_shardings=shardings)()
add = jax.jit(lambda s: {"params": {"w": s["params"]["w"] + 1}, "step": s["step"] + 1})
with checkpoint.TrainCheckpointer(workdir, save_every=0) as saver, \\
        preemption.PreemptionGuard() as guard:
    restored = saver.restore_latest(checkpoint.abstract_of(state))
    step = 0
    if restored is not None:
        state, data_state, step = restored
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
            saver.save(step, state, data_state={"process": process, "step": step}, force=True)
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
               XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2")
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
