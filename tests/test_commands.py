"""What every command shares at start-up."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "evaluate", "compare", "embed", "export", "plan", "personalize", "bench")


def test_importing_a_command_leaves_the_jax_backend_unstarted():
    """Multi-host runs call jax.distributed.initialize after the imports, which JAX refuses once
    its backend has started: no command (nor a library it imports, such as bm25s) may start it."""
    imports = "; ".join(f"import plug_jax.{name}" for name in COMMANDS)
    check = ("from jax._src import xla_bridge; "
             "assert not xla_bridge.backends_are_initialized(), 'the JAX backend started'")
    subprocess.run([sys.executable, "-c", f"{imports}; {check}"], cwd=REPO, check=True,
                   timeout=300)
