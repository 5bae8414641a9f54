"""Building blocks shared by the model families.

Every parameter carries logical axis names (t5x style); `configs/common.py` maps them to mesh axes.
Parameter names: "vocab", "encoder_vocab" (a sentence encoder's), "embed", "mlp", "q_heads"
(query/output projections, heads x head_dim joined), "kv_heads" (key/value projections, joined),
"heads", "relpos_buckets", "norm".
Activation names: "batch", "length", "embed", "mlp", "heads", "kv", "vocab".
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from plug_jax import errors

Dtype = Any
NEG_INF = -1e9  # finite, so a fully masked row gives a uniform softmax rather than NaN


class RMSNorm(nn.Module):
    """Root-mean-square norm without bias or mean subtraction (T5 and Llama), computed in f32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def dense(features: int, axes: tuple[str, str], *, name: str | None = None, use_bias: bool = False,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init: Any = nn.initializers.normal(0.02),
          bias_init: Any = nn.initializers.zeros) -> nn.Dense:
    """An nn.Dense whose kernel (and bias) carry logical axis names; in bf16 or fp16 on a CPU its
    matmuls sum in float32 (`low_precision_matmul`)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    dot_general=(_low_precision_dot_general if _sums_in_float32_by_hand(dtype)
                                 else jax.lax.dot_general),
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(bias_init, axes[1:]))


def attend(embed: nn.Embed, x: jax.Array) -> jax.Array:
    """A tied LM head: `embed.attend`, through `low_precision_matmul` in bf16 or fp16 on a CPU."""
    if not _sums_in_float32_by_hand(embed.dtype):
        return embed.attend(x)
    return low_precision_matmul(x.astype(embed.dtype), embed.embedding.astype(embed.dtype).T)


def _sums_in_float32_by_hand(dtype: Dtype) -> bool:
    """bf16 or fp16 traced for a CPU: XLA:CPU sums their products in float32 (at twice float32's
    rate on AVX512-BF16) only when asked. TPUs and GPUs always do, and XLA:TPU plans more memory
    for the explicit float32 sums (17.3 GiB against 6.3 on v5e-16 for the paper's step)."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def low_precision_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) of two bf16 (or fp16) operands, summed in float32 and rounded to
    their dtype once, forward and backward. XLA:CPU on AVX512-BF16 multiplies bf16 at twice
    float32's rate when the sum is float32, while autodiff of such a product hands its
    transpose a float32 cotangent and upcasts the other operand. Gradients are
    computed only for the operands being differentiated: a frozen LLM's kernels get no
    weight-gradient matmul. Every index of `spec` must appear in two of its three terms."""
    if a.dtype != b.dtype:
        raise TypeError(f"low_precision_einsum: operands of {a.dtype} and {b.dtype}")
    return _summed_in_float32(spec, a, b)


def low_precision_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., k] @ kernel [k, n] as `low_precision_einsum`."""
    return low_precision_einsum("...k,kn->...n", x, kernel)


def _summed_in_float32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _low_precision_einsum_fwd(spec, a, b):
    # Each operand is kept only for the other's gradient: None says that one is not wanted.
    return (low_precision_einsum(spec, a.value, b.value),
            (b.value if a.perturbed else None, a.value if b.perturbed else None))


def _low_precision_einsum_bwd(spec, residuals, grad):
    b, a = residuals
    if isinstance(grad, jax.custom_derivatives.SymbolicZero):
        return None, None
    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    return (None if b is None else _summed_in_float32(f"{out},{b_spec}->{a_spec}", grad, b),
            None if a is None else _summed_in_float32(f"{a_spec},{out}->{b_spec}", a, grad))


low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd,
                            symbolic_zeros=True)


def _low_precision_dot_general(lhs, rhs, dimension_numbers, precision=None,
                               preferred_element_type=None):
    """nn.Dense's dot_general (the input's last axis against the kernel's first), after Dense
    has cast both to its dtype, as `low_precision_matmul`."""
    assert dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return low_precision_matmul(lhs, rhs)


def mask_to_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """[batch, q, k] (or broadcastable) boolean mask -> additive bias [batch, 1, q, k]."""
    return jnp.where(mask[:, None], 0.0, NEG_INF).astype(dtype)


# config.llm.attention_impl: how attention runs, not what it computes. '' lets
# jax.nn.dot_product_attention choose (XLA today); 'xla' and 'cudnn' (flash attention on NVIDIA
# GPUs, bf16/fp16 only) ask for one; 'einsum' is our own two einsums around an f32 softmax.
ATTENTION_IMPLS = ("", "xla", "cudnn", "einsum")


def check_attention_impl(impl: str, dtype) -> None:
    """ConfigError for an implementation not in ATTENTION_IMPLS, or cuDNN at a dtype it lacks."""
    if impl not in ATTENTION_IMPLS:
        raise errors.ConfigError(f"config.llm.attention_impl {impl!r}: expected one of "
                                 f"{', '.join(repr(i) for i in ATTENTION_IMPLS)}")
    if impl == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise errors.ConfigError(f"config.llm.attention_impl 'cudnn' runs bfloat16 or float16 "
                                 f"only, not {jnp.dtype(dtype).name}")


