"""The frozen LLM behind one interface, whatever its family.

`DecoderOnlyLM` (Llama family) and `EncoderDecoderLM` (T5) turn text into fixed-shape arrays on the
host (`featurize`), and compute on device the target-token loss (`loss`) and generations
(`generate`) with or without soft tokens. Soft tokens go where the family needs them: a T5 encoder
sees them first; a decoder-only LLM ignores soft tokens at position 0 (its attention sink), so they
go after the chat header by default, just before the user's text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from plug_jax import decode
from plug_jax.models import assets, llama, t5
from plug_jax.models.chat import ChatTemplate
from plug_jax.models.tokenizer import Tokenizer

Batch = dict[str, Any]


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def _token_loss(logits, targets, weights):
    """Summed cross-entropy over weighted target positions, and the weight total."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderOnlyLM:
    """A Llama-family chat model: [header][soft tokens][user text + generation prompt][target],
    in the checkpoint's own chat template; the target ends with the template's end-of-turn token."""

    module: llama.Llama
    chat: ChatTemplate
    soft_token_position: str = "after_chat_header"  # or "start"

    def __post_init__(self):
        if self.soft_token_position not in ("after_chat_header", "start"):
            raise ValueError(f"config.llm.soft_token_position must be 'after_chat_header' or 'start', "
                             f"got {self.soft_token_position!r}")
        if self.chat.end_of_turn_id is None:
            raise ValueError("the LLM's tokenizer has no end-of-turn or EOS token to end answers with")

    @property
    def tokenizer(self) -> Tokenizer:
        return self.chat.tokenizer

    @property
    def width(self) -> int:
        return self.module.config.hidden_size

    @property
    def eos_id(self) -> int:
        return self.chat.end_of_turn_id

    @property
    def insert_at(self) -> int:
        return len(self.chat.header_ids) if self.soft_token_position == "after_chat_header" else 0

    def embedding_table(self, params) -> jax.Array:
        return params["embed_tokens"]["embedding"]

    def _prompt_ids(self, text: str, max_input_tokens: int) -> list[int]:
        return self.chat.prompt_ids(text, max_input_tokens)

    def prompt_lengths(self, inputs: Sequence[str], max_input_tokens: int) -> list[int]:
        return [len(self._prompt_ids(text, max_input_tokens)) for text in inputs]

    def sequence_length(self, longest_prompt: int, max_target_tokens: int, with_targets: bool) -> int:
        """The answer and its end-of-turn token follow the prompt in the same sequence."""
        return longest_prompt + (max_target_tokens + 1 if with_targets else 0)

    def featurize(self, inputs: Sequence[str], targets: Sequence[str] | None, *, max_input_tokens: int,
                  max_target_tokens: int, length: int) -> dict[str, np.ndarray]:
        """Right-padded [prompt + target + end-of-turn] ids; loss weights on the target part.

        Without targets: the prompts alone (for generation).
        """
        rows, answers, starts = [], [], []
        for i, text in enumerate(inputs):
            prompt = self._prompt_ids(text, max_input_tokens)
            answer = [] if targets is None else (
                self.tokenizer.encode(targets[i])[:max_target_tokens] + [self.eos_id])
            rows.append((prompt + answer)[:length])
            answers.append(answer[:max(0, length - len(prompt))])
            starts.append(len(prompt) - 1)  # the slot whose logits predict the answer's first token
        tokens, mask = _pad(rows, length, self.tokenizer.pad_id or 0)
        features = {"tokens": tokens, "mask": mask}
        if targets is not None:
            span = max_target_tokens + 1
            features["targets"], features["target_mask"] = _pad(answers, span, 0)
            features["target_positions"] = np.minimum(
                np.asarray(starts, np.int32)[:, None] + np.arange(span, dtype=np.int32), length - 1)
        return features

    def loss(self, params, soft: jax.Array | None, batch: Batch):
        positions = batch["target_positions"]
        if soft is not None:  # the soft tokens sit before the prompt's user text, so before these
            positions = positions + soft.shape[1]
        logits, _ = self.module.apply({"params": params}, batch["tokens"], batch["mask"],
                                      embedded_prefix=soft, insert_at=self.insert_at,
                                      logit_positions=positions)
        return _token_loss(logits, batch["targets"], batch["target_mask"])

    def generate(self, params, soft: jax.Array | None, batch: Batch, *, method: str,
                 max_new_tokens: int, num_beams: int = 4) -> jax.Array:
        initial_logits, cache = llama.prefill(self.module, params, batch["tokens"], batch["mask"],
                                              max_new_tokens, embedded_prefix=soft,
                                              insert_at=self.insert_at)
        tokens_to_logits = llama.tokens_to_logits_fn(self.module, params)
        return decode.decode(initial_logits, cache, tokens_to_logits, method=method,
                             eos_id=self.eos_id, max_new_tokens=max_new_tokens, num_beams=num_beams)


