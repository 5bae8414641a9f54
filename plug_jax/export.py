"""Exports the plug of a training checkpoint alone: its params and the config to rebuild it.

  python -m plug_jax.export --workdir /tmp/pplug_lamp3 --out /tmp/lamp3_plug [--step N]

Reads the latest (or the given) checkpoint in <workdir>/checkpoints, keeps only the plug's params
(no optimizer state, no PRNG key, no LLM) and writes <out>/params plus <out>/plug_config.json;
`plug_jax.checkpoint.load_exported_plug(out)` loads it back without the training run.
The plug's description comes from <workdir>/checkpoints/plug_config.json when training wrote one,
else from <workdir>/config.json (which loads the LLM once, to measure its embedding RMS).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from plug_jax import checkpoint, plug


def plug_config_from_run_config(config: ml_collections.ConfigDict) -> dict:
    """The plug's description rebuilt from a run's config: loads the LLM and the encoder."""
    from plug_jax import experiment as experiment_lib, llm as llm_lib

    llm, llm_params = llm_lib.load_llm(config.llm.path, jnp.dtype(config.llm.dtype),
                                       config.llm.soft_token_position)
    encoder_config, _, _ = experiment_lib.load_encoder(config.encoder)
    embedder = plug.UserEmbedder(
        encoder_config=encoder_config, llm_width=llm.width,
        **plug.soft_token_fields(config.plug, llm.embedding_table(llm_params)),
        projector_hidden=config.plug.projector_hidden,
        param_init=config.plug.get("param_init", "default"))
    return checkpoint.make_plug_config(embedder, config, llm_family=checkpoint.llm_family(llm))


def read_plug_config(workdir: Path) -> dict:
    plug_config = checkpoint.read_plug_config(workdir)
    if plug_config is not None:
        path = workdir / checkpoint.CHECKPOINT_DIR / checkpoint.PLUG_CONFIG_FILE
        print(f"plug description: {path}")
        return plug_config
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{workdir}: neither {checkpoint.CHECKPOINT_DIR}/"
                                f"{checkpoint.PLUG_CONFIG_FILE} nor config.json "
                                "(not a training run?)")
    print(f"plug description: rebuilt from {config_path} (loading the LLM for its width and "
          f"embedding RMS)")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    return plug_config_from_run_config(config)


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Writes the plug of `workdir`'s latest (or `step`'s) checkpoint to `out`; returns `out`."""
    workdir, started = Path(workdir), time.time()
    steps = checkpoint.checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir / checkpoint.CHECKPOINT_DIR}: no training checkpoint")
    print(f"checkpoints in {workdir / checkpoint.CHECKPOINT_DIR}: steps {steps}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir / checkpoint.CHECKPOINT_DIR}: no checkpoint of step "
                                f"{step} (have {steps})")
    plug_config = read_plug_config(workdir)
    abstract = checkpoint.abstract_plug_params(checkpoint.user_embedder_from_config(plug_config))
    params, step = checkpoint.restore_params(workdir, abstract, step)  # numpy, on this host
    print(f"read the plug params of step {step}")
    plug_config = dict(plug_config, step=step)
    path = checkpoint.export_plug(out, params, plug_config)
    size_mb = checkpoint.export_size_bytes(path) / 1e6
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"exported the plug of step {step} ({num_params / 1e6:.2f}M params, {size_mb:.2f} MB) "
          f"to {path} in {time.time() - started:.0f} s")
    return path


def main(argv: Sequence[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines drown the progress
    try:
        export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The training run's directory (with checkpoints/).")
    flags.DEFINE_string("out", None, "Directory to write the exported plug to.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
