"""The suite runs offline: nothing may come from a model hub. Compiled XLA programs persist for
the session, so runs of the same shapes (compare's seeds, resumed runs) skip compilation."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from plug_jax import cli  # noqa: E402  (after the environment above)

cli.use_compilation_cache(tempfile.mkdtemp(prefix="plug_jax_xla_"))
