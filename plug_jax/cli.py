"""What every command shares: its common flags, multi-host start-up, quiet logs, output on one host.

A command module defines its own flags at import, next to these, and ends with

    if __name__ == "__main__":
        cli.run(main, "config", "workdir")

`--config configs/lamp3.py:paper --config.optim.lr=3e-4` reads a config file and overrides fields
(a misspelt field is an error); `--verbosity=0` brings library INFO logs back.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/lampN.py file; ':tiny' for a smoke test, ':paper' for the paper.")
WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory: checkpoints, caches, metrics.")
OUT = flags.DEFINE_string("out", None, "Where a command writes its result (a directory or file).")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                          "host:port of process 0 (multi-host runs).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")

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


def run(main: Callable[[Sequence[str]], None], *required: str, distributed: bool = False) -> None:
    """absl's app.run with the `required` flags; library INFO logs off unless --verbosity is set.

    distributed: start jax.distributed first (commands that run on every host of a slice).
    """
    flags.mark_flags_as_required(list(required))

    def start(argv: Sequence[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax's and absl's INFO lines drown progress
        use_compilation_cache()
        if distributed:
            initialize_distributed()
        main(argv)

    app.run(start)
