"""Orbax checkpoints of what trains: the plug. The frozen LLM is never saved again.

Three things live here:

  TrainCheckpointer  resumable training checkpoints in <workdir>/checkpoints: the train state
                     (plug params, optimizer state, step), the PRNG key and the data iterator's
                     position, saved every N steps (asynchronously), the last `max_to_keep` kept.
  PreemptionGuard    turns SIGTERM (and optionally SIGINT) into a flag that every process agrees
                     on at the same step, so the loop can save and exit 0 instead of dying.
  export_plug        the trained plug alone (params gathered to host + plug_config.json), enough to
                     rebuild the UserEmbedder without the training run: `load_exported_plug`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import importlib.metadata
import json
import re
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax.core import meta
from jax.experimental import multihost_utils

from plug_jax import plug
from plug_jax.models import bert
from plug_jax.models.layers import unboxed

CHECKPOINT_DIR = "checkpoints"      # under the workdir
PLUG_CONFIG_FILE = "plug_config.json"
EXPORT_PARAMS_DIR = "params"        # under an exported plug's directory
EXPORT_FORMAT = "plug_jax.plug/1"
_DATA_FORMAT = 1

DataState = dict | bytes | None


# ------------------------------------------------------------------------------------- helpers

def abstract_of(tree: Any) -> Any:
    """Arrays (typed PRNG keys included) -> ShapeDtypeStructs with the same shardings."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(one, tree)


def _is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _with_default_shardings(abstract: Any) -> Any:
    """Leaves without a sharding would come back as numpy arrays; put them on the default device."""
    missing = [x for x in jax.tree.leaves(abstract) if getattr(x, "sharding", None) is None]
    if not missing:
        return abstract
    if jax.process_count() > 1:
        raise ValueError("restoring on several processes needs a sharding on every leaf of the "
                         "abstract state (use checkpoint.abstract_of(state) on the sharded state)")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: x if x.sharding is not None
                        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)


def _gather_strings(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(max(1, int(lengths.max())), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths.reshape(-1))]


def _encode_data_state(data_state: DataState) -> str:
    if data_state is None:
        return json.dumps({"kind": "none"})
    if isinstance(data_state, (bytes, bytearray)):
        return json.dumps({"kind": "bytes", "base64": base64.b64encode(data_state).decode()})
    try:
        return json.dumps({"kind": "json", "value": data_state})
    except TypeError as error:
        raise TypeError(f"data_state must be JSON-serializable, bytes or None: {error}") from None


def _decode_data_state(text: str) -> DataState:
    encoded = json.loads(text)
    if encoded["kind"] == "bytes":
        return base64.b64decode(encoded["base64"])
    return encoded.get("value")


