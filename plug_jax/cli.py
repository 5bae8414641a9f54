"""What every command shares: its common flags, multi-host start-up, quiet logs, output on one host.

A command module defines its own flags at import, next to these, and ends with

    if __name__ == "__main__":
        cli.run(main, "config", "workdir")

`--config configs/lamp3.py:paper --config.optim.lr=3e-4` reads a config file and overrides fields
(a misspelt field is an error).

Bad input (a `plug_jax.errors.UserError`, a bad flag) ends a command with one line on stderr,
`error: ...`, and exit status 2; anything else is a bug and keeps its traceback.

Logs: the terminal shows progress bars, the command's own lines, warnings and errors; every log
line, library INFO chatter included (Orbax, absl, JAX), goes to <workdir>/logs/<command>.log once
the command has created its workdir (a refused command leaves none), and `--verbose` shows it on
the terminal too. In a multi-host run only process 0 prints (the others show errors alone; each
has its own log file).
"""

from __future__ import annotations

import atexit
import difflib
import functools
import logging as python_logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import jax
from absl import app, flags, logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from plug_jax import errors
from plug_jax.models import assets

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/lampN.py file; ':tiny' for a smoke test, ':paper' for the paper.")
WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory: checkpoints, caches, metrics.")
OUT = flags.DEFINE_string("out", None, "Where a command writes its result (a directory or file).")
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                          "host:port of process 0 (multi-host runs).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "FIELD=VALUE[,FIELD=VALUE]: the config with these fields changed, run beside "
    "it (repeatable), e.g. plug.persona_tokens=4 or llm.remat=True,llm.remat_policy=dots_saveable."
    " bench train times its update on the same batch; compare trains its methods again (an "
    "ablation).")
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

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).is_file():
        raise errors.MissingFileError(f"--config: {path} is not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def use_compilation_cache(directory: str | None = None) -> None:
    """XLA programs persist on disk (JAX_COMPILATION_CACHE_DIR, else assets.cache_dir("xla"):
    ~/.cache/plug_jax/xla), so a second run with the same shapes skips compilation. Those that
    compile in 0.5 s or more, unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
    directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or str(assets.cache_dir("xla")))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0.5)))


def variant_config(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """The config with a --variant's fields changed: 'llm.dtype=bfloat16',
    'llm.remat=True,llm.remat_policy=dots_with_no_batch_dims_saveable'."""
    changed = config.copy_and_resolve_references()
    for assignment in variant.split(","):
        field, equals, text = assignment.partition("=")
        *sections, name = field.split(".")
        try:
            section = functools.reduce(lambda parent, key: parent[key], sections, changed)
            old = section[name]
        except (KeyError, TypeError):
            old = section = None
        if not equals or not isinstance(section, ml_collections.ConfigDict):
            raise errors.UserError(f"--variant {variant!r}: {field!r} is not a config field "
                                   "(expected FIELD=VALUE[,FIELD=VALUE], like llm.dtype=bfloat16)")
        section[name] = text.lower() in ("true", "1") if isinstance(old, bool) else type(old)(text)
    return changed


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


class _WorkdirLog(python_logging.Handler):
    """Appends log records to a file in the workdir once the command has created the workdir, and
    holds them until then: a command refused before it writes anything leaves no directory."""

    HELD = 10_000  # records kept while waiting; a command that never makes its workdir drops them

    def __init__(self, workdir: str, path: str):
        super().__init__(python_logging.DEBUG)
        self.setFormatter(python_logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
        self._workdir, self._path, self._held, self._file = workdir, path, [], None
        self._closed = False

    def _open(self) -> bool:
        if self._file is None and not self._closed and os.path.isdir(self._workdir):
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8")
        return self._file is not None

    def emit(self, record: python_logging.LogRecord) -> None:
        self._held = (self._held + [record])[-self.HELD:]
        if self._open():
            self._file.writelines(self.format(r) + "\n" for r in self._held)
            self._file.flush()
            self._held = []

    def close(self) -> None:
        if self._held and self._open():
            self._file.writelines(self.format(r) + "\n" for r in self._held)
        if self._file is not None:
            self._file.close()
        self._file, self._closed = None, True
        super().close()


def log_to_workdir(workdir: str | None, *, verbose: bool = False) -> epath.Path | None:
    """Every log line to <workdir>/logs/<command>[.process<i>].log (from when the workdir exists);
    on the terminal, warnings and errors (process 0) or errors alone (the others), everything
    with `verbose`. Returns the log file. A bucket workdir's log is written locally and copied
    there at exit."""
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
    remote = "://" in os.fspath(log)
    local = tempfile.mkdtemp() if remote else os.fspath(workdir)
    handler = _WorkdirLog(local, os.path.join(local, "logs", name) if not remote
                          else os.path.join(local, name))
    python_logging.getLogger().addHandler(handler)

    def finish() -> None:
        handler.close()
        if remote and os.path.exists(handler._path) and log.parent.parent.exists():
            log.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(handler._path).copy(log, overwrite=True)

    atexit.register(finish)
    return log


def run(main: Callable[[Sequence[str]], None], *required: str, distributed: bool = False) -> None:
    """absl's app.run with the `required` flags and the logs of `log_to_workdir`.
    A `UserError` (or a bad flag) ends the command with one line and exit status 2.

    distributed: start jax.distributed first (commands that run on every host of a slice).
    """
    flags.mark_flags_as_required(list(required))

    def start(argv: Sequence[str]) -> None:
        use_compilation_cache()
        if distributed:
            initialize_distributed()
        verbose = VERBOSE.value or flags.FLAGS["verbosity"].present
        log_to_workdir(WORKDIR.value, verbose=verbose)
        try:
            main(argv)
        except errors.UserError as error:
            fail(str(error))

    app.run(start, flags_parser=_parse_flags)
