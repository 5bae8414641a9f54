"""Plug export: its description, the export, the one loader and the export command."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from plug_jax import checkpoint, export, plug
from plug_jax.models import bert
from plug_jax.models.layers import unboxed

REPO = Path(__file__).resolve().parents[1]


def _tree_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(leaves_a, leaves_b))


def _tiny_embedder(**fields) -> plug.UserEmbedder:
    fields = dict(dict(llm_width=24, soft_token_rms=0.7, projector_hidden=16), **fields)
    return plug.UserEmbedder(encoder_config=bert.BertConfig.tiny("cls"), **fields)


def _embedder_inputs(width: int):
    keys = jax.random.split(jax.random.key(9), 2)
    tokens = jax.random.randint(keys[0], (3, 6), 1, 100)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], bool)
    history = jax.random.normal(keys[1], (3, 5, width))
    history_mask = jnp.array([[1] * 5, [1] * 2 + [0] * 3, [0] * 5], bool)
    return tokens, mask, history, history_mask


def _tiny_plug(seed: int = 0):
    embedder = _tiny_embedder()
    inputs = _embedder_inputs(embedder.encoder_config.hidden_size)
    variables = jax.jit(embedder.init)(jax.random.key(seed), *inputs)
    # Boxed (logical axis names), as the trainer's params are.
    params = jax.jit(lambda tree: jax.tree.map(lambda x: x + 0.01, tree))(dict(variables["params"]))
    assert isinstance(params["instruction"], nn.meta.AxisMetadata)
    config = common.lamp_config("LaMP_3", "tiny")
    return embedder, params, export.make_plug_config(embedder, config, llm_family="llama",
                                                     step=12)


def test_export_round_trip(tmp_path):
    embedder, params, plug_config = _tiny_plug()
    path = export.export_plug(tmp_path / "plug", params, plug_config)
    loaded_config, loaded = export.load_plug(path)

    assert _tree_equal(loaded, unboxed(params))  # exports hold plain arrays
    assert loaded_config["format"] == "plug_jax.plug/2"
    assert loaded_config["step"] == 12 and loaded_config["task"] == "LaMP_3"
    assert loaded_config["llm"] == {"path": "tiny-llama", "family": "llama", "dtype": "float32",
                                    "soft_token_position": "after_chat_header"}
    assert loaded_config["encoder"]["pooling"] == "cls"
    assert loaded_config["plug_jax_version"] == export.plug_jax_version() != "unknown"
    rebuilt = export.user_embedder_from_config(loaded_config)
    assert rebuilt == embedder
    inputs = _embedder_inputs(embedder.encoder_config.hidden_size)
    expected = jax.jit(embedder.apply)({"params": params}, *inputs)
    assert expected.shape == (3, plug.NUM_SOFT_TOKENS, 24)
    np.testing.assert_array_equal(jax.jit(rebuilt.apply)({"params": loaded}, *inputs), expected)


def test_load_plug_places_params_as_the_shardings_say(tmp_path):
    _, params, plug_config = _tiny_plug()
    path = export.export_plug(tmp_path / "plug", params, plug_config)
    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, loaded = export.load_plug(path, replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(loaded))
    shardings = jax.tree.map(lambda _: replicated, unboxed(params))  # a tree, as evaluate passes
    _, loaded = export.load_plug(path, shardings)
    assert _tree_equal(loaded, unboxed(params))


@pytest.mark.parametrize("fields", [{}, {"train_query_encoder": False},
                                    {"dtype": jnp.bfloat16, "projector_hidden": 0},
                                    {"persona_tokens": 2, "soft_token_scale": "reference",
                                     "soft_token_norm": 3.5, "param_init": "torch"},
                                    {"persona_tokens": 0}],
                         ids=["defaults", "frozen_query_encoder", "bf16", "reference", "instruction"])
def test_the_description_rebuilds_an_equal_embedder(fields):
    embedder = _tiny_embedder(**fields)
    config = common.lamp_config("LaMP_3", "tiny")
    plug_config = export.make_plug_config(embedder, config, llm_family="llama")
    plug_config = json.loads(json.dumps(plug_config))  # as read from plug_config.json
    constructor = {f.name for f in dataclasses.fields(plug.UserEmbedder)} - {"parent", "name"}
    assert set(plug_config["embedder"]) == constructor
    rebuilt = export.user_embedder_from_config(plug_config)
    assert rebuilt == embedder
    assert rebuilt.train_query_encoder == embedder.train_query_encoder


def test_load_plug_refuses_another_format(tmp_path):
    _, params, plug_config = _tiny_plug()
    path = export.export_plug(tmp_path / "plug", params, plug_config)
    config_path = path / export.PLUG_CONFIG_FILE
    config_path.write_text(json.dumps(dict(plug_config, format="plug_jax.plug/1")))
    with pytest.raises(export.PlugFormatError) as error:
        export.load_plug(path)
    message = str(error.value)
    assert "\n" not in message and str(config_path) in message
    assert "'plug_jax.plug/1'" in message and "'plug_jax.plug/2'" in message
    assert isinstance(error.value, ValueError)


def test_export_is_only_the_plug(tmp_path):
    embedder, params, plug_config = _tiny_plug()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    optimizer = optax.adamw(1e-3)

    @jax.jit
    def moments(params):  # non-zero, incompressible Adam moments, like a trained run's
        grads = jax.tree.map(lambda x: jnp.sin(1e3 * x), params)
        return optimizer.update(grads, optimizer.init(params), params)[1]

    state = {"params": params, "opt": moments(params), "step": jnp.int32(12)}
    with checkpoint.TrainCheckpointer(tmp_path / "run", save_every=12) as saver:
        saver.save(12, state)
    path = export.export_plug(tmp_path / "plug", params, plug_config)
    export_bytes = export.size_bytes(path)
    train_bytes = export.size_bytes(tmp_path / "run" / checkpoint.CHECKPOINT_DIR)
    assert param_bytes < export_bytes < param_bytes + 64_000  # params plus a little metadata
    assert export_bytes < train_bytes / 2.5  # no Adam moments


def test_export_cli(tmp_path):
    """A training run's checkpoint -> `python -m plug_jax.export` -> the same plug."""
    embedder, params, plug_config = _tiny_plug(seed=3)
    optimizer = optax.adamw(1e-3)
    state = {"params": params, "opt": optimizer.init(params), "step": jnp.int32(8)}
    run = tmp_path / "run"
    export.write_run_plug_config(run, dict(plug_config, step=None))
    with checkpoint.TrainCheckpointer(run, save_every=4) as saver:
        saver.save(4, jax.tree.map(jnp.zeros_like, state))
        saver.save(8, state)

    result = subprocess.run([sys.executable, "-m", "plug_jax.export", f"--workdir={run}",
                             f"--out={tmp_path / 'plug'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("exported the plug of step 8 (") and str(tmp_path / "plug") in last
    loaded_config, loaded = export.load_plug(tmp_path / "plug")
    assert loaded_config["step"] == 8 and _tree_equal(loaded, unboxed(params))

    export.export(run, tmp_path / "plug4", step=4)  # an older step, in-process
    _, older = export.load_plug(tmp_path / "plug4")
    assert all(not np.any(x) for x in jax.tree.leaves(older))
    with pytest.raises(FileNotFoundError, match="step 5"):
        export.export(run, tmp_path / "plug5", step=5)

    # A run described in another format: one line on stderr, exit status 2.
    description = run / checkpoint.CHECKPOINT_DIR / export.PLUG_CONFIG_FILE
    description.write_text(json.dumps(dict(plug_config, format="plug_jax.plug/1")))
    result = subprocess.run([sys.executable, "-m", "plug_jax.export", f"--workdir={run}",
                             f"--out={tmp_path / 'old'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {description}: plug format 'plug_jax.plug/1', expected 'plug_jax.plug/2'")


def test_export_without_plug_config_rebuilds_it_from_config_json(tmp_path):
    """No plug_config next to the checkpoints: export rebuilds it from config.json (tiny LLM)."""
    config = common.lamp_config("LaMP_3", "tiny")
    config.plug.projector_hidden = 8
    plug_config = export.plug_config_from_run_config(config)
    embedder = export.user_embedder_from_config(plug_config)
    assert embedder.projector_hidden == 8 and embedder.soft_token_rms > 0
    assert embedder.train_query_encoder == config.plug.train_query_encoder
    params = jax.jit(lambda: jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype),
                                          export.abstract_plug_params(embedder)))()
    run = tmp_path / "run"
    with checkpoint.TrainCheckpointer(run, save_every=2) as saver:
        saver.save(2, {"params": params, "step": jnp.int32(2)})
    (run / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    export.export(run, tmp_path / "plug")
    loaded_config, loaded = export.load_plug(tmp_path / "plug")
    assert loaded_config == dict(plug_config, step=2, num_params=loaded_config["num_params"])
    assert _tree_equal(loaded, params)


def test_load_plug_refuses_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported plug"):
        export.load_plug(tmp_path)