def _host_tree(tree: Any) -> Any:
    """Every array as one numpy array on this host (sharded ones gathered from all processes)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------ training checkpoints

class TrainCheckpointer:
    """Periodic, asynchronous, keep-the-last-N checkpoints of a training run.

    Each step directory holds three items: `state` (the train state pytree), `rng` (the raw key
    data of the PRNG key) and `data` (JSON: each process's data iterator state and the key's
    implementation). Every process must call `save`, `restore_latest`, `wait` and `close`.
    """

    def __init__(self, workdir: str | Path, *, save_every: int = 1000, max_to_keep: int | None = 3,
                 async_save: bool = True, plug_config: Mapping[str, Any] | None = None):
        self.directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
        self.save_every = save_every
        # Only every N steps (0: only forced saves): no save at the first step as Orbax's default
        # policy would, and preemption is PreemptionGuard's business.
        policies = ocp.checkpoint_managers
        policy = (policies.FixedIntervalPolicy(save_every) if save_every > 0
                  else policies.SpecificStepsPolicy(()))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_decision_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
            create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "rng", "data"))
        if plug_config is not None and jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / PLUG_CONFIG_FILE).write_text(
                json.dumps(dict(plug_config), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_config(cls, workdir: str | Path, config: ml_collections.ConfigDict,
                    **kwargs) -> "TrainCheckpointer":
        """Options from `config.checkpoint` (save_every, max_to_keep, async_save) where present."""
        options = dict(config.get("checkpoint", None) or {})
        return cls(workdir, save_every=int(options.get("save_every", 1000)),
                   max_to_keep=options.get("max_to_keep", 3),
                   async_save=bool(options.get("async_save", True)), **kwargs)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, rng: jax.Array, data_state: DataState = None,
             force: bool = False) -> bool:
        """Saves if `step` is a multiple of save_every (or `force`); True if a save started.

        Returns once the arrays are copied off the devices, so `state` may be donated right after;
        the write finishes in the background (`wait` blocks on it).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False  # e.g. the final save right after a periodic one
        if not force and not self._manager.should_save(step):
            return False
        typed = _is_typed_key(rng)
        data = {
            "format": _DATA_FORMAT,
            "rng_impl": str(jax.random.key_impl(rng)) if typed else None,
            "process_count": jax.process_count(),
            "data_states": _gather_strings(_encode_data_state(data_state)),
        }
        key_data = jax.random.key_data(rng) if typed else rng
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  rng=ocp.args.StandardSave({"key_data": key_data}),
                                  data=ocp.args.JsonSave(data))
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, abstract_rng: Any
                ) -> tuple[Any, jax.Array, DataState, int]:
        """(state, rng, data_state, step) of `step`, each array placed as its abstract says.

        `abstract_state` holds ShapeDtypeStructs with `.sharding` (see `abstract_of`), so every
        process reads only the shards it holds; the checkpoint may have been saved on another mesh.
        """
        abstract_state = _with_default_shardings(abstract_of(abstract_state))
        abstract_rng = abstract_of(abstract_rng)
        typed = _is_typed_key(abstract_rng)
        key_data = jax.eval_shape(jax.random.key_data, abstract_rng) if typed else abstract_rng
        # The key is tiny: read it to host, then place it like the abstract key.
        key_data = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            rng=ocp.args.StandardRestore({"key_data": key_data}),
            data=ocp.args.JsonRestore()))
        data = restored["data"]
        raw = np.asarray(restored["rng"]["key_data"])
        impl = data["rng_impl"]
        to_key = (lambda x: jax.random.wrap_key_data(x, impl=impl)) if typed else jnp.asarray
        # jit places the same host value on any sharding, spanning other processes' devices too
        # (device_put cannot).
        rng = jax.jit(to_key, out_shardings=getattr(abstract_rng, "sharding", None))(raw)
        states = data["data_states"]
        if len(states) == jax.process_count():
            data_state = _decode_data_state(states[jax.process_index()])
        else:
            logging.warning("checkpoint %d was saved by %d processes, this run has %d: the data "
                            "iterator state is dropped", step, len(states), jax.process_count())
            data_state = None
        return restored["state"], rng, data_state, step

    def restore_latest(self, abstract_state: Any, abstract_rng: Any
                       ) -> tuple[Any, jax.Array, DataState, int] | None:
        """`restore` of the latest step; None when the directory has no checkpoint yet."""
        step = self._manager.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state, abstract_rng)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The finished checkpoints' steps under <workdir>/checkpoints, ascending."""
    directory = Path(workdir) / CHECKPOINT_DIR
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.exists() else []


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _match_structure(saved: Any, abstract: Any) -> Any:
    """`saved`'s arrays arranged as `abstract`; a boxed param (flax's logical partitioning) is
    saved as {"value": array}, so either side may have that extra level."""
    flat_saved, _ = jax.tree_util.tree_flatten_with_path(saved)
    by_path = {_path_names(path): leaf for path, leaf in flat_saved}
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, target in paths:
        names = _path_names(path)
        candidates = [names, names + ("value",)]
        if names[-1:] == ("value",):
            candidates.append(names[:-1])
        found = next((by_path[c] for c in candidates if c in by_path), None)
        if found is None:
            raise KeyError(f"the checkpoint has no param {'/'.join(names)}")
        if tuple(found.shape) != tuple(target.shape):
            raise ValueError(f"param {'/'.join(names)}: checkpoint shape {found.shape}, "
                             f"expected {target.shape}")
        leaves.append(found)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_params(workdir: str | Path, abstract_params: Any, step: int | None = None
                   ) -> tuple[Any, int]:
    """(plug params as numpy arrays, step) of a training checkpoint, read alone (no optimizer
    state, no key), arranged like `abstract_params` (boxed or not)."""
    directory = (Path(workdir) / CHECKPOINT_DIR).absolute()
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{directory}: no training checkpoint")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"{directory}: no checkpoint of step {step} (have {steps})")
    path = directory / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    try:
        # The saved structure, not the caller's: params may have been saved boxed.
        saved = handler.metadata(epath.Path(path)).tree["params"]
    finally:
        handler.close()
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    return _match_structure(restored["params"], abstract_params), step


