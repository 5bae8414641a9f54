"""Scale-out on CPU: the tiny run on 1 device and on two processes of 4 devices each (an 8-device
mesh: 2x2x2, data, fsdp and tensor parallelism at once with the data axis across the processes;
or tensor 8 across them) gives the same losses, with parameters really sharded; a run killed
mid-way resumes from its last checkpoint to the plug of an uninterrupted run; SIGTERM saves the
step it stopped at and exits 0.

Every run is a subprocess (the device count is fixed at start-up); the long ones start together,
so that both cores stay busy. They share the test run's persistent compilation cache (conftest),
so that what every run compiles alike (the eager inits) compiles once per kind of process; it
holds executables, not results.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from plug_jax import checkpoint, export

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
# The tiny config with a batch that divides over 8 devices, no evaluation, every step logged and
# a checkpoint every 2 steps: the same flags for every run here.
FLAGS = ["--config=configs/lamp3.py:tiny", "--config.optim.batch_size=8",
         f"--config.optim.max_steps={STEPS}", "--config.data.eval_splits=()",
         "--config.log_every=1", "--config.checkpoint.save_every=2"]
# Max relative difference of a step's loss from the 1-device run's: measured up to ~1e-7
# (float32 sums in another order), allowed with a wide margin.
LOSS_RTOL = 1e-5
# The two-process run with data across the processes also decodes a few dev questions: outputs
# sharded over both processes.
TWO_PROCESS_EVAL = ("--config.data.eval_splits=('dev',)", "--config.data.max_eval_examples=8")


def _evaluates(mesh: dict) -> bool:
    return mesh["data"] > 1


# The training command, which then describes some of the arrays it trained with: their global
# shardings, whichever process holds which shard.
DESCRIBING_TRAIN = """
import json
import jax
from plug_jax import cli, train

def leaf(tree, suffix):
    return next(value for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]
                if jax.tree_util.keystr(path).endswith(suffix))

def describe(x):
    indices = x.sharding.devices_indices_map(x.shape).values()
    return {"spec": list(x.sharding.spec), "shape": list(x.shape),
            "shards": len({str(index) for index in indices}),
            "shard_shape": list(x.sharding.shard_shape(x.shape))}

def main(argv):
    result = train.run(cli.CONFIG.value, cli.WORKDIR.value)
    llm, state = result.experiment.llm_params, result.state
    kernel = "['persona_projector']['fc2']['kernel']"
    arrays = {"llm embedding": leaf(llm, "['embed_tokens']['embedding']"),
              "llm mlp kernel": leaf(llm, "['layers_0']['mlp']['gate_proj']['kernel']"),
              "plug projector kernel": leaf(state["params"], kernel),
              "its adam moment": leaf(state["opt"], ".mu" + kernel)}
    with open(f"{cli.WORKDIR.value}/arrays_process{jax.process_index()}.json", "w") as file:
        json.dump({key: describe(x) for key, x in arrays.items()}, file)

cli.run(main, "config", "workdir", distributed=True)
"""

# The training CLI, signalling itself at one step's checkpoint save, a deterministic point mid-way
# (a tiny model's steps take milliseconds): SIGTERM once that checkpoint is on disk; SIGKILL while
# it is still being written, in the background.
SIGNALLING_TRAIN = """
import os, runpy, signal, sys
from plug_jax import checkpoint

signum, at_step = int(sys.argv.pop(1)), int(sys.argv.pop(1))
save = checkpoint.TrainCheckpointer.save

