"""The trained plug alone: its description, its export and the one loader of an export.

  python -m plug_jax.export --workdir /tmp/pplug_lamp3 --out /tmp/lamp3_plug [--step N]

An export is <out>/params (the plug's params, unboxed, gathered to host; no optimizer state, no
LLM) and <out>/plug_config.json: the UserEmbedder's fields, enough to rebuild the module without
the training run, the run's settings needed to feed it, fingerprints of its LLM and encoder (their
embedding RMS), and the whole run config ("run_config", which `plug_jax.personalize` rebuilds the
run from). `load_plug(out)` reads it back.

The command reads the latest (or the given) checkpoint of a training run. The plug's description
comes from <workdir>/checkpoints/plug_config.json, which training writes, else from
<workdir>/config.json (which loads the LLM once, to measure its embedding RMS).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from etils import epath
from jax.experimental import multihost_utils

from plug_jax import checkpoint, cli, errors, plug
from plug_jax import workdir as workdir_lib
from plug_jax.models import bert
from plug_jax.models.layers import unboxed

PLUG_CONFIG_FILE = "plug_config.json"
PARAMS_DIR = "params"  # under an exported plug's directory
# 2: parameter paths without the `Dense_0` level, and every UserEmbedder field described.
FORMAT = "plug_jax.plug/2"


class PlugFormatError(errors.UserError):
    """A plug_config.json of a format this code does not read."""


# ----------------------------------------------------------------------- the plug's description

@functools.cache
def plug_jax_version() -> str:
    try:
        return importlib.metadata.version("plug_jax")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: read setup.cfg
        setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
        found = re.search(r"^version\s*=\s*(\S+)", setup_cfg.read_text() if setup_cfg.exists()
                          else "", re.MULTILINE)
        return found.group(1) if found else "unknown"


def _module_fields(module: Any) -> dict:
    return {field.name: getattr(module, field.name) for field in dataclasses.fields(module)
            if field.init and field.name not in ("parent", "name")}


def embedder_fields(embedder: plug.UserEmbedder) -> dict:
    """Every constructor argument of the UserEmbedder, as JSON."""
    fields = _module_fields(embedder)
    fields["encoder_config"] = dataclasses.asdict(fields["encoder_config"])
    fields["dtype"] = jnp.dtype(fields["dtype"]).name
    return {name: value.item() if isinstance(value, np.generic) else value
            for name, value in fields.items()}


def user_embedder_from_config(plug_config: Mapping[str, Any]) -> plug.UserEmbedder:
    fields = dict(plug_config["embedder"])
    fields["encoder_config"] = bert.BertConfig(**fields["encoder_config"])
    fields["dtype"] = jnp.dtype(fields["dtype"])
    return plug.UserEmbedder(**fields)


def make_plug_config(embedder: plug.UserEmbedder, config: ml_collections.ConfigDict, *,
                     llm_family: str, step: int | None = None) -> dict:
    """Everything needed to rebuild the plug and feed it: module fields + the run's settings."""
    return {
        "format": FORMAT,
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
        # The whole run config: `plug_jax.personalize` rebuilds the run from the export alone.
        "run_config": json.loads(config.to_json_best_effort()),
    }


def llm_family(llm: Any) -> str:
    """'llama' or 't5': the module family of a FrozenLM."""
    return type(llm.module).__name__.lower()


def plug_config_for(experiment: Any, step: int | None = None) -> dict:
    """`make_plug_config` of a built plug_jax.experiment.Experiment."""
    plug_config = make_plug_config(experiment.embedder, experiment.config,
                                   llm_family=llm_family(experiment.llm), step=step)
    plug_config["encoder"]["embedding_rms"] = plug.encoder_embedding_rms(
        experiment.encoder_params)
    return plug_config


