"""The frozen LLM behind one interface, whatever its family.

`DecoderOnlyLM` (Llama family) and `EncoderDecoderLM` (T5) turn text into fixed-shape arrays on the
host (`featurize`), and compute on device the target-token loss (`loss`) and generations
(`generate`) with or without soft tokens. Soft tokens go where the family needs them: a T5 encoder
sees them first; a decoder-only LLM ignores soft tokens at position 0 (its attention sink), so they
go after the chat header by default, just before the user's text.

Only the training loss runs the LLM in train mode (`loss` with a dropout_rng: config.llm.dropout
on, the weights still frozen); scoring and generation are deterministic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from plug_jax import decode, errors
from plug_jax.models import assets, layers, llama, t5
from plug_jax.models.chat import ChatTemplate
from plug_jax.models.loading import CheckpointError, read_hf_config
from plug_jax.models.tokenizer import Tokenizer

Batch = dict[str, Any]
Cache = dict[str, Any]


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def _example_nll(logits, targets, weights):
    """Per example: cross-entropy summed over weighted target positions, and the weight total."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1)


class _TargetLoss:
    @property
    def dropout_rate(self) -> float:
        return self.module.dropout_rate

    def loss(self, params, soft: jax.Array | None, batch: Batch,
             dropout_rng: jax.Array | None = None):
        """The batch's summed target-token cross-entropy, and its number of target tokens.

        With a dropout_rng the LLM runs in train mode (its dropout on; its weights stay frozen).
        """
        nll, count = self.example_nll(params, soft, batch, dropout_rng)
        return jnp.sum(nll), jnp.sum(count)

    def label_ids(self, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[C, L] ids of each label as a whole answer (ended as the LLM ends answers), and mask."""
        return _pad([self.tokenizer.encode(label) + [self.eos_id] for label in labels],
                    max(len(self.tokenizer.encode(label)) + 1 for label in labels), 0)

    def label_nll(self, params, soft: jax.Array | None, batch: Batch, labels: jax.Array,
                  label_mask: jax.Array) -> jax.Array:
        """[B, C] negative log-likelihood of each label (`label_ids`) as the answer: the prompt is
        run once, then each label's tokens are fed through the cache a token at a time."""
        first_logits, cache = self.prefill(params, soft, batch, labels.shape[1])
        first = jax.nn.log_softmax(first_logits.astype(jnp.float32), axis=-1)
        step = self.tokens_to_logits_fn(params)
        size = first.shape[0]

        def one_label(label_and_mask):
            label, mask = label_and_mask

            def next_token(carry, i):
                step_cache, nll = carry
                logits, step_cache = step(jnp.full((size, 1), label[i], jnp.int32), step_cache)
                logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                return (step_cache, nll - mask[i + 1] * logprobs[:, label[i + 1]]), None

            nll = -first[:, label[0]]
            (_, nll), _ = jax.lax.scan(next_token, (cache, nll), jnp.arange(label.shape[0] - 1))
            return nll

        return jax.lax.map(one_label, (labels, label_mask.astype(jnp.float32))).T


@dataclasses.dataclass(frozen=True, eq=False)
class DecoderOnlyLM(_TargetLoss):
    """A Llama-family chat model: [header][soft tokens][user text + generation prompt][target],
    in the checkpoint's own chat template; the target ends with the template's end-of-turn token."""

    module: llama.Llama
    chat: ChatTemplate
    soft_token_position: str = "after_chat_header"  # or "start"

    def __post_init__(self):
        if self.soft_token_position not in ("after_chat_header", "start"):
            raise errors.ConfigError(f"config.llm.soft_token_position must be 'after_chat_header' or 'start', "
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

    def param_logical_axes(self) -> Any:
        return llama.param_logical_axes(self.module.config)

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

    def _shared_header(self, dropout_rng: jax.Array | None) -> int:
        """How many leading tokens every row shares and runs once: the chat header before the soft
        tokens sees nothing after it, so its keys and values are the same for every row and step.
        0 when the soft tokens go first, or when the header's attention dropout must differ by row."""
        if self.insert_at == 0 or (dropout_rng is not None and self.dropout_rate > 0):
            return 0
        return self.insert_at

    def _header_cache(self, params, batch_size: int, max_length: int) -> Cache:
        """A cache of `max_length` slots holding the chat header, run for one row, broadcast."""
        header = jnp.asarray([self.chat.header_ids], jnp.int32)
        cache = llama.init_cache(self.module.config, 1, max_length, self.module.dtype)
        _, cache = self.module.apply({"params": params}, header, jnp.ones(header.shape, bool),
                                     cache=cache, logit_positions=jnp.zeros((1, 1), jnp.int32))
        return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (batch_size, *leaf.shape[1:])), cache)

    def _run_after_header(self, params, soft: jax.Array | None, batch: Batch, room: int | None,
                          logit_positions: jax.Array, dropout_rng: jax.Array | None = None
                          ) -> tuple[jax.Array, Cache | None]:
        """The LM over [header][soft][rest of the row] with the header run once (`_shared_header`):
        logits at `logit_positions` (slots of the whole row, soft tokens counted); with a `room`,
        the cache, with that many free slots after the row (for decoding)."""
        header = self._shared_header(dropout_rng)
        size, length = batch["tokens"].shape
        prefix = 0 if soft is None else soft.shape[1]
        slots = length + prefix + (room or 0)
        cache = None
        if header:
            cache = self._header_cache(params, size, slots)
        elif room is not None:
            cache = llama.init_cache(self.module.config, size, slots, self.module.dtype)
        logits, cache = self.module.apply(
                {"params": params}, batch["tokens"][:, header:], batch["mask"][:, header:],
                embedded_prefix=soft, insert_at=self.insert_at - header, cache=cache,
                logit_positions=logit_positions - header, **layers.apply_mode(dropout_rng))
        return logits, None if room is None else cache

    def example_nll(self, params, soft: jax.Array | None, batch: Batch,
                    dropout_rng: jax.Array | None = None):
        positions = batch["target_positions"]
        if soft is not None:  # the soft tokens sit before the prompt's user text, so before these
            positions = positions + soft.shape[1]
        logits, _ = self._run_after_header(params, soft, batch, None, positions, dropout_rng)
        return _example_nll(logits, batch["targets"], batch["target_mask"])

    def prefill(self, params, soft: jax.Array | None, batch: Batch,
                max_new_tokens: int) -> tuple[jax.Array, Cache]:
        """Runs right-padded prompts (with soft tokens) into a cache with room for max_new_tokens.

        Returns (logits [B, V] at each prompt's last real slot, cache). Generated tokens then go after
        the padding slots, which stay masked, so every row continues from its own last token.
        """
        prefix = 0 if soft is None else soft.shape[1]
        # The LM head at the last real slot alone: soft tokens sit before it, padding after.
        last = jnp.sum(batch["mask"], axis=1, dtype=jnp.int32) - 1 + prefix
        logits, cache = self._run_after_header(params, soft, batch, max_new_tokens, last[:, None])
        return logits[:, 0], cache

    def tokens_to_logits_fn(self, params) -> Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]:
        """(tokens [B, 1], cache) -> (logits [B, V], cache): one decoding step."""

        def tokens_to_logits(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
            logits, cache = self.module.apply({"params": params}, tokens, jnp.ones(tokens.shape, bool),
                                              cache=cache)
            return logits[:, -1], cache

        return tokens_to_logits

    def generate(self, params, soft: jax.Array | None, batch: Batch, *, method: str,
                 max_new_tokens: int, num_beams: int = 4) -> jax.Array:
        initial_logits, cache = self.prefill(params, soft, batch, max_new_tokens)
        return decode.decode(initial_logits, cache, self.tokens_to_logits_fn(params), method=method,
                             eos_id=self.eos_id, max_new_tokens=max_new_tokens, num_beams=num_beams)


@dataclasses.dataclass(frozen=True, eq=False)
class EncoderDecoderLM(_TargetLoss):
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

    def param_logical_axes(self) -> Any:
        return t5.param_logical_axes(self.module.config)

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

    def example_nll(self, params, soft: jax.Array | None, batch: Batch,
                    dropout_rng: jax.Array | None = None):
        decoder_tokens = t5.shift_right(batch["targets"], self.module.config.decoder_start_token_id)
        logits = self.module.apply({"params": params}, batch["tokens"], batch["mask"], decoder_tokens,
                                   batch["target_mask"], embedded_prefix=soft,
                                   **layers.apply_mode(dropout_rng))
        return _example_nll(logits, batch["targets"], batch["target_mask"])

    def prefill(self, params, soft: jax.Array | None, batch: Batch,
                max_new_tokens: int) -> tuple[jax.Array, Cache]:
        """Encodes soft tokens + prompts once (cross-attention keys/values cached), then runs the
        decoder start token. Returns (its logits [B, V], cache with room for max_new_tokens)."""
        variables = {"params": params}
        encoded, encoder_mask = self.module.apply(variables, batch["tokens"], batch["mask"],
                                                  embedded_prefix=soft, method=t5.T5.encode)
        size = encoded.shape[0]
        cache = t5.init_cache(self.module.config, size, max_new_tokens + 1, self.module.dtype)
        cache = self.module.apply(variables, encoded, cache, method=t5.T5.cache_cross_attention)
        start = jnp.full((size, 1), self.module.config.decoder_start_token_id, jnp.int32)
        return self.tokens_to_logits_fn(params)(start, {**cache, "encoder_mask": encoder_mask})

    def tokens_to_logits_fn(self, params) -> Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]:
        """(tokens [B, 1], cache) -> (logits [B, V], cache): one decoding step."""

        def tokens_to_logits(tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
            mask = cache["encoder_mask"]
            decoder_cache = {k: v for k, v in cache.items() if k != "encoder_mask"}
            logits, decoder_cache = self.module.apply({"params": params}, tokens, None, mask,
                                                      cache=decoder_cache, method=t5.T5.decode)
            return logits[:, -1], {**decoder_cache, "encoder_mask": mask}

        return tokens_to_logits

    def generate(self, params, soft: jax.Array | None, batch: Batch, *, method: str,
                 max_new_tokens: int, num_beams: int = 4) -> jax.Array:
        initial_logits, cache = self.prefill(params, soft, batch, max_new_tokens)
        return decode.decode(initial_logits, cache, self.tokens_to_logits_fn(params), method=method,
                             eos_id=self.eos_id, max_new_tokens=max_new_tokens, num_beams=num_beams)


FrozenLM = DecoderOnlyLM | EncoderDecoderLM


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
    """What config.llm.path names: the model family, its config and tokenizer, and how to read
    its weights ((dtype, shardings or None) -> (config, params)); None where there are none."""

    family: Any  # plug_jax.models.llama or plug_jax.models.t5
    config: Any
    tokenizer: Tokenizer | None
    load: Callable[[Any, Any], tuple[Any, dict]] | None
    chat: ChatTemplate | None = None  # a decoder-only LLM's prompt format


def _random_weights(family, config):
    def load(dtype, shardings):
        params = family.init_params(config, jax.random.key(0), dtype)
        if callable(shardings):
            shardings = shardings(config)
        return config, params if shardings is None else jax.device_put(params, shardings)
    return load


def _find_checkpoint(path: str) -> _Checkpoint:
    """'smollm2' (embedded), a .gguf file, a Hugging Face directory (Llama family or T5), a known
    Flan-T5 name (shapes only), or 'tiny-llama' / 'tiny-t5' (small random models with real
    tokenizers, for smoke tests). CheckpointError when its tokenizer does not fit its model."""
    checkpoint = _find_checkpoint_unchecked(path)
    tokenizer, vocab_size = checkpoint.tokenizer, checkpoint.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"config.llm.path: {path}: the tokenizer has {tokenizer.vocab_size} tokens but the "
            f"model's embedding table only {vocab_size} rows (a tokenizer of another model?)")
    return checkpoint


