"""The suite runs offline: nothing may come from a model hub. Fixtures shared by test modules."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def sharp_tiny_t5(monkeypatch):
    """'tiny-t5' with its kernels x10 (std 0.2, as the tiny Llama's). At T5's std 0.02 a random T5
    is near the identity and its decoder hardly sees the encoder, nor the soft tokens."""
    from plug_jax import llm

    plain = llm.TINY_MODELS["tiny-t5"]

    def sharp(*args, **kwargs):
        lm, params = plain(*args, **kwargs)
        return lm, jax.tree_util.tree_map_with_path(
            lambda path, x: x * 10 if path[-1].key == "kernel" else x, params)

    monkeypatch.setitem(llm.TINY_MODELS, "tiny-t5", sharp)