def run_config_of(plug_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The training run's config, as the export recorded it; PlugFormatError for an export
    written before exports carried it."""
    if "run_config" not in plug_config:
        raise PlugFormatError("the export has no run_config (written by an older plug_jax): "
                              "export it again with python -m plug_jax.export")
    return ml_collections.ConfigDict(plug_config["run_config"])


# What a plug was trained under, in its run's config: evaluated under other values, it would
# report wrong numbers. (Other fields, such as where the data lie or how to decode, may differ.)
PLUG_DEFINING_FIELDS = (
    "data.task", "method", "llm.path", "llm.soft_token_position", "encoder.path",
    "encoder.pooling", "encoder.max_length", "encoder.query_instruction", "data.history_labels",
    "data.query_from", "data.lamp1_query", "plug.projector_hidden", "plug.train_query_encoder",
    "plug.soft_token_scale", "plug.soft_token_norm", "plug.persona_tokens", "plug.attention_scale",
    "plug.learn_attention_scale", "plug.input_tokens")


def config_mismatch(plug_config: Mapping[str, Any], config: ml_collections.ConfigDict
                    ) -> str | None:
    """Where `config` differs from the run config the plug was trained under, on the
    PLUG_DEFINING_FIELDS, in one line; None when it does not. A field the export does not record
    (an older plug_jax) is not compared."""
    trained = run_config_of(plug_config)
    missing = object()

    def value(tree, field):
        for name in field.split("."):
            if not hasattr(tree, "keys") or name not in tree:
                return missing
            tree = tree[name]
        return tree

    differing = [f"{field} {value(trained, field)!r} vs {value(config, field)!r}"
                 for field in PLUG_DEFINING_FIELDS
                 if value(trained, field) is not missing
                 and value(trained, field) != value(config, field)]
    if not differing:
        return None
    return (f"the plug was trained under another configuration than this command's (trained vs "
            f"here): {'; '.join(differing)}")


def plug_config_from_run_config(config: ml_collections.ConfigDict) -> dict:
    """The plug's description rebuilt from a run's config: builds the run's LLM and encoder (no
    data)."""
    from plug_jax import experiment as experiment_lib

    exp = experiment_lib.build(config, splits=())
    return plug_config_for(exp)


def read_plug_config(path: str | Path) -> dict:
    """A plug_config.json of this format; PlugFormatError for any other."""
    try:
        plug_config = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise errors.MissingFileError(f"{path}: missing (not an exported plug)") from None
    except (ValueError, OSError) as e:  # invalid JSON or UTF-8, unreadable
        raise PlugFormatError(f"{path}: unreadable ({e})") from None
    found = plug_config.get("format") if isinstance(plug_config, dict) else None
    if found != FORMAT:
        raise PlugFormatError(f"{path}: plug format {found!r}, expected {FORMAT!r}")
    return plug_config


def _write_json(path: epath.Path, value: Mapping[str, Any]) -> None:
    workdir_lib.write_json(path, dict(value), indent=2, sort_keys=True)


def write_run_plug_config(workdir: str | Path, plug_config: Mapping[str, Any]) -> None:
    """The description of a run's plug, next to its training checkpoints (process 0 writes)."""
    if jax.process_index() == 0:
        directory = epath.Path(workdir) / checkpoint.CHECKPOINT_DIR
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / PLUG_CONFIG_FILE, plug_config)


def _absolute(location: epath.PathLike) -> epath.Path:
    location = epath.Path(location)
    return location.absolute() if workdir_lib.is_local(location) else location


def abstract_plug_params(embedder: plug.UserEmbedder) -> Any:
    """ShapeDtypeStructs of the embedder's params (no FLOPs; history length is irrelevant)."""
    width = embedder.encoder_config.hidden_size
    boxed = jax.eval_shape(embedder.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                           jnp.ones((1, 4), bool), jnp.zeros((1, 1, width)), jnp.ones((1, 1), bool))
    return unboxed(boxed["params"])


# ------------------------------------------------------------------------------ export and load

