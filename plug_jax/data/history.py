"""Frozen history embeddings, computed once and cached in a safetensors file.

The history encoder never trains, so every distinct history text is encoded once; training and
evaluation then gather rows, and the history length costs almost nothing per step. The cache file
is keyed by the encoder's identity and the texts' content: new data or another encoder gives a new
file, never a stale one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import safetensors.numpy
from etils import epath
from tqdm import tqdm

from plug_jax import workdir

EncodeFn = Callable[[Sequence[str]], np.ndarray]


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class HistoryTable:
    """Embeddings of distinct history texts, looked up by text."""

    def __init__(self, embeddings: np.ndarray, keys: np.ndarray, path: Path | None = None):
        self.embeddings = embeddings
        self.path = path
        self._row = {bytes(key): row for row, key in enumerate(keys)}

    @property
    def width(self) -> int:
        return self.embeddings.shape[1]

    def __len__(self) -> int:
        return len(self.embeddings)

    def rows(self, history: Sequence[str], max_history: int) -> np.ndarray:
        """Table rows of the most recent `max_history` items, -1 padded: [max_history] int32."""
        rows = np.full((max_history,), -1, np.int32)
        recent = list(history)[-max_history:] if max_history else []
        rows[:len(recent)] = [self._row[_text_key(text)] for text in recent]
        return rows

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[..., H] rows (-1 = none) -> ([..., H, E] f32 vectors, [..., H] bool mask)."""
        mask = rows >= 0
        vectors = self.embeddings[np.where(mask, rows, 0)] if len(self) else \
            np.zeros(rows.shape + (self.width,), np.float32)
        return np.where(mask[..., None], vectors, 0.0).astype(np.float32), mask


def _key_array(keys: Sequence[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)


def encode_texts(texts: Sequence[str], encode: EncodeFn, width: int, batch_size: int = 256,
                 progress: bool = True) -> np.ndarray:
    """[N, width] embeddings of `texts`, in order. They are encoded longest first, `batch_size`
    at a time, so that each chunk holds texts of similar length and the encoder's batches
    (padded to bucketed lengths) carry little padding."""
    order = np.argsort([-len(text) for text in texts], kind="stable")
    out = np.zeros((len(texts), width), np.float32)
    with tqdm(total=len(texts), desc="embedding history", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = np.asarray(encode([texts[i] for i in rows]), np.float32)
            bar.update(len(rows))
    return out


def _read(path: epath.Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(path.read_bytes())


def _write(path: epath.Path, embeddings: np.ndarray, keys: np.ndarray) -> None:
    """Whole or not at all (a temporary file, then a rename): readers never see half a cache."""
    workdir.write_bytes(path, safetensors.numpy.save({"embeddings": embeddings, "keys": keys}))


def cache_path(cache_dir: str | Path, encoder_id: str, texts: Sequence[str]) -> Path:
    digest = hashlib.blake2b(digest_size=12)
    digest.update(encoder_id.encode("utf-8"))
    for text in texts:
        digest.update(_text_key(text))
    return epath.Path(cache_dir) / f"history-{digest.hexdigest()}.safetensors"


def build_history_table(histories: Iterable[Sequence[str]], encode: EncodeFn, width: int,
                        encoder_id: str, cache_dir: str | Path, *, batch_size: int = 256,
                        progress: bool = True) -> HistoryTable:
    """Encodes every distinct history text (or reads the cache) and returns the lookup table."""
    texts = sorted({text for history in histories for text in history})
    path = cache_path(cache_dir, encoder_id, texts)
    if path.exists():
        tensors = _read(path)
        return HistoryTable(tensors["embeddings"], tensors["keys"], path)
    embeddings = encode_texts(texts, encode, width, batch_size, progress)
    keys = _key_array([_text_key(t) for t in texts])
    _write(path, embeddings, keys)
    return HistoryTable(embeddings, keys, path)


class TextEmbeddingCache:
    """Embeddings of single history texts, each encoded once: a user's second request costs no
    encoding, and a new history item costs only its own. With a directory, what is encoded is
    kept on disk (one shard per batch of new texts, under a subdirectory named by the encoder)
    and read back by later processes."""

    def __init__(self, encode: EncodeFn, width: int, encoder_id: str,
                 cache_dir: str | Path | None = None, batch_size: int = 64):
        self.encode, self.width, self.batch_size = encode, width, batch_size
        self.directory = None
        self._vectors: dict[bytes, np.ndarray] = {}
        if cache_dir is not None:
            digest = hashlib.blake2b(encoder_id.encode("utf-8"), digest_size=12).hexdigest()
            self.directory = epath.Path(cache_dir) / f"texts-{digest}"
            for shard in sorted(self.directory.glob("*.safetensors")):
                tensors = _read(shard)
                self._vectors.update(zip(map(bytes, tensors["keys"]), tensors["embeddings"]))

    def __len__(self) -> int:
        return len(self._vectors)

    def table(self, texts: Iterable[str], progress: bool = False) -> HistoryTable:
        """A HistoryTable of these texts, encoding those not seen before."""
        distinct = sorted(set(texts))
        keys = [_text_key(text) for text in distinct]
        missing = [(key, text) for key, text in zip(keys, distinct) if key not in self._vectors]
        if missing:
            new_keys = [key for key, _ in missing]
            embeddings = encode_texts([text for _, text in missing], self.encode, self.width,
                                     self.batch_size, progress)
            self._vectors.update(zip(new_keys, embeddings))
            self._save(_key_array(new_keys), embeddings)
        embeddings = (np.stack([self._vectors[key] for key in keys]) if keys
                      else np.zeros((0, self.width), np.float32))
        return HistoryTable(embeddings, _key_array(keys))

    def _save(self, keys: np.ndarray, embeddings: np.ndarray) -> None:
        if self.directory is None:
            return
        name = hashlib.blake2b(keys.tobytes(), digest_size=12).hexdigest()
        _write(self.directory / f"{name}.safetensors", embeddings, keys)
