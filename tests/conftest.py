"""The suite runs offline: nothing may come from a model hub. What plug_jax caches (compiled XLA
programs, parsed GGUF metadata, history embeddings) persists for the session, so runs of the same
shapes (compare's seeds, resumed runs) skip compilation and no run parses SmolLM2's vocabulary
twice: one cache directory per test run, shared by pytest-xdist's workers and inherited by every
subprocess a test starts (the training CLI's runs, plans), whatever their size. It holds what can
be recomputed, never results. Fixtures shared by test modules."""

import dataclasses
import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _cache_dir() -> str:
    """This test run's cache: xdist's workers share their run's id, a plain run makes its own."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return tempfile.mkdtemp(prefix="plug_jax_cache_")
    directory = os.path.join(tempfile.gettempdir(), f"plug_jax_cache_{run}")
    os.makedirs(directory, exist_ok=True)
    return directory


os.environ["PLUG_JAX_CACHE_DIR"] = _cache_dir()
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["PLUG_JAX_CACHE_DIR"], "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the eager inits' small programs
# Tests check behaviour, not speed: XLA:CPU compiles them without LLVM's optimisations, which
# takes a third off the compile time that most of the suite is (the benchmarks and every command
# keep the defaults). Subprocesses inherit it; those that add flags keep these.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true"]))

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

from plug_jax import cli  # noqa: E402

cli.use_compilation_cache()

# Real LaMP-format data beside the repository (../shared/data/lamp-real), never copied into it.
LAMP_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamp-real"
# Set to 1 where the data must be there (CI): a missing directory then fails instead of skipping.
REQUIRE_SHARED_DATA = "PLUG_JAX_REQUIRE_SHARED_DATA"


# The longest files first: pytest-xdist hands whole files to its workers in collection order, and
# the scale runs' background processes then overlap the rest instead of ending the suite alone.
LONGEST_FIRST = ("test_scale.py", "test_plan.py", "test_train.py", "test_compare.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture
def lamp_real() -> Path:
    """The real LaMP directories (amazon_music, news_v3); the test skips where they are absent,
    or fails when PLUG_JAX_REQUIRE_SHARED_DATA=1."""
    if not LAMP_REAL.is_dir():
        message = f"no real LaMP data at {LAMP_REAL} (the shared data beside the repository)"
        if os.environ.get(REQUIRE_SHARED_DATA) == "1":
            pytest.fail(f"{message}, and {REQUIRE_SHARED_DATA}=1")
        pytest.skip(message)
    return LAMP_REAL


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


@pytest.fixture
def keep_every_unit(monkeypatch):
    """Dropout masks that keep every unit, in flax (jax.random.bernoulli) and in PyTorch: train
    mode then only scales each tensor that dropout acts on by 1/(1 - rate), so that two
    implementations agree exactly when they drop the same tensors (their random masks never can)."""
    import jax.numpy as jnp
    import torch

    monkeypatch.setattr(jax.random, "bernoulli",
                        lambda key, p=0.5, shape=None, **kwargs: jnp.ones(shape, bool))
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p=0.5, training=True, inplace=False:
                        x / (1 - p) if training and p else x)


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