def _host_tree(tree: Any) -> Any:
    """Every array as one numpy array on this host (sharded ones gathered from all processes)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def export_plug(out: str | Path, params: Any, plug_config: Mapping[str, Any]) -> Path:
    """Writes <out>/params (the plug's params, unboxed, on host) and <out>/plug_config.json.

    All processes must call it (sharded params are gathered); the config is written last, so a
    directory with one holds a complete export.
    """
    out = _absolute(out)
    params = _host_tree(unboxed(params))
    plug_config = dict(plug_config, format=FORMAT,
                       num_params=int(sum(x.size for x in jax.tree.leaves(params))))
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / PLUG_CONFIG_FILE
    if jax.process_index() == 0 and config_path.exists():
        config_path.unlink()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / PARAMS_DIR, params, force=True)
    if jax.process_index() == 0:
        _write_json(config_path, plug_config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("plug_jax.export_plug")
    return out


def load_plug(path: str | Path, shardings: Any = None) -> tuple[dict, Any]:
    """(plug_config, params) of an export; params unboxed, on the default device or placed as
    `shardings` says (one sharding, or a tree of them matching the params)."""
    path = _absolute(path)
    config_path = path / PLUG_CONFIG_FILE
    if not config_path.exists():
        raise errors.MissingFileError(f"{path}: not an exported plug (no {PLUG_CONFIG_FILE}; train "
                                f"first, or python -m plug_jax.export --workdir RUN --out {path})")
    plug_config = read_plug_config(config_path)
    abstract = abstract_plug_params(user_embedder_from_config(plug_config))
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / PARAMS_DIR, abstract)
    return plug_config, params


def size_bytes(path: str | Path) -> int:
    """Bytes on disk under `path` (an export, or any checkpoint directory)."""
    return sum((directory / name).stat().length for directory, _, files in epath.Path(path).walk()
               for name in files)


# ------------------------------------------------------------------------------------- command

def run_plug_config(workdir: Path) -> dict:
    """The description training wrote next to the checkpoints, else rebuilt from config.json."""
    path = workdir / checkpoint.CHECKPOINT_DIR / PLUG_CONFIG_FILE
    if path.exists():
        print(f"plug description: {path}")
        return read_plug_config(path)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise errors.MissingFileError(f"{workdir}: neither {checkpoint.CHECKPOINT_DIR}/"
                                f"{PLUG_CONFIG_FILE} nor config.json (not a training run?)")
    print(f"plug description: rebuilt from {config_path} (loading the LLM for its width and "
          f"embedding RMS)")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    return plug_config_from_run_config(config)


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Writes the plug of `workdir`'s latest (or `step`'s) checkpoint to `out`; returns `out`."""
    workdir, started = epath.Path(workdir), time.time()
    checkpoints = workdir / checkpoint.CHECKPOINT_DIR
    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        raise errors.MissingFileError(f"{checkpoints}: no training checkpoint")
    print(f"checkpoints in {checkpoints}: steps {steps}")
    if step is not None and step not in steps:
        raise errors.MissingFileError(f"{checkpoints}: no checkpoint of step {step} (have {steps})")
    plug_config = run_plug_config(workdir)
    abstract = abstract_plug_params(user_embedder_from_config(plug_config))
    params, step = checkpoint.restore_params(workdir, abstract, step)  # numpy, on this host
    print(f"read the plug params of step {step}")
    path = export_plug(out, params, dict(plug_config, step=step))
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"exported the plug of step {step} ({num_params / 1e6:.2f}M params, "
          f"{size_bytes(path) / 1e6:.2f} MB) to {path} in {time.time() - started:.0f} s")
    return path


STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest.")


def main(argv: Sequence[str]) -> None:
    del argv
    cli.check_writable(cli.OUT.value, "--out")
    export(cli.WORKDIR.value, cli.OUT.value, STEP.value)


if __name__ == "__main__":
    cli.run(main, "workdir", "out")
