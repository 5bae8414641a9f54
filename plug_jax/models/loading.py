"""Loading pretrained weights into Flax parameter trees, without PyTorch.

Each model family declares one table of rules `(our_path_regex, source_name_template, transform)`.
For every leaf of the model's abstract parameter tree (from `jax.eval_shape`), the first rule whose
regex matches the leaf's path names the tensor to read (regex groups fill the template) and the
transform (a transpose, a reshape) that turns it into our layout. Tensors are read lazily: the
safetensors reader memory-maps the files, so a transform that returns a view and a sharded load
that slices it only touch the bytes each device holds.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from plug_jax import errors

Transform = Callable[[np.ndarray], np.ndarray]
Rule = tuple[str, str, Transform | None]


class CheckpointError(errors.UserError):
    """A checkpoint that cannot be loaded; the message is one line naming file and tensor."""


class TensorSource(Protocol):
    """Named tensors, read on demand."""

    def __contains__(self, name: str) -> bool: ...

    def read(self, name: str) -> np.ndarray: ...

    def describe(self) -> str: ...


# ---------------------------------------------------------------------------------------------
# Transforms: torch Linear stores [out, in]; Flax Dense kernels are [in, out].


def transpose(x: np.ndarray) -> np.ndarray:
    return x.T


# ---------------------------------------------------------------------------------------------
# Safetensors, read with our own small parser so that bf16 and memory-mapping work with numpy.

_SAFETENSORS_DTYPES = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
}


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
        (header_len,) = struct.unpack("<Q", raw_len)
        size = path.stat().st_size
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or not safetensors (a {header_len}-byte "
                                  f"header in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not an object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            itemsize = np.dtype(_SAFETENSORS_DTYPES.get(info["dtype"], np.uint8)).itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}': malformed header entry") from None
        if not 0 <= begin <= end or 8 + header_len + end > size:
            raise CheckpointError(f"{path}: tensor '{name}' lies past the end of the file "
                                  f"(truncated? {size} bytes)")
        if info["dtype"] in _SAFETENSORS_DTYPES and end - begin != count * itemsize:
            raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes for shape "
                                  f"{info['shape']} of {info['dtype']}")
    return header, 8 + header_len


class SafetensorsSource:
    """Tensors of a Hugging Face checkpoint directory: `model.safetensors` or a sharded index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: unreadable (invalid JSON or no weight_map)"
                                      ) from None
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [single.name]
        else:
            raise CheckpointError(
                    f"{self.directory}: no model.safetensors or model.safetensors.index.json "
                    "(PyTorch .bin checkpoints are not read: convert them to safetensors)")
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{path}: missing (listed in model.safetensors.index.json)")
            header, data_start = _read_safetensors_header(path)
            for tensor_name, info in header.items():
                self._entries[tensor_name] = (path, info, data_start)
        self._memmaps: dict[Path, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def read(self, name: str) -> np.ndarray:
        path, info, data_start = self._entries[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        if path not in self._memmaps:
            self._memmaps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._memmaps[path][data_start + begin:data_start + end]
        return raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])

    def describe(self) -> str:
        return str(self.directory)


class DictSource:
    """In-memory tensors (converted checkpoints such as GGUF, and tests)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], description: str):
        self.tensors = dict(tensors)
        self.description = description

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def describe(self) -> str:
        return self.description


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint directory needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}") from None


# ---------------------------------------------------------------------------------------------


def _resolve(rules: Sequence[Rule], path: str) -> tuple[str, Transform | None]:
    for pattern, template, transform in rules:
        match = re.fullmatch(pattern, path)
        if match:
            return template.format(*match.groups()), transform
    raise CheckpointError(f"no loading rule for parameter '{path}' (add one to the family's table)")


def load_params(
        abstract_params: Mapping,
        source: TensorSource,
        rules: Sequence[Rule],
        dtype=None,
        shardings: Mapping | None = None,
) -> dict:
    """Fills `abstract_params` (a tree of ShapeDtypeStructs) from `source` through `rules`.

    Each tensor is cast straight to `dtype` (default: the abstract leaf's dtype). With `shardings`
    (a tree of jax.sharding.Sharding matching the params), each device's slice is read on its own.
    """
    flat = traverse_util.flatten_dict(abstract_params, sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings else {}
    loaded = {}
    for path, leaf in flat.items():
        name, transform = _resolve(rules, path)
        if name not in source:
            raise CheckpointError(f"{source.describe()}: tensor '{name}' is missing (needed for '{path}')")
        stored = source.read(name)
        view = transform(stored) if transform is not None else stored
        if tuple(view.shape) != tuple(leaf.shape):
            how = f" ({transform.__name__}: {tuple(view.shape)})" if transform else ""
            raise CheckpointError(
                f"{source.describe()}: tensor '{name}' has shape {tuple(stored.shape)}{how}, "
                f"but '{path}' needs {tuple(leaf.shape)}")
        target = np.dtype(dtype or leaf.dtype)
        if path in flat_shardings:
            loaded[path] = jax.make_array_from_callback(
                    leaf.shape, flat_shardings[path],
                    lambda index, view=view: np.asarray(view[index], dtype=target))
        else:
            loaded[path] = jnp.asarray(np.asarray(view, dtype=target))
    return traverse_util.unflatten_dict(loaded, sep="/")
