"""What every command shares: its common flags, multi-host start-up, quiet logs, output on one host.

A command module defines its own flags at import, next to these, and ends with

    if __name__ == "__main__":
        cli.run(main, "config", "workdir")

`--config configs/lamp3.py:paper --config.optim.lr=3e-4` reads a config file and overrides fields
(a misspelt field is an error).

Logs: the terminal shows progress bars, the command's own lines, warnings and errors; every log
line, library INFO chatter included (Orbax, absl, JAX), goes to <workdir>/logs/<command>.log, and
`--verbose` shows it on the terminal too. In a multi-host run only process 0 prints (the others
show errors alone; each has its own log file).
"""

from __future__ import annotations

import atexit
import logging as python_logging
import os
import sys
import tempfile
from typing import Callable, Sequence

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/lampN.py file; ':tiny' for a smoke test, ':paper' for the paper.")
WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory: checkpoints, caches, metrics.")
OUT = flags.DEFINE_string("out", None, "Where a command writes its result (a directory or file).")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                          "host:port of process 0 (multi-host runs).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
VERBOSE = flags.DEFINE_bool("verbose", False, "Show library INFO logs (Orbax, absl, JAX) on the "
                            "terminal too; they always go to <workdir>/logs/.")

# Environment variables by which jax.distributed finds a multi-host cluster by itself.
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def echo(*args, **kwargs) -> None:
    """print, on process 0 only: a multi-host run reports once."""
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def initialize_distributed() -> None:
    """jax.distributed from the flags, or from the cluster's environment (TPU pod, SLURM...)."""
    if COORDINATOR_ADDRESS.value or NUM_PROCESSES.value:
        jax.distributed.initialize(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value,
                                   PROCESS_ID.value)
    elif any(name in os.environ for name in _CLUSTER_ENV):
        jax.distributed.initialize()


def load_config(spec: str):
    """'configs/lamp3.py:paper' -> that file's get_config('paper'), as --config reads it."""
    import importlib.util
    from pathlib import Path

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"--config: {path} is not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def use_compilation_cache(directory: str | None = None) -> None:
    """XLA programs persist on disk (JAX_COMPILATION_CACHE_DIR, else ~/.cache/plug_jax/xla), so a
    second run with the same shapes skips compilation."""
    directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(os.path.expanduser("~"), ".cache", "plug_jax", "xla"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def log_to_workdir(workdir: str | None, *, verbose: bool = False) -> epath.Path | None:
    """Every log line to <workdir>/logs/<command>[.process<i>].log; on the terminal, warnings and
    errors (process 0) or errors alone (the others), everything with `verbose`. Returns the log
    file. A log for a bucket workdir is written locally and copied there at exit."""
    process = jax.process_index() if jax.distributed.is_initialized() else 0
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
    terminal = logging.get_absl_handler()
    terminal.setLevel(python_logging.NOTSET if verbose
                      else python_logging.WARNING if process == 0 else python_logging.ERROR)
    if not workdir:
        return None
    program = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "plug_jax"
    name = program + (f".process{process}" if process else "") + ".log"
    log = epath.Path(workdir) / "logs" / name
    local = log if "://" not in os.fspath(log) else epath.Path(tempfile.mkdtemp()) / log.name
    local.parent.mkdir(parents=True, exist_ok=True)
    handler = python_logging.FileHandler(os.fspath(local), mode="a")
    handler.setFormatter(python_logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    handler.setLevel(python_logging.DEBUG)
    python_logging.getLogger().addHandler(handler)
    if local != log:
        atexit.register(lambda: (handler.flush(), local.copy(log, overwrite=True)))
    return log


def run(main: Callable[[Sequence[str]], None], *required: str, distributed: bool = False) -> None:
    """absl's app.run with the `required` flags and the logs of `log_to_workdir`.

    distributed: start jax.distributed first (commands that run on every host of a slice).
    """
    flags.mark_flags_as_required(list(required))

    def start(argv: Sequence[str]) -> None:
        use_compilation_cache()
        if distributed:
            initialize_distributed()
        verbose = VERBOSE.value or flags.FLAGS["verbosity"].present
        log_to_workdir(WORKDIR.value, verbose=verbose)
        main(argv)

    app.run(start)
