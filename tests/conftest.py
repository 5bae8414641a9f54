"""The suite runs offline: nothing may come from a model hub. Compiled XLA programs persist for
the session, so runs of the same shapes (compare's seeds, resumed runs) skip compilation.
Fixtures shared by test modules."""

import dataclasses
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from plug_jax import cli  # noqa: E402

cli.use_compilation_cache(tempfile.mkdtemp(prefix="plug_jax_xla_"))


@pytest.fixture
def sharp_tiny_t5(monkeypatch):
    """'tiny-t5' with its kernels x10 (std 0.2, as the tiny Llama's). At T5's std 0.02 a random T5
    is near the identity and its decoder hardly sees the encoder, nor the soft tokens."""
    from plug_jax import llm

    find = llm._find_checkpoint

    def sharp(path):
        checkpoint = find(path)
        if path != "tiny-t5":
            return checkpoint

        def load(dtype, shardings):
            config, params = checkpoint.load(dtype, None)
            params = jax.tree_util.tree_map_with_path(
                lambda key, x: x * 10 if key[-1].key == "kernel" else x, params)
            if callable(shardings):
                shardings = shardings(config)
            return config, params if shardings is None else jax.device_put(params, shardings)

        return dataclasses.replace(checkpoint, load=load)

    monkeypatch.setattr(llm, "_find_checkpoint", sharp)


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory):
    """(workdir, train.RunResult) of 2 tiny training steps, evaluated on a few dev questions:
    what the plug's users (personalize) and the run's report read."""
    from configs import lamp3
    from plug_jax import train

    config = lamp3.get_config("tiny")
    config.optim.max_steps = 2
    config.data.eval_splits = ("dev",)
    config.data.max_eval_examples = 6
    workdir = tmp_path_factory.mktemp("tiny_trained_run")
    return workdir, train.run(config, workdir)
