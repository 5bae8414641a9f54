"""Resumable training checkpoints of what trains: the plug. The frozen LLM is never saved again.

`TrainCheckpointer` keeps <workdir>/checkpoints: the train state (plug params, optimizer state,
step) and the data iterator's position, saved every N steps (asynchronously), the last
`max_to_keep` kept. `restore_params` reads the plug params alone, for plug_jax.export.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from plug_jax import errors

CHECKPOINT_DIR = "checkpoints"  # under the workdir
_DATA_FORMAT = 2  # 1 had the PRNG key's implementation too

DataState = dict | bytes | None


# ------------------------------------------------------------------------------------- helpers

def abstract_of(tree: Any) -> Any:
    """Arrays -> ShapeDtypeStructs with the same shardings."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(one, tree)


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


# ------------------------------------------------------------------------ training checkpoints

class TrainCheckpointer:
    """Periodic, asynchronous, keep-the-last-N checkpoints of a training run.

    Each step directory holds two items: `state` (the train state pytree) and `data` (JSON: each
    process's data iterator state). Every process must call `save`, `restore_latest`, `wait` and
    `close`.
    """

    def __init__(self, workdir: str | Path, *, save_every: int = 1000, max_to_keep: int | None = 3,
                 async_save: bool = True):
        self.directory = _absolute(epath.Path(workdir) / CHECKPOINT_DIR)
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
                                              item_names=("state", "data"))

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

    def should_save(self, step: int) -> bool:
        """Whether `save(step)` without `force` would save."""
        return int(step) not in self._manager.all_steps() and self._manager.should_save(int(step))

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: DataState = None,
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
        data = {
            "format": _DATA_FORMAT,
            "process_count": jax.process_count(),
            "data_states": _gather_strings(_encode_data_state(data_state)),
        }
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data))
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, DataState, int]:
        """(state, data_state, step) of `step`, each array placed as its abstract says.

        `abstract_state` holds ShapeDtypeStructs with `.sharding` (see `abstract_of`), so every
        process reads only the shards it holds; the checkpoint may have been saved on another mesh.
        """
        abstract_state = _with_default_shardings(abstract_of(abstract_state))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
        states = restored["data"]["data_states"]
        if len(states) == jax.process_count():
            data_state = _decode_data_state(states[jax.process_index()])
        else:
            logging.warning("checkpoint %d was saved by %d processes, this run has %d: the data "
                            "iterator state is dropped", step, len(states), jax.process_count())
            data_state = None
        return restored["state"], data_state, step

    def restore_latest(self, abstract_state: Any) -> tuple[Any, DataState, int] | None:
        """`restore` of the latest step; None when the directory has no checkpoint yet."""
        step = self._manager.latest_step()
        if step is None:
            return None
        return self.restore(step, abstract_state)

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


def _absolute(directory: epath.Path) -> epath.Path:
    return directory.absolute() if "://" not in str(directory) else directory


def checkpoint_steps(workdir: epath.PathLike) -> list[int]:
    """The finished checkpoints' steps under <workdir>/checkpoints, ascending."""
    directory = epath.Path(workdir) / CHECKPOINT_DIR
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
    state), arranged like `abstract_params` (boxed or not)."""
    directory = _absolute(epath.Path(workdir) / CHECKPOINT_DIR)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise errors.MissingFileError(f"{directory}: no training checkpoint")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise errors.MissingFileError(f"{directory}: no checkpoint of step {step} (have {steps})")
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
