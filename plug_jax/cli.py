"""What every command shares: its common flags, multi-host start-up, quiet logs, output on one host.

A command module defines its own flags at import, next to these, and ends with

    if __name__ == "__main__":
        cli.run(main, "config", "workdir")

`--config configs/lamp3.py:paper --config.optim.lr=3e-4` reads a config file and overrides fields
(a misspelt field is an error); `--verbosity=0` brings library INFO logs back.

Bad input (a `plug_jax.errors.UserError`, a bad flag) ends a command with one line on stderr,
`error: ...`, and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from plug_jax import errors

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

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).is_file():
        raise errors.MissingFileError(f"--config: {path} is not a config file")
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


def fail(message: str) -> NoReturn:
    """Ends the command: `error: message` as one line on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_writable(path: str | os.PathLike[str] | None, flag: str = "--workdir") -> None:
    """UserError unless `path` is a directory this process can write in, or can be created: its
    nearest existing ancestor is a writable directory. Nothing is created. Remote paths
    (gs://...) are left to their filesystem."""
    if path is None or "://" in str(path):
        return
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise errors.UserError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise errors.UserError(f"{flag} {path}: {existing} is not writable")


def _unknown_config_field(argv: Sequence[str]) -> str | None:
    """'--config.optim.lrr: config.optim has no field 'lrr' (did you mean 'lr'?)' for the first
    override naming no field of the config file, else None."""
    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[list(argv).index("--config") + 1]
    try:
        config = load_config(spec) if spec else None
    except Exception:  # the config file itself is at fault: the flag parser's message says why
        return None
    for arg in argv:
        match = re.fullmatch(r"--config\.([\w.]+)(=.*)?", arg)
        if config is None or match is None:
            continue
        section, parts = config, match[1].split(".")
        for depth, part in enumerate(parts):
            if not hasattr(section, "keys") or part not in section:
                where = ".".join(["config", *parts[:depth]])
                known = list(section.keys()) if hasattr(section, "keys") else []
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"--config.{match[1]}: {where} has no field {part!r}{hint}"
            section = section[part]
    return None


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing; a bad flag, config file or config override ends the command with one
    line and exit status 2. A traceback from a config file keeps only its last line."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # config files run here: their errors are the flags' errors
        message = _unknown_config_field(argv)
        if message is None:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            message = lines[-1] if any(line.startswith("Traceback") for line in lines) \
                else " ".join(lines)
        fail(message or type(error).__name__)


def run(main: Callable[[Sequence[str]], None], *required: str, distributed: bool = False) -> None:
    """absl's app.run with the `required` flags; library INFO logs off unless --verbosity is set.
    A `UserError` (or a bad flag) ends the command with one line and exit status 2.

    distributed: start jax.distributed first (commands that run on every host of a slice).
    """
    flags.mark_flags_as_required(list(required))

    def start(argv: Sequence[str]) -> None:
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax's and absl's INFO lines drown progress
        use_compilation_cache()
        if distributed:
            initialize_distributed()
        try:
            main(argv)
        except errors.UserError as error:
            fail(str(error))

    app.run(start, flags_parser=_parse_flags)
