"""Llama-family decoders (Llama 2/3, Mistral, Qwen2, SmolLM2): the frozen LLM that PPlug personalizes.

Soft tokens from the user embedder are spliced into the embedded input after the first `insert_at`
tokens. A decoder-only LLM parks surplus attention on position 0 (the attention sink), so soft
tokens placed there are largely ignored; PPlug puts them after the chat header instead.

Positions are `cumsum(mask) - 1`, so padding anywhere (also between the prompt and the soft tokens
or in the middle of a right-padded batch) neither shifts RoPE nor is attended to.

Dropout: `dropout_rate` drops attention probabilities (HF's attention_dropout, the only dropout
HF's Llama has) in calls with deterministic=False and a 'dropout' rng; never in decoding.

Not implemented: sliding-window attention (Mistral v0.1's window is ignored: exact up to 4096
tokens), RoPE scaling other than Llama 3.1's, and MLP biases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from plug_jax.models import layers, loading
from plug_jax.models.layers import RMSNorm, constrain, dot_product_attention, mask_to_bias
from plug_jax.models.loading import CheckpointError

Dtype = Any
Cache = dict[str, Any]

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Llama 3.1 "llama3" rope scaling: (factor, low_freq_factor, high_freq_factor, original_context).
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2, Llama with attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama with attention_bias; not Qwen2)
    initializer_range: float = 0.02
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int | None = None

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """From a Hugging Face config.json dict (transformers 4 or 5 rope layout)."""
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        known_architecture = bool(set(architectures) & set(_SUPPORTED_ARCHITECTURES))
        if model_type not in _SUPPORTED_MODEL_TYPES and not known_architecture:
            raise CheckpointError(
                    f"unsupported architecture model_type={model_type!r} architectures={architectures} "
                    f"(Llama family reads {', '.join(_SUPPORTED_MODEL_TYPES)})")
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act {config['hidden_act']!r} (Llama family uses silu)")
        if config.get("mlp_bias"):
            raise CheckpointError("unsupported mlp_bias=True")
        if config.get("use_sliding_window"):  # Qwen2's switch; Mistral's window is ignored (see module doc)
            raise CheckpointError("unsupported use_sliding_window=True")

        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3_scaling = None
        if rope_type == "llama3":
            llama3_scaling = (float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        elif rope_type != "default":
            raise CheckpointError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")

        num_heads = config["num_attention_heads"]
        is_qwen2 = model_type == "qwen2" or "Qwen2ForCausalLM" in architectures
        llama_bias = bool(config.get("attention_bias", False))
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=config.get("num_key_value_heads") or num_heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
                rope_theta=float(rope_theta),
                rope_llama3_scaling=llama3_scaling,
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=is_qwen2 or llama_bias,
                attention_out_bias=llama_bias and not is_qwen2,
                initializer_range=float(config.get("initializer_range", 0.02)),
                bos_id=config.get("bos_token_id"),
                eos_ids=eos_ids,
                pad_id=config.get("pad_token_id"),
        )

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A few-thousand-parameter model for tests: GQA, untied head, weights large enough to matter."""
        fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
                      initializer_range=0.2, bos_id=1, eos_ids=(2,), pad_id=0)
        return cls(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# Rotary position embedding, Hugging Face "rotate_half" layout: the two halves of each head are
# the (real, imaginary) parts, rather than llama.cpp's interleaved pairs.


def rotary_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """[head_dim // 2] float32 angular frequencies, with Llama 3.1 scaling where configured."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
    inv_freq = (1.0 / np.float32(config.rope_theta) ** exponents).astype(np.float32)
    if config.rope_llama3_scaling is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, original_context = config.rope_llama3_scaling
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_band, interpolated, scaled).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [batch, length, heads, head_dim]; positions: [batch, length]. Computed in f32."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""  # layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x, positions, bias, kv_cache: Cache | None = None, write_index=None,
                 deterministic: bool = True):
        cfg = self.config
        batch, length, _ = x.shape
        dense = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.normal(cfg.initializer_range))
        q_features, kv_features = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q = dense(q_features, ("embed", "q_heads"), use_bias=cfg.attention_bias, name="q_proj")(x)
        k = dense(kv_features, ("embed", "kv_heads"), use_bias=cfg.attention_bias, name="k_proj")(x)
        v = dense(kv_features, ("embed", "kv_heads"), use_bias=cfg.attention_bias, name="v_proj")(x)
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = rotary_inverse_frequencies(cfg)
        q = constrain(apply_rotary(q, positions, inv_freq), ("batch", "length", "heads", "kv"))
        k = apply_rotary(k, positions, inv_freq)

        new_kv_cache = None
        if kv_cache is not None:
            start = (0, write_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
            new_kv_cache = {"k": k, "v": v}
        out = dot_product_attention(
                q, k.astype(self.dtype), v.astype(self.dtype), bias, scale=cfg.head_dim ** -0.5,
                impl=self.attention_impl,
                weights_dropout=layers.training_dropout(nn.Dropout(self.dropout_rate),
                                                        deterministic))
        out = constrain(out, ("batch", "length", "heads", "kv"))
        out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        out = dense(cfg.hidden_size, ("q_heads", "embed"), use_bias=cfg.attention_out_bias,
                    name="o_proj")(out)
        return out, new_kv_cache


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.normal(cfg.initializer_range))
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj")(x)
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj")(hidden)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    attention_impl: str = ""

    @nn.compact
    def __call__(self, x, positions, bias, kv_cache: Cache | None = None, write_index=None,
                 deterministic: bool = True):
        cfg = self.config
        norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        attention = Attention(cfg, self.dtype, self.param_dtype, dropout_rate=self.dropout_rate,
                              attention_impl=self.attention_impl, name="self_attn")
        attended, new_kv_cache = attention(norm(name="input_layernorm")(x), positions, bias,
                                           kv_cache, write_index, deterministic)
        x = constrain(x + attended, ("batch", "length", "embed"))
        x = x + Mlp(cfg, self.dtype, self.param_dtype, name="mlp")(norm(name="post_attention_layernorm")(x))
        return constrain(x, ("batch", "length", "embed")), new_kv_cache


def splice_prefix(x: jax.Array, mask: jax.Array, embedded_prefix: jax.Array,
                  prefix_mask: jax.Array | None, insert_at: int) -> tuple[jax.Array, jax.Array]:
    """Inserts `embedded_prefix` [B, P, D] after the first `insert_at` positions of x [B, T, D]."""
    if prefix_mask is None:
        prefix_mask = jnp.ones(embedded_prefix.shape[:2], bool)
    x = jnp.concatenate([x[:, :insert_at], embedded_prefix.astype(x.dtype), x[:, insert_at:]], axis=1)
    mask = jnp.concatenate([mask[:, :insert_at], prefix_mask.astype(bool), mask[:, insert_at:]], axis=1)
    return x, mask


class Llama(nn.Module):
    """Decoder-only LM. Returns float32 logits for every input slot (soft tokens included)."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialize each layer in the backward pass (saves activation memory)
    remat_policy: str = ""  # what a rematerialized layer keeps (layers.REMAT_POLICIES)
    dropout_rate: float = 0.0  # of the attention probabilities, with deterministic=False
    attention_impl: str = ""  # how attention runs (layers.ATTENTION_IMPLS)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, *, embedded_prefix: jax.Array | None = None,
                 prefix_mask: jax.Array | None = None, insert_at: int = 0,
                 cache: Cache | None = None, logit_positions: jax.Array | None = None,
                 deterministic: bool = True) -> tuple[jax.Array, Cache | None]:
        """tokens, mask: [B, T]; embedded_prefix: [B, P, D] spliced after token `insert_at - 1`.

        Returns (logits [B, T + P, V], new_cache). With `cache` (from `init_cache`), the inputs are
        written at slot `cache["index"]` and attend to everything cached before them.
        `logit_positions` [B, K] (slots, soft tokens counted) limits the LM head to those slots,
        giving logits [B, K, V]: training needs only the target's, and the head is a large matmul.
        """
        cfg = self.config
        embed = nn.Embed(
                cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
                name="embed_tokens")
        x = embed(tokens)
        mask = mask.astype(bool)
        if embedded_prefix is not None:
            if not 0 <= insert_at <= tokens.shape[1]:
                raise ValueError(f"insert_at={insert_at} is outside the {tokens.shape[1]} input tokens")
            x, mask = splice_prefix(x, mask, embedded_prefix, prefix_mask, insert_at)
        x = constrain(x, ("batch", "length", "embed"))
        length = x.shape[1]

        valid_so_far = jnp.cumsum(mask, axis=1, dtype=jnp.int32)
        positions = jnp.maximum(valid_so_far - 1, 0)  # padding slots borrow a neighbour's; never attended
        if cache is None:
            write_index = None
            key_mask = mask
            causal = jnp.tril(jnp.ones((length, length), bool))
        else:
            positions = positions + cache["position"][:, None]
            write_index = cache["index"][0]
            key_mask = jax.lax.dynamic_update_slice(cache["key_mask"], mask, (0, write_index))
            query_slots = write_index + jnp.arange(length)
            causal = jnp.arange(key_mask.shape[1])[None, :] <= query_slots[:, None]
        bias = mask_to_bias(causal[None] & key_mask[:, None, :])

        new_layer_caches = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            layer_cls = (layers.remat(DecoderLayer, self.remat_policy, static_argnums=(6,))
                         if self.remat else DecoderLayer)
            x, new_layer_cache = layer_cls(cfg, self.dtype, self.param_dtype,
                                           dropout_rate=self.dropout_rate,
                                           attention_impl=self.attention_impl,
                                           name=f"layers_{i}")(
                    x, positions, bias, layer_cache, write_index, deterministic)
            new_layer_caches.append(new_layer_cache)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)

        if cfg.tie_word_embeddings:
            logits = layers.attend(embed, x)
        else:
            logits = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="lm_head",
                                  kernel_init=nn.initializers.normal(cfg.initializer_range))(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

        new_cache = None
        if cache is not None:
            new_cache = {
                    "layers": tuple(new_layer_caches),
                    "key_mask": key_mask,
                    "index": cache["index"] + length,
                    "position": cache["position"] + valid_so_far[:, -1],
            }
        return logits, new_cache


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> Cache:
    """An empty KV cache. Every leaf has batch as its leading axis, so beams reorder with one gather.

    layers[i]["k"/"v"]: [B, max_length, kv_heads, head_dim] (keys after RoPE); key_mask [B, max_length]:
    which slots hold real tokens; index [B]: next slot to write (equal across the batch); position [B]:
    next RoPE position (valid tokens so far). Writes past max_length are clamped by XLA: size it for
    prompt + soft tokens + generated tokens.
    """
    shape = (batch, max_length, config.num_kv_heads, config.head_dim)
    return {
            "layers": tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                            for _ in range(config.num_layers)),
            "key_mask": jnp.zeros((batch, max_length), bool),
            "index": jnp.zeros((batch,), jnp.int32),
            "position": jnp.zeros((batch,), jnp.int32),
    }


