"""A checkpoint's own chat template: its prompt for one user turn, split where soft tokens go.

The template is the Jinja source shipped with the checkpoint (tokenizer_config.json or
chat_template.jinja of a Hugging Face directory, `tokenizer.chat_template` of a GGUF file), rendered
the way transformers' `apply_chat_template` renders it: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, `raise_exception`, `bos_token`/`eos_token`. As there, the rendered text is
tokenized without adding special tokens, so BOS appears once, exactly where the template writes it.

The prompt for one user turn is rendered once with a placeholder for the user's text and split
there; the user's text goes in verbatim (a template that trims message contents sees it untrimmed).
The header's ids are fixed, so soft tokens always go at the same position; the rest is tokenized in
the context of the whole prompt, so the ids equal those of apply_chat_template(..., tokenize=True).

A checkpoint without a chat template (a base model) gets a plain prompt: BOS when its tokenizer adds
one, then the user's text, no chat markup; its answer ends with EOS.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from plug_jax.models.tokenizer import Tokenizer

# Stands for the user's (or assistant's) text while rendering; never altered by templates' strip/trim.
_USER_SENTINEL = "\ue000PLUG-USER-TEXT\ue001"
_ANSWER_SENTINEL = "\ue000PLUG-ANSWER\ue001"
# Typical first words, to find where a header's trailing text merges into the user's first token.
_PROBE_WORDS = ("Hello", "a", "the", "What", "1", "?")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def _token_text(token: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class ChatTemplate:
    """One checkpoint's prompt format over its tokenizer.

    `header_ids` precede the soft tokens; `body_ids(text)` follow them (the user's text, the end of
    the user turn and the generation prompt); the answer ends with `end_of_turn_id`.
    """

    def __init__(self, tokenizer: Tokenizer, source: str | None, *, bos_token: str | None,
                 eos_token: str | None, eos_ids: Sequence[int] = (), add_bos: bool | None = None):
        """`eos_ids`: the generation config's, when `eos_token` is unset; `add_bos`: whether a plain
        (template-less) prompt starts with BOS, by default whether the tokenizer adds one."""
        self.tokenizer = tokenizer
        self._add_bos = add_bos
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
        token_eos = None if eos_token is None else tokenizer.token_to_id(eos_token)
        self.eos_id = token_eos if token_eos is not None else next(iter(eos_ids), tokenizer.eos_id)
        self._header, self._rest = self._user_turn()
        self.header_ids, self._header_covered = self._stable_header()
        self.end_of_turn_id = self._end_of_turn()

    # -- construction from a checkpoint

    @classmethod
    def from_checkpoint(cls, path: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
        """A .gguf file or a Hugging Face directory."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path, tokenizer)
        return cls.from_hf_dir(path, tokenizer)

    @classmethod
    def from_hf_dir(cls, directory: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
        directory = Path(directory)
        config = _read_json(directory / "tokenizer_config.json")
        special = {**_read_json(directory / "special_tokens_map.json"), **config}
        jinja_file = directory / "chat_template.jinja"  # transformers >= 4.50 writes it apart
        source = jinja_file.read_text() if jinja_file.exists() else config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = {t["name"]: t["template"] for t in source}.get("default")
        eos_ids = _read_json(directory / "generation_config.json").get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids or []
        return cls(tokenizer, source, bos_token=_token_text(special.get("bos_token")),
                   eos_token=_token_text(special.get("eos_token")), eos_ids=eos_ids,
                   add_bos=config.get("add_bos_token"))

    @classmethod
    def from_gguf(cls, path: str | Path, tokenizer: Tokenizer) -> ChatTemplate:
        from plug_jax.models import gguf  # only GGUF users need the gguf package

        metadata = gguf.read_metadata(path)
        tokens = metadata.get("tokenizer.ggml.tokens")
        bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        return cls(tokenizer, metadata.get("tokenizer.chat_template"),
                   bos_token=None if bos_id is None else tokens[bos_id],
                   eos_token=None if eos_id is None else tokens[eos_id],
                   add_bos=metadata.get("tokenizer.ggml.add_bos_token"))

    # -- rendering

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The text `apply_chat_template(messages, tokenize=False, ...)` gives."""
        if self.source is None:
            bos = self.bos_token if self.bos_id is not None and self._adds_bos() else ""
            return bos + "".join(message["content"] for message in messages)
        return _compile(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def prompt(self, user_text: str) -> str:
        return self.render([{"role": "user", "content": user_text}])

    def _adds_bos(self) -> bool:
        if self._add_bos is not None:
            return bool(self._add_bos)
        return self.tokenizer.encode("", add_special=True)[:1] == [self.bos_id]

    def _user_turn(self) -> tuple[str, str]:
        """(text before the user's text, text after it), the template's default system turn included."""
        rendered = self.prompt(_USER_SENTINEL)
        if rendered.count(_USER_SENTINEL) != 1:
            raise ValueError("chat template: the user's text must appear once in its prompt")
        header, rest = rendered.split(_USER_SENTINEL)
        return header, rest

    def _stable_header(self) -> tuple[list[int], int]:
        """The header's ids that stay the same whatever the user writes, and how many of its
        characters they cover: its tail goes with the user's text when the tokenizer merges it into
        the first word (e.g. the space of Llama 2's "[INST] ")."""
        joints = [self._encode(self._header + word) for word in _PROBE_WORDS]
        kept = min(sum(1 for _, end in joint.offsets if end <= len(self._header)) for joint in joints)
        ids, end = joints[0].ids[:kept], (joints[0].offsets[kept - 1][1] if kept else 0)
        stable = all(joint.ids[:kept] == ids for joint in joints)
        if stable and ids == self.tokenizer.encode(self._header[:end]):
            return ids, end
        return self.tokenizer.encode(self._header), len(self._header)

    def _encode(self, text: str):
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=False)

    def _end_of_turn(self) -> int | None:
        """The first added token after an assistant answer (<|im_end|>, <|eot_id|>, </s>), else EOS."""
        if self.source is None:
            return self.eos_id
        try:
            rendered = self.render([{"role": "user", "content": _USER_SENTINEL},
                                    {"role": "assistant", "content": _ANSWER_SENTINEL}],
                                   add_generation_prompt=False)
        except jinja2.exceptions.TemplateError:
            return self.eos_id
        if _ANSWER_SENTINEL not in rendered:
            return self.eos_id
        after = rendered.split(_ANSWER_SENTINEL, 1)[1]
        added = self.tokenizer.tokenizer.get_added_tokens_decoder()
        return next((i for i in self.tokenizer.encode(after) if i in added), self.eos_id)

    # -- ids

    def body_ids(self, user_text: str, max_user_tokens: int) -> list[int]:
        """The user's text (its first `max_user_tokens` tokens), the end of the turn and the
        generation prompt, tokenized in the context of the whole prompt, as apply_chat_template does."""
        header, skip = self._header, len(self.header_ids)
        encoding = self._encode(header + user_text + self._rest)
        if encoding.ids[:skip] != self.header_ids:  # the text merges into the header: tokenize apart
            header = header[self._header_covered:]
            encoding, skip = self._encode(header + user_text + self._rest), 0
        user_end = len(header) + len(user_text)
        user_count = sum(1 for start, _ in encoding.offsets[skip:] if start < user_end)
        ids = encoding.ids[skip:]
        return ids[:min(user_count, max_user_tokens)] + ids[user_count:]

    def prompt_ids(self, user_text: str, max_user_tokens: int = 1 << 30) -> list[int]:
        return self.header_ids + self.body_ids(user_text, max_user_tokens)
