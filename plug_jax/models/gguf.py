"""GGUF (llama.cpp) checkpoints as Hugging Face tensors and config, read with the `gguf` package.

Every tensor is dequantized to float32 with `gguf.quants.dequantize` and renamed to its Hugging Face
name, so that `LLAMA_RULES` loads it like a safetensors checkpoint. llama.cpp's converter permutes
the rows of the Llama q/k projections from Hugging Face's rotate_half RoPE layout to its interleaved
one; that permutation is undone here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from plug_jax.models import assets
from plug_jax.models.loading import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_FORMAT = 1  # of the cached metadata: a change reads every file again

# GGUF tensor name -> Hugging Face name (regex groups fill the template).
_TENSOR_NAMES = (
        (r"token_embd\.weight", "model.embed_tokens.weight"),
        (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}"),
        (r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
        (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", "model.layers.{0}.mlp.{1}_proj.weight"),
        (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
        (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
        (r"output_norm\.weight", "model.norm.weight"),
        (r"output\.weight", "lm_head.weight"),
)


def open_reader(path: str | Path) -> gguf.GGUFReader:
    """A (memory-mapped) reader, for the tensors; cached, as parsing the metadata of a 50k-token
    vocabulary takes seconds."""
    try:
        return _open_reader(*_file_key(path))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{Path(path).resolve()}: unreadable GGUF file ({e})") from None


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """(resolved path, mtime in ns, size): what the caches below are keyed by, so that a
    rewritten file is read again."""
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    del mtime_ns, size  # cache keys only
    return gguf.GGUFReader(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata field of a GGUF file as Python values, and its tensors' names under
    "tensor_names". gguf's reader takes seconds to parse a 50k-token vocabulary, which the
    tokenizer and chat template of every run need: what it read is kept as JSON in the user cache
    (assets.cache_dir("gguf")), keyed by the file's path, size and modification time."""
    try:
        key = _file_key(path)
    except OSError as e:
        raise CheckpointError(f"{Path(path).resolve()}: unreadable GGUF file ({e})") from None
    return _read_metadata(*key)


@functools.lru_cache(maxsize=4)
def _read_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    key = hashlib.sha256(f"{path}|{mtime_ns}|{size}|{_FORMAT}".encode()).hexdigest()[:24]
    cached = assets.cache_dir("gguf") / f"{Path(path).stem}-{key}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    reader = open_reader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("GGUF.")}
    fields["tensor_names"] = [tensor.name for tensor in reader.tensors]
    try:  # a cache it cannot write costs the next run time, not this one its result
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(fields))
        partial.replace(cached)
    except OSError:
        pass
    return fields


def undo_rotary_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's q/k permutation.

    Per head, llama.cpp wants rows in interleaved (real, imaginary) pairs [r0, i0, r1, i1, ...];
    Hugging Face keeps the halves apart [r0, r1, ..., i0, i1, ...]. Works for weights and biases.
    """
    rows_per_half = weight.shape[0] // num_heads // 2
    paired = weight.reshape(num_heads, rows_per_half, 2, *weight.shape[1:])
    return paired.swapaxes(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str | None:
    for pattern, template in _TENSOR_NAMES:
        match = re.fullmatch(pattern, gguf_name)
        if match:
            return template.format(*match.groups())
    return None


def read_gguf_config(path: str | Path) -> dict:
    """The Hugging Face style config dict of a GGUF file, from its metadata alone."""
    path = Path(path)
    metadata = read_metadata(path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
                f"{path}: unsupported GGUF architecture {arch!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    tensor_names = set(metadata["tensor_names"])
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(
                f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors) is not supported")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: unsupported RoPE scaling {scaling!r}")

    def required(key: str) -> Any:
        value = metadata.get(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: metadata '{arch}.{key}' is missing")
        return value

    hidden_size = required("embedding_length")
    num_heads = required("attention.head_count")
    num_kv_heads = metadata.get(f"{arch}.attention.head_count_kv", num_heads)
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden_size // num_heads)
    rotary_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise CheckpointError(
                f"{path}: partial rotary embedding ({rotary_dim} of {head_dim} dims) is not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab_size = metadata.get(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab_size is None:
        raise CheckpointError(
                f"{path}: neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens' gives the vocabulary size")
    hf_config = {
            "model_type": arch,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": required("feed_forward_length"),
            "num_hidden_layers": required("block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "rope_theta": metadata.get(f"{arch}.rope.freq_base", 10000.0),
            "rms_norm_eps": required("attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": metadata.get(f"{arch}.context_length"),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensor_names,
            "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    return hf_config


def read_gguf_checkpoint(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(Hugging Face style config dict, {Hugging Face tensor name: float32 array}) of a GGUF file."""
    hf_config = read_gguf_config(path)
    reader = open_reader(path)
    arch = hf_config["model_type"]
    num_heads, num_kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        # GGUF lists dimensions fastest-first; numpy (and Hugging Face) order is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        if arch == "llama" and ".attn_q." in tensor.name:
            weight = undo_rotary_permutation(weight, num_heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            weight = undo_rotary_permutation(weight, num_kv_heads)
        tensors[name] = weight
    return hf_config, tensors