def read_plug_config(workdir: str | Path) -> dict | None:
    """The plug_config a TrainCheckpointer wrote next to the checkpoints, if any."""
    path = Path(workdir) / CHECKPOINT_DIR / PLUG_CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------- preemption

def _preemption_service_active() -> bool:
    """Whether JAX's coordination service watches SIGTERM for us (jax.distributed + service)."""
    return bool(jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service)


class PreemptionGuard:
    """Turns a stop signal into a step at which every process stops, saves and exits 0.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step): save(force=True); wait(); break

    The handler only sets a flag. `should_stop(step)` must be called by every process at every
    step: under `jax.distributed` with the preemption service, JAX's coordination service owns
    SIGTERM (its handler is left in place) and `reached_preemption_sync_point` names the step;
    otherwise the local flags are all-gathered every `sync_every` steps, so all processes agree.
    A second SIGINT raises KeyboardInterrupt at once.
    """

    def __init__(self, *, sigint: bool = False, sync_every: int = 1):
        self.sync_every = max(1, int(sync_every))
        self._signals = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._use_service = False
        self.stop_step: int | None = None

    @property
    def received(self) -> int | None:
        """The signal number this process received, if any."""
        return self._received

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """What the handler does: ask for a stop at the next agreed step."""
        self._received = signum

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self._received == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = signum  # no printing here: the handler may interrupt a print

    def __enter__(self) -> "PreemptionGuard":
        self._use_service = _preemption_service_active()
        for signum in self._signals:
            if signum == signal.SIGTERM and self._use_service:
                continue  # replacing it would blind the coordination service
            self._install(signum)
        return self

    def _install(self, signum: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard outside the main thread: no handler for %s",
                            signal.Signals(signum).name)
        elif signum not in self._previous:
            self._previous[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True at the step where all processes stop (and at every later call)."""
        if self.stop_step is not None:
            return True
        stop = False
        if self._use_service:
            try:
                stop = multihost_utils.reached_preemption_sync_point(int(step))
            except RuntimeError:  # the service is off after all: catch SIGTERM ourselves
                self._use_service = False
                self._install(signal.SIGTERM)
        if jax.process_count() > 1:
            if step % self.sync_every == 0:
                flags = multihost_utils.process_allgather(
                    np.array([self._received is not None], np.int32))
                stop = stop or bool(np.asarray(flags).any())
        else:
            stop = stop or self._received is not None
        if stop:
            self.stop_step = int(step)
            reason = (signal.Signals(self._received).name if self._received is not None
                      else "preemption sync point" if self._use_service
                      else "a signal to another process")
            logging.warning("stopping at step %d (%s)", step, reason)
        return stop


# ------------------------------------------------------------------------------------- export

@functools.cache
def plug_jax_version() -> str:
    try:
        return importlib.metadata.version("plug_jax")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: read setup.cfg
        setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
        found = re.search(r"^version\s*=\s*(\S+)", setup_cfg.read_text() if setup_cfg.exists()
                          else "", re.MULTILINE)
        return found.group(1) if found else "unknown"


def embedder_fields(embedder: plug.UserEmbedder) -> dict:
    """The UserEmbedder's constructor arguments, as JSON."""
    return {"encoder_config": dataclasses.asdict(embedder.encoder_config),
            "llm_width": int(embedder.llm_width),
            "soft_token_rms": float(embedder.soft_token_rms),
            "soft_token_scale": embedder.soft_token_scale,
            "soft_token_norm": float(embedder.soft_token_norm),
            "param_init": embedder.param_init,
            "projector_hidden": int(embedder.projector_hidden),
            "dtype": jnp.dtype(embedder.dtype).name}


def make_plug_config(embedder: plug.UserEmbedder, config: ml_collections.ConfigDict, *,
                     llm_family: str, step: int | None = None) -> dict:
    """Everything needed to rebuild the plug and feed it: module fields + the run's settings."""
    return {
        "format": EXPORT_FORMAT,
        "plug_jax_version": plug_jax_version(),
        "step": None if step is None else int(step),
        "task": config.data.task,
        "embedder": embedder_fields(embedder),
        "llm": {"path": config.llm.path, "family": llm_family, "dtype": config.llm.dtype,
                "soft_token_position": config.llm.soft_token_position},
        # The resolved pooling (config.encoder.pooling may be '' = from the checkpoint).
        "encoder": {"path": config.encoder.path, "pooling": embedder.encoder_config.pooling,
                    "max_length": int(config.encoder.max_length),
                    "query_instruction": config.encoder.query_instruction},
        "data": {"max_history": int(config.data.max_history),
                 "max_query_tokens": int(config.data.max_query_tokens),
                 "max_input_tokens": int(config.data.max_input_tokens),
                 "max_target_tokens": int(config.data.max_target_tokens)},
    }


def llm_family(llm: Any) -> str:
    """'llama' or 't5': the module family of a FrozenLM."""
    return type(llm.module).__name__.lower()


def plug_config_for(experiment: Any, step: int | None = None) -> dict:
    """`make_plug_config` of a built plug_jax.experiment.Experiment."""
    return make_plug_config(experiment.embedder, experiment.config,
                            llm_family=llm_family(experiment.llm), step=step)


def user_embedder_from_config(plug_config: Mapping[str, Any]) -> plug.UserEmbedder:
    fields = plug_config["embedder"]
    return plug.UserEmbedder(encoder_config=bert.BertConfig(**fields["encoder_config"]),
                             llm_width=int(fields["llm_width"]),
                             soft_token_rms=float(fields["soft_token_rms"]),
                             soft_token_scale=fields.get("soft_token_scale", "rms"),
                             soft_token_norm=float(fields.get("soft_token_norm", 0.0)),
                             param_init=fields.get("param_init", "default"),
                             projector_hidden=int(fields["projector_hidden"]),
                             dtype=jnp.dtype(fields.get("dtype", "float32")))


def abstract_plug_params(embedder: plug.UserEmbedder) -> Any:
    """ShapeDtypeStructs of the embedder's params (no FLOPs; history length is irrelevant)."""
    width = embedder.encoder_config.hidden_size
    boxed = jax.eval_shape(embedder.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                           jnp.ones((1, 4), bool), jnp.zeros((1, 1, width)), jnp.ones((1, 1), bool))
    return unboxed(boxed["params"])


def export_plug(out_dir: str | Path, plug_params: Any, plug_config: Mapping[str, Any]) -> Path:
    """Writes <out_dir>/params (the plug's params, unboxed, on host) and <out_dir>/plug_config.json.

    All processes must call it (sharded params are gathered); the config is written last, so a
    directory with one holds a complete export.
    """
    out_dir = Path(out_dir).absolute()
    params = _host_tree(unboxed(plug_params))
    plug_config = dict(plug_config, format=EXPORT_FORMAT,
                       num_params=int(sum(x.size for x in jax.tree.leaves(params))))
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / PLUG_CONFIG_FILE
    if jax.process_index() == 0 and config_path.exists():
        config_path.unlink()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / EXPORT_PARAMS_DIR, params, force=True)
    if jax.process_index() == 0:
        config_path.write_text(json.dumps(plug_config, indent=2, sort_keys=True) + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("plug_jax.export_plug")
    return out_dir


def load_exported_plug(path: str | Path, shardings: Any = None) -> tuple[dict, Any]:
    """(plug_config, params) of an export; params on the default device, or as `shardings` says
    (one sharding, or a tree of them matching the params)."""
    path = Path(path).absolute()
    config_path = path / PLUG_CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{path}: not an exported plug (no {PLUG_CONFIG_FILE}; "
                                f"python -m plug_jax.export --workdir RUN --out {path})")
    plug_config = json.loads(config_path.read_text())
    abstract = abstract_plug_params(user_embedder_from_config(plug_config))
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / EXPORT_PARAMS_DIR, abstract)
    return plug_config, params


def export_size_bytes(path: str | Path) -> int:
    """Bytes on disk under `path` (an export, or any checkpoint directory)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------- the plug alone, by path

def load_plug(path: str | Path, like: Any) -> Any:
    """Restores an exported plug's params into the structure, shapes and shardings of `like`."""
    path = Path(path).absolute()
    if not (path / PLUG_CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path}: no exported plug (train first: python -m plug_jax.train "
                                "..., or export: python -m plug_jax.export ...)")
    abstract = _with_default_shardings(abstract_of(unboxed(like)))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / EXPORT_PARAMS_DIR, abstract)
    return meta.replace_boxed(like, params)  # exports are unboxed; `like` may carry axis names