@dataclasses.dataclass(frozen=True, eq=False)
class EncoderDecoderLM:
    """T5: soft tokens, then the input, enter the encoder; the decoder produces the target."""

    module: t5.T5
    tokenizer: Tokenizer

    @property
    def width(self) -> int:
        return self.module.config.d_model

    @property
    def eos_id(self) -> int:
        return self.module.config.eos_token_id

    def embedding_table(self, params) -> jax.Array:
        return params["token_embedder"]["embedding"]

    def prompt_lengths(self, inputs: Sequence[str], max_input_tokens: int) -> list[int]:
        return [min(len(self.tokenizer.encode(t)), max_input_tokens - 1) + 1 for t in inputs]

    def sequence_length(self, longest_prompt: int, max_target_tokens: int, with_targets: bool) -> int:
        """The encoder sees the prompt alone; targets have their own arrays."""
        del max_target_tokens, with_targets
        return longest_prompt

    def featurize(self, inputs: Sequence[str], targets: Sequence[str] | None, *, max_input_tokens: int,
                  max_target_tokens: int, length: int) -> dict[str, np.ndarray]:
        eos = self.eos_id
        rows = [self.tokenizer.encode(t)[:min(max_input_tokens, length) - 1] + [eos] for t in inputs]
        tokens, mask = _pad(rows, length, self.tokenizer.pad_id or 0)
        features = {"tokens": tokens, "mask": mask}
        if targets is not None:
            answers = [self.tokenizer.encode(t)[:max_target_tokens - 1] + [eos] for t in targets]
            features["targets"], features["target_mask"] = _pad(answers, max_target_tokens,
                                                                 self.tokenizer.pad_id or 0)
        return features

    def loss(self, params, soft: jax.Array | None, batch: Batch):
        decoder_tokens = t5.shift_right(batch["targets"], self.module.config.decoder_start_token_id)
        logits = self.module.apply({"params": params}, batch["tokens"], batch["mask"], decoder_tokens,
                                   batch["target_mask"], embedded_prefix=soft)
        return _token_loss(logits, batch["targets"], batch["target_mask"])

    def generate(self, params, soft: jax.Array | None, batch: Batch, *, method: str,
                 max_new_tokens: int, num_beams: int = 4) -> jax.Array:
        variables = {"params": params}
        encoded, encoder_mask = self.module.apply(variables, batch["tokens"], batch["mask"],
                                                  embedded_prefix=soft, method=t5.T5.encode)
        size = encoded.shape[0]
        cache = t5.init_cache(self.module.config, size, max_new_tokens + 1, self.module.dtype)
        cache = self.module.apply(variables, encoded, cache, method=t5.T5.cache_cross_attention)
        cache = {**cache, "encoder_mask": encoder_mask}

        def tokens_to_logits(step_tokens, step_cache):
            mask = step_cache["encoder_mask"]
            decoder_cache = {k: v for k, v in step_cache.items() if k != "encoder_mask"}
            logits, decoder_cache = self.module.apply(variables, step_tokens, None, mask,
                                                      cache=decoder_cache, method=t5.T5.decode)
            return logits[:, -1], {**decoder_cache, "encoder_mask": mask}

        start = jnp.full((size, 1), self.module.config.decoder_start_token_id, jnp.int32)
        initial_logits, cache = tokens_to_logits(start, cache)
        return decode.decode(initial_logits, cache, tokens_to_logits, method=method,
                             eos_id=self.eos_id, max_new_tokens=max_new_tokens, num_beams=num_beams)