def save_then_signal(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == at_step:
        if signum == signal.SIGTERM:
            self.wait()
        os.kill(os.getpid(), signum)
    return saved

checkpoint.TrainCheckpointer.save = save_then_signal
runpy.run_module("plug_jax.train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def env():
    assert os.environ["JAX_COMPILATION_CACHE_DIR"]  # the test run's (conftest)
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _start(args: list[str], env: dict, log: Path, devices: int = 1,
           background: bool = False) -> subprocess.Popen:
    """A subprocess on `devices` CPU devices; its output goes to `log` (never a full pipe). A
    background one yields the CPU to the others."""
    env = dict(env, XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}")
    nice = ["nice", "-n", "10"] if background else []
    with open(log, "w") as out:
        process = subprocess.Popen([*nice, sys.executable, *args], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, text=True)
    process.log = log
    return process


def _finish(process: subprocess.Popen, timeout: float = 1200) -> str:
    """Its output, once it exited 0."""
    try:
        process.wait(timeout=timeout)
    finally:
        process.kill()
    output = process.log.read_text()
    assert process.returncode == 0, output[-6000:]
    return output


def _train_args(workdir: Path, *extra: str, program: tuple = ("-m", "plug_jax.train")
                ) -> list[str]:
    return [*program, *FLAGS, f"--workdir={workdir}", *extra]


def _free_ports(count: int) -> list[int]:
    ports = set()
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            ports.add(probe.getsockname()[1])
    return sorted(ports)


# Across the two processes: the data axis (each process holds half of every batch), each axis of
# size 2 so that every parameter's split over each axis shows; the tensor axis (each process holds
# every row of the batch: its data are replicated over the processes).
TWO_PROCESS_MESHES = {"2x2x2": {"data": 2, "fsdp": 2, "tensor": 2},
                      "tensor 8": {"data": 1, "fsdp": 1, "tensor": 8}}


def _two_process_workdir(root: Path, name: str) -> Path:
    return root / f"two_processes_{name.replace(' ', '_')}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """The long runs, started at once (a two-process run leaves a core idle while one process
    compiles): each two-process run, in the background, describing its arrays; and the 1-device
    reference, which the 1-device tests need first. Each test waits for the runs it checks."""
    root = tmp_path_factory.mktemp("runs")
    script = root / "describing_train.py"
    script.write_text(textwrap.dedent(DESCRIBING_TRAIN))
    started = {}
    for (name, mesh), port in zip(TWO_PROCESS_MESHES.items(),
                                  _free_ports(len(TWO_PROCESS_MESHES))):
        workdir = _two_process_workdir(root, name)
        started[name] = [
            _start(_train_args(workdir, *(f"--config.mesh.{axis}={size}"
                                          for axis, size in mesh.items()),
                               f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={index}",
                               *(TWO_PROCESS_EVAL if _evaluates(mesh) else ()),
                               program=(str(script),)),
                   env, root / f"{workdir.name}_process{index}.log", devices=4,
                   background=True)
            for index in range(2)]
    started["reference"] = [_start(_train_args(root / "one_device"), env,
                                   root / "one_device.log")]
    yield root, started
    for processes in started.values():
        for process in processes:
            process.kill()


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    """The workdir of the uninterrupted 1-device run."""
    root, started = runs
    _finish(started["reference"][0])
    return root / "one_device"


def _losses(workdir: Path) -> list[float]:
    """Per-step losses from train_metrics.jsonl (the last entry of a step that ran twice)."""
    by_step = {}
    for line in (workdir / "train_metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]
    assert sorted(by_step) == list(range(1, STEPS + 1)), by_step
    return [by_step[step] for step in range(1, STEPS + 1)]


def _max_relative_difference(losses, reference_losses) -> float:
    losses, reference_losses = np.asarray(losses), np.asarray(reference_losses)
    assert losses.shape == reference_losses.shape == (STEPS,)
    return float(np.max(np.abs(losses - reference_losses) / np.abs(reference_losses)))


def _tree_equal(a, b) -> bool:
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _signalled_run(tmp_path: Path, env: dict, signum: int, at_step: int
                   ) -> tuple[subprocess.Popen, Path]:
    script, workdir = tmp_path / "train.py", tmp_path / "run"
    script.write_text(textwrap.dedent(SIGNALLING_TRAIN))
    process = _start([str(script), str(int(signum)), str(at_step), *FLAGS,
                      f"--workdir={workdir}"], env, tmp_path / "signalled.log")
    try:
        process.wait(timeout=600)
    finally:
        process.kill()
    return process, workdir


def test_a_workdir_that_the_processes_do_not_share_is_refused(env, tmp_path):
    """Two processes, each with its own directory: both stop with one line before any work."""
    port, = _free_ports(1)
    processes = [_start(_train_args(tmp_path / f"process{index}_only",
                                    f"--coordinator_address=localhost:{port}",
                                    "--num_processes=2", f"--process_id={index}"),
                        env, tmp_path / f"process{index}.log") for index in range(2)]
    for process in processes:
        try:
            process.wait(timeout=300)
        finally:
            process.kill()
        output = process.log.read_text()
        assert process.returncode == 1, output[-6000:]
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is not shared by the run's processes: process(es) [1]" \
            in errors[0], output[-6000:]
    assert not (tmp_path / "process0_only" / "checkpoints").exists()


# The 1-device runs first: they need only the reference, while the long runs go on.

def test_a_killed_run_resumes_to_the_plug_of_an_uninterrupted_one(reference, env, tmp_path):
    killed, workdir = _signalled_run(tmp_path, env, signal.SIGKILL, at_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.log.read_text()[-6000:]
    saved = checkpoint.checkpoint_steps(workdir)
    assert saved in ([2], [2, 4]) and not (workdir / "plug").exists()  # killed mid-way
    assert (workdir / "run.lock").exists()  # stale: its owner is dead, the rerun takes it over

    resumed = _finish(_start(_train_args(workdir), env, tmp_path / "resumed.log"))
    start = int(resumed.split("resumed from the checkpoint of step ")[1].split()[0])
    print(f"killed at step 4 with checkpoints {saved} on disk: resumed from step {start}")
    assert start == max(saved)
    assert not (workdir / "run.lock").exists()
    assert _losses(workdir) == _losses(reference)  # every step, exactly
    reference_config, reference_plug = export.load_plug(reference / "plug")
    config, plug = export.load_plug(workdir / "plug")
    assert config == reference_config
    assert _tree_equal(plug, reference_plug)


def test_sigterm_saves_the_step_it_stopped_at_and_exits_zero(reference, env, tmp_path):
    """SIGTERM during step 2: the run stops at step 3, which no periodic save would keep."""
    del reference  # only for the compilation cache it fills
    process, workdir = _signalled_run(tmp_path, env, signal.SIGTERM, at_step=2)
    output = process.log.read_text()
    assert process.returncode == 0, output[-6000:]
    assert "stopped by a signal at step 3: checkpoint saved" in output
    assert checkpoint.checkpoint_steps(workdir) == [2, 3]
    assert not (workdir / "plug").exists()


@pytest.fixture(scope="module")
def two_process_runs(runs) -> dict:
    """{mesh name: (each process's output, workdir)}, once both processes exited 0."""
    root, started = runs
    return {name: ([_finish(process) for process in started[name]],
                   _two_process_workdir(root, name)) for name in TWO_PROCESS_MESHES}


# Logical axes (configs/common.py AXIS_RULES): vocab, mlp -> tensor; embed -> fsdp.
EXPECTED_SPECS = {
    "llm embedding": ["tensor", "fsdp"],          # (vocab, embed)
    "llm mlp kernel": ["fsdp", "tensor"],         # (embed, mlp)
    "plug projector kernel": ["tensor", "fsdp"],  # (mlp, embed)
    "its adam moment": ["tensor", "fsdp"],        # as its parameter
}


def _split_axes(spec: list, mesh: dict) -> list:
    """Each dimension's mesh axes of size > 1: P('tensor', 'fsdp') on a data-only mesh is P()."""
    dims = [[] if dim is None else [dim] if isinstance(dim, str) else list(dim) for dim in spec]
    split = [[axis for axis in dim if mesh[axis] > 1] for dim in dims]
    while split and not split[-1]:
        split.pop()
    return split


@pytest.mark.parametrize("name", list(TWO_PROCESS_MESHES))
def test_parameters_are_sharded_as_the_mesh_says(two_process_runs, name):
    mesh = TWO_PROCESS_MESHES[name]
    _, workdir = two_process_runs[name]
    described = [json.loads((workdir / f"arrays_process{index}.json").read_text())
                 for index in range(2)]
    assert described[0] == described[1]  # one global mesh, whichever process looks
    for key, array in described[0].items():
        assert _split_axes(array["spec"], mesh) == _split_axes(EXPECTED_SPECS[key], mesh), \
            (key, array)
        splits = [mesh[axis] for axis in EXPECTED_SPECS[key]]
        assert array["shards"] == int(np.prod(splits)), (key, array)
        assert array["shard_shape"] == [size // split for size, split in
                                        zip(array["shape"], splits)], (key, array)


@pytest.mark.parametrize("name", list(TWO_PROCESS_MESHES))
def test_two_processes_give_the_losses_of_one(two_process_runs, reference, name):
    """Two processes of 4 devices each make one 8-device mesh."""
    outputs, workdir = two_process_runs[name]
    assert f"mesh {TWO_PROCESS_MESHES[name]} over 2 process(es)" in outputs[0]
    reference_losses = _losses(reference)
    assert reference_losses[-1] < reference_losses[0]  # it trains
    difference = _max_relative_difference(_losses(workdir), reference_losses)
    print(f"2 processes x 4 devices, mesh {name}: max relative loss difference {difference:.2e}")
    assert difference < LOSS_RTOL
    # Both processes took part in the export, which gathers the plug sharded over them.
    plug_config, _ = export.load_plug(workdir / "plug")
    assert plug_config["step"] == STEPS
    if _evaluates(TWO_PROCESS_MESHES[name]):  # ... and in the evaluation; process 0 reported it
        assert "pplug             dev" in outputs[0] and "pplug             dev" not in outputs[1]
        metrics = json.loads((workdir / "metrics.json").read_text())
        assert set(metrics["pplug"]["dev"]) == {"mae", "rmse"}