# ---------------------------------------------------------------------------------------------
# Parameters.


_EXAMPLE_INPUTS = (np.zeros((1, 1), np.int32), np.ones((1, 1), bool))  # tokens, mask


def init_params(config: LlamaConfig, rng: jax.Array, param_dtype: Dtype = jnp.float32) -> dict:
    """Random parameters (tests; std `config.initializer_range`), unboxed."""
    return layers.init_params(Llama(config, param_dtype=param_dtype), rng, *_EXAMPLE_INPUTS)


def abstract_params(config: LlamaConfig, dtype: Dtype = jnp.float32) -> dict:
    return layers.abstract_params(Llama(config, param_dtype=dtype), *_EXAMPLE_INPUTS)


def param_logical_axes(config: LlamaConfig) -> dict:
    return layers.param_logical_axes(Llama(config), *_EXAMPLE_INPUTS)


# ---------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints (and GGUF files, converted to Hugging Face names).

LLAMA_RULES: tuple[loading.Rule, ...] = (
        (r"embed_tokens/embedding", "model.embed_tokens.weight", None),
        (r"layers_(\d+)/self_attn/(q|k|v|o)_proj/kernel",
         "model.layers.{0}.self_attn.{1}_proj.weight", loading.transpose),
        (r"layers_(\d+)/self_attn/(q|k|v|o)_proj/bias",
         "model.layers.{0}.self_attn.{1}_proj.bias", None),
        (r"layers_(\d+)/mlp/(gate|up|down)_proj/kernel", "model.layers.{0}.mlp.{1}_proj.weight",
         loading.transpose),
        (r"layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale",
         "model.layers.{0}.{1}.weight", None),
        (r"norm/scale", "model.norm.weight", None),
        (r"lm_head/kernel", "lm_head.weight", loading.transpose),
)


def load_llama(path: str | Path, dtype: Dtype = jnp.bfloat16,
               shardings: Mapping | None = None) -> tuple[LlamaConfig, dict]:
    """(config, params) from a Hugging Face directory (config.json + safetensors) or a .gguf file.

    GGUF tensors are dequantized to float32 first, then cast to `dtype`.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        from plug_jax.models import gguf  # only GGUF users need the gguf package

        hf_config, tensors = gguf.read_gguf_checkpoint(path)
        source = loading.DictSource(tensors, str(path))
    else:
        hf_config = loading.read_hf_config(path)
        source = loading.SafetensorsSource(path)
    try:
        config = LlamaConfig.from_hf(hf_config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if callable(shardings):  # shardings follow from the config, known only now
        shardings = shardings(config)
    params = loading.load_params(abstract_params(config, dtype), source, LLAMA_RULES, dtype, shardings)
    return config, params