FrozenLM = DecoderOnlyLM | EncoderDecoderLM


def _tiny_llama(dtype, soft_token_position, remat):
    tokenizer = Tokenizer.from_gguf(assets.smollm2_gguf())
    config = llama.LlamaConfig.tiny(vocab_size=tokenizer.vocab_size, eos_ids=(tokenizer.eos_id,),
                                    bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    params = llama.init_params(config, jax.random.key(0), dtype)
    module = llama.Llama(config, dtype=dtype, param_dtype=dtype, remat=remat)
    return DecoderOnlyLM(module, ChatTemplate.from_gguf(assets.smollm2_gguf(), tokenizer),
                         soft_token_position), params


def _tiny_t5(dtype, soft_token_position, remat):
    del soft_token_position  # the encoder sees soft tokens first
    tokenizer = Tokenizer.from_tokenizer_json(assets.t5_tokenizer_json())
    config = t5.T5Config.tiny(vocab_size=tokenizer.vocab_size)
    module = t5.T5(config, dtype=dtype, param_dtype=dtype, remat=remat)
    params = t5.init_params(config, jax.random.key(0), dtype)
    # At the default std 0.02 a random T5 is near the identity and its decoder hardly sees the
    # encoder (nor the soft tokens); std 0.2, as the tiny Llama, makes every part matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 10 if path[-1].key == "kernel" else x, params)
    return EncoderDecoderLM(module, tokenizer), params


TINY_MODELS = {"tiny-llama": _tiny_llama, "tiny-t5": _tiny_t5}


def param_shardings(family, mesh, rules) -> Callable[[Any], Any] | None:
    """config -> NamedShardings of the family's parameters (None without a mesh)."""
    if mesh is None:
        return None
    return lambda config: nn.logical_to_mesh_sharding(family.param_logical_axes(config), mesh,
                                                      [tuple(rule) for rule in rules])


def load_llm(path: str, dtype=jnp.float32, soft_token_position: str = "after_chat_header",
             remat: bool = False, mesh=None, rules=()) -> tuple[FrozenLM, dict]:
    """'smollm2' (embedded), a .gguf file, or a Hugging Face directory (Llama family or T5).

    'tiny-llama' and 'tiny-t5' are small random models with real tokenizers, for smoke tests.
    """
    if path in TINY_MODELS:
        lm, params = TINY_MODELS[path](dtype, soft_token_position, remat)
        family = llama if isinstance(lm, DecoderOnlyLM) else t5
        shardings = param_shardings(family, mesh, rules)
        return lm, params if shardings is None else jax.device_put(params,
                                                                   shardings(lm.module.config))
    if path == "smollm2":
        path = str(assets.smollm2_gguf())
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"config.llm.path: {path} does not exist (a .gguf file or an HF "
                                "checkpoint directory; 'smollm2' for the embedded default)")
    if location.suffix == ".gguf":
        config, params = llama.load_llama(location, dtype, param_shardings(llama, mesh, rules))
        chat = ChatTemplate.from_gguf(location, Tokenizer.from_gguf(location))
        return DecoderOnlyLM(llama.Llama(config, dtype=dtype, param_dtype=dtype, remat=remat), chat,
                             soft_token_position), params
    from plug_jax.models.loading import read_hf_config
    model_type = read_hf_config(location).get("model_type")
    if model_type == "t5":
        config, params = t5.load_t5(location, dtype, shardings=param_shardings(t5, mesh, rules))
        tokenizer_file = location / "tokenizer.json"
        if not tokenizer_file.exists():
            tokenizer_file = assets.t5_tokenizer_json()
        return EncoderDecoderLM(t5.T5(config, dtype=dtype, param_dtype=dtype, remat=remat),
                                Tokenizer.from_tokenizer_json(tokenizer_file)), params
    config, params = llama.load_llama(location, dtype, param_shardings(llama, mesh, rules))
    tokenizer = Tokenizer.from_tokenizer_json(location / "tokenizer.json")
    chat = ChatTemplate.from_hf_dir(location, tokenizer)
    return DecoderOnlyLM(llama.Llama(config, dtype=dtype, param_dtype=dtype, remat=remat), chat,
                         soft_token_position), params
