"""Orbax checkpoints of what trains: the plug. The frozen LLM is never saved again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_plug(path: str | Path, plug_params: Any) -> Path:
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, plug_params, force=True)
    return path


def load_plug(path: str | Path, like: Any) -> Any:
    """Restores plug parameters into the structure, shapes and shardings of `like`."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved plug (train first: python -m plug_jax.train ...)")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract)