def dot_product_attention(q, k, v, bias, scale: float | None = None, impl: str = "",
                          weights_dropout: Callable[[jax.Array], jax.Array] | None = None):
    """Multi-head attention with grouped key/value heads.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim];
    bias: additive (masks and T5's per-head relative positions), broadcastable to
    [batch, heads, q_len, k_len]; scale: of the logits, None: none (T5). Softmax runs in f32.
    impl: one of ATTENTION_IMPLS.
    weights_dropout: training's dropout of the attention probabilities (`training_dropout`);
    None (evaluation, or a rate of 0) leaves them as they are. jax.nn.dot_product_attention has
    no dropout, so attention with it runs as two einsums whatever `impl` says.
    """
    scale = 1.0 if scale is None else scale
    if impl == "einsum" or weights_dropout is not None:
        return _einsum_attention(q, k, v, bias, scale, weights_dropout)
    if impl == "cudnn":  # it takes a bias of the full [q_len, k_len], in the inputs' dtype
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], q.shape[1], k.shape[1]))
        bias = jnp.maximum(bias, jnp.finfo(q.dtype).min / 2).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                        implementation=impl or None)


def _einsum_attention(q, k, v, bias, scale: float, weights_dropout=None):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    product = low_precision_einsum if _sums_in_float32_by_hand(q.dtype) else jnp.einsum
    q = q.reshape(batch, q_len, kv_heads, group, head_dim) * scale
    logits = product("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32)
    # bias heads axis is 1 (a mask) or `heads` (T5's relative position bias).
    bias_heads = (1, 1) if bias.shape[1] == 1 else (kv_heads, group)
    logits = logits + bias.reshape(bias.shape[0], *bias_heads, *bias.shape[-2:])
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if weights_dropout is not None:
        weights = weights_dropout(weights)
    out = product("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(batch, q_len, heads, head_dim)


def training_dropout(dropout: nn.Dropout, deterministic: bool
                     ) -> Callable[[jax.Array], jax.Array] | None:
    """`dropout` in training mode, or None where it would change nothing (deterministic, rate 0):
    the `weights_dropout` of dot_product_attention."""
    if deterministic or not dropout.rate:
        return None
    return lambda x: dropout(x, deterministic=False)


def apply_mode(dropout_rng: jax.Array | None) -> dict:
    """Keyword arguments of a model's `apply`: training mode with dropout masks drawn from
    `dropout_rng`, or none (deterministic, the default) when it is None."""
    if dropout_rng is None:
        return {}
    return {"deterministic": False, "rngs": {"dropout": dropout_rng}}


# config.llm.remat_policy: what a rematerialized layer keeps from its forward pass ("" keeps
# nothing but its inputs, the least memory; "dots_with_no_batch_dims_saveable" keeps the weight
# matmuls' outputs, MaxText's "minimal", the usual trade on accelerators).
REMAT_POLICIES = ("", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat(module_class, policy: str = "", static_argnums: tuple[int, ...] = ()):
    """`module_class` rematerialized in the backward pass under the named jax.checkpoint_policies
    policy (REMAT_POLICIES); static_argnums (self is 0) name the Python arguments of its
    `__call__`, such as `deterministic`."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"config.llm.remat_policy {policy!r}: expected one of "
                         f"{', '.join(repr(p) for p in REMAT_POLICIES)}")
    return nn.remat(module_class, static_argnums=static_argnums,
                    policy=getattr(jax.checkpoint_policies, policy) if policy else None)


def constrain(x, axes: Sequence[str | None]):
    """Logical sharding constraint on an activation; a no-op outside a mesh with rules."""
    return nn.with_logical_constraint(x, tuple(axes))


def unboxed(tree):
    """Strips logical-partitioning boxes without applying sharding constraints (which `nn.unbox`
    does under an active mesh, and which abstract shapes cannot take)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata)
                        else x, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


# Parameter trees of a module, given example inputs for its `__call__` (shapes do not matter
# beyond building every parameter).


def _abstract_boxed_params(module: nn.Module, *inputs):
    return jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x)["params"], *inputs)


def init_params(module: nn.Module, rng: jax.Array, *inputs) -> dict:
    """Random parameters, unboxed: one compiled program (eager, every initializer would compile
    and dispatch on its own)."""
    return jax.jit(lambda rng, *x: unboxed(module.init(rng, *x)["params"]))(rng, *inputs)


def abstract_params(module: nn.Module, *inputs) -> dict:
    """The parameter tree as unboxed ShapeDtypeStructs, without allocating anything."""
    return unboxed(_abstract_boxed_params(module, *inputs))


def param_logical_axes(module: nn.Module, *inputs) -> dict:
    """The parameter tree as PartitionSpecs of logical axis names (for nn.logical_to_mesh_sharding)."""
    return nn.get_partition_spec(_abstract_boxed_params(module, *inputs))
