"""Tokenizers as one small wrapper over Hugging Face `tokenizers`, with no hub access and no torch.

`Tokenizer.from_gguf` rebuilds a byte-level BPE (GPT-2 style, as SmolLM2 was trained) from a GGUF
file's vocabulary, merges and token types; `Tokenizer.from_tokenizer_json` wraps a tokenizer.json
(BERT WordPiece, T5 Unigram). Chat prompts come from the checkpoint's template (`chat.ChatTemplate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from plug_jax.models.loading import CheckpointError

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer families (GGUF "tokenizer.ggml.pre") that isolate every digit before the GPT-2 split,
# as their original tokenizer.json does (llama.cpp's tokenizer treats them the same way).
_DIGIT_SPLITTING_PRE = ("smollm", "starcoder", "refact", "codeshell")

class Tokenizer:
    """Text <-> ids with the special ids other code needs; padding and truncation are left to callers."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, pad_id: int | None, eos_id: int | None,
                 bos_id: int | None):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.bos_id = bos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Special tokens written in `text` (e.g. "<|im_start|>") are always recognized as such;
        `add_special` adds the template's own (BERT's [CLS]/[SEP], T5's </s>, a BOS where configured)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def encode_batch(self, texts: Sequence[str], add_special: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, *, pad_token: str | None = None,
                            eos_token: str | None = None, bos_token: str | None = None) -> Tokenizer:
        """A tokenizer.json; special tokens not named are looked up among conventional names."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the model's tokenizer)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
            padding = json.loads(path.read_text()).get("padding") or {}
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise CheckpointError(f"{path}: not a tokenizer.json ({' '.join(str(e).split())})"
                                  ) from None

        def find(explicit: str | None, conventional: Sequence[str]) -> int | None:
            for token in ([explicit] if explicit else conventional):
                token_id = tokenizer.token_to_id(token)
                if token_id is not None:
                    return token_id
            if explicit:
                raise CheckpointError(f"{path}: token {explicit!r} is not in the vocabulary")
            return None

        pad_id = find(pad_token, [padding["pad_token"]] if "pad_token" in padding else ["<pad>", "[PAD]"])
        return cls(tokenizer, pad_id=pad_id,
                   eos_id=find(eos_token, ["</s>", "[SEP]", "<|endoftext|>"]),
                   bos_id=find(bos_token, ["<s>", "[CLS]"]))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The byte-level BPE tokenizer stored in a GGUF file (tokenizer.ggml.model == "gpt2")."""
        from plug_jax.models import gguf  # only GGUF users need the gguf package

        metadata = gguf.read_metadata(path)
        kind = metadata.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                    f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges")
        token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)

        bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                         merges=[tuple(merge.split(" ", 1)) for merge in merges], fuse_unk=False)
        tokenizer = tokenizers.Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if metadata.get("tokenizer.ggml.pre") in _DIGIT_SPLITTING_PRE:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                    [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tokenizer.pre_tokenizer = byte_level
        tokenizer.decoder = decoders.ByteLevel()
        typed = list(zip(tokens, token_types))
        tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)
                                      for token, token_type in typed if token_type == _CONTROL])
        tokenizer.add_tokens([tokenizers.AddedToken(token, normalized=False)
                              for token, token_type in typed if token_type == _USER_DEFINED])

        bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
            bos = tokens[bos_id]
            tokenizer.post_processor = processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        pad_id = metadata.get("tokenizer.ggml.padding_token_id", eos_id)
        return cls(tokenizer, pad_id=pad_id, eos_id=eos_id, bos_id=bos_id)