def _hf_config(family, directory: Path):
    """The family's config of a Hugging Face directory; CheckpointError naming config.json."""
    where = directory / "config.json"
    try:
        return family.from_hf(read_hf_config(directory))
    except KeyError as e:
        raise CheckpointError(f"{where}: field {e} is missing") from None
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(str(directory))
                              else f"{where}: {message.removeprefix('config.json: ')}") from None


def _find_checkpoint_unchecked(path: str) -> _Checkpoint:
    if path == "tiny-llama":
        tokenizer = Tokenizer.from_gguf(assets.smollm2_gguf())
        config = llama.LlamaConfig.tiny(vocab_size=tokenizer.vocab_size, eos_ids=(tokenizer.eos_id,),
                                        bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
        return _Checkpoint(llama, config, tokenizer, _random_weights(llama, config),
                           ChatTemplate.from_gguf(assets.smollm2_gguf(), tokenizer))
    if path == "tiny-t5":
        tokenizer = Tokenizer.from_tokenizer_json(assets.t5_tokenizer_json())
        config = t5.T5Config.tiny(vocab_size=tokenizer.vocab_size)
        return _Checkpoint(t5, config, tokenizer, _random_weights(t5, config))
    location = assets.smollm2_gguf() if path == "smollm2" else Path(path)
    if location.suffix == ".gguf" and location.is_file():
        from plug_jax.models import gguf  # only GGUF users need the gguf package
        tokenizer = Tokenizer.from_gguf(location)
        return _Checkpoint(llama, llama.LlamaConfig.from_hf(gguf.read_gguf_config(location)),
                           tokenizer,
                           lambda dtype, shardings: llama.load_llama(location, dtype, shardings),
                           ChatTemplate.from_gguf(location, tokenizer))
    if location.is_dir():
        hf_config = read_hf_config(location)
        if hf_config.get("model_type") == "t5":
            tokenizer_file = location / "tokenizer.json"
            tokenizer = Tokenizer.from_tokenizer_json(
                tokenizer_file if tokenizer_file.exists() else assets.t5_tokenizer_json())
            return _Checkpoint(t5, _hf_config(t5.T5Config, location), tokenizer,
                               lambda dtype, shardings: t5.load_t5(location, dtype,
                                                                   shardings=shardings))
        config = _hf_config(llama.LlamaConfig, location)  # an unknown architecture stops here
        tokenizer = Tokenizer.from_tokenizer_json(location / "tokenizer.json")
        return _Checkpoint(llama, config, tokenizer,
                           lambda dtype, shardings: llama.load_llama(location, dtype, shardings),
                           ChatTemplate.from_hf_dir(location, tokenizer))
    named = t5.NAMED_CONFIGS.get(path.rstrip("/").rsplit("/", 1)[-1].lower())
    if named is not None:  # the weights are not here: plan with the shapes alone
        return _Checkpoint(t5, named, None, None)
    raise errors.MissingFileError(
        f"config.llm.path: {path} does not exist (a .gguf file or an HF checkpoint directory; "
        f"'smollm2' for the embedded default; names known without weights: "
        f"{', '.join(t5.NAMED_CONFIGS)})")


def _adapter(checkpoint: _Checkpoint, config, llm_config: ml_collections.ConfigDict) -> FrozenLM:
    dtype = DTYPES[llm_config.dtype]
    module_class = llama.Llama if checkpoint.family is llama else t5.T5
    module = module_class(config, dtype=dtype, param_dtype=dtype, remat=bool(llm_config.remat),
                          remat_policy=llm_config.get("remat_policy", ""),
                          dropout_rate=float(llm_config.get("dropout", 0.0)),
                          attention_impl=llm_config.get("attention_impl", ""))
    if checkpoint.family is llama:
        return DecoderOnlyLM(module, checkpoint.chat, llm_config.soft_token_position)
    return EncoderDecoderLM(module, checkpoint.tokenizer)


def build_llm(llm_config: ml_collections.ConfigDict, *, abstract: bool = False, mesh=None,
              rules=()) -> tuple[FrozenLM, Any]:
    """The frozen LLM of `config.llm` and its params: read from the checkpoint (straight into the
    mesh's shardings when there is a mesh) or, `abstract`, as ShapeDtypeStructs with no weights."""
    checkpoint = _find_checkpoint(llm_config.path)
    dtype = DTYPES[llm_config.dtype]
    layers.check_attention_impl(llm_config.get("attention_impl", ""), dtype)
    if abstract:
        return (_adapter(checkpoint, checkpoint.config, llm_config),
                checkpoint.family.abstract_params(checkpoint.config, dtype))
    if checkpoint.load is None:
        raise errors.MissingFileError(f"config.llm.path: {llm_config.path} names a model whose weights "
                                "are not here; point it at a local Hugging Face directory")
    if llm_config.get("attention_impl") == "cudnn" and jax.default_backend() != "gpu":
        raise errors.ConfigError(f"config.llm.attention_impl 'cudnn' needs an NVIDIA GPU; JAX "
                                 f"runs on {jax.default_backend()} here ('' lets JAX choose)")
    shardings = None
    if mesh is not None:  # a function of the config, which the checkpoint may refine (T5's head)
        shardings = lambda config: nn.logical_to_mesh_sharding(
            checkpoint.family.param_logical_axes(config), mesh, [tuple(rule) for rule in rules])
    config, params = checkpoint.load(dtype, shardings)
    return _adapter(checkpoint, config, llm_config), params


def load_llm(path: str, dtype: str = "float32", soft_token_position: str = "after_chat_header",
             remat: bool = False, mesh=None, rules=()) -> tuple[FrozenLM, dict]:
    """`build_llm` from keyword arguments rather than a config section."""
    return build_llm(ml_collections.ConfigDict(dict(
        path=path, dtype=jnp.dtype(dtype).name, soft_token_position=soft_token_position,
        remat=remat)), mesh=mesh, rules=rules)
