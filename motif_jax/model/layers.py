"""Building blocks shared by the Motif-2 layers: parameters with logical axes, RMSNorm, RoPE."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None],
          init: Callable, dtype) -> nnx.Param:
  """An `nnx.Param` initialised by `init(key, shape, dtype)` that records its logical axis names.

  The names live in the `out_sharding` metadata; sharding is applied by the caller (`jax.jit` with
  out_shardings), never eagerly, so building a model needs no mesh.
  """
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), eager_sharding=False,
                   out_sharding=tuple(logical_axes))


def normal_init(std: float) -> Callable:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def constant_init(value: float) -> Callable:
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2 over the last axis) + eps), in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned gain [dim]; statistics in float32, output in x's dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs,
               logical_axis: str = "norm"):
    self.eps = eps
    self.scale = param(rngs, (dim,), (logical_axis,), constant_init(1.0), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """NeoX (half-split) rotary embedding over the full head dim.

  x: [batch, seq, ..., head_dim]; positions: int32 [batch, seq]. Angles in float32.
  """
  head_dim = x.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


@jax.custom_vjp
def lm_logits(x: jax.Array, head: jax.Array) -> jax.Array:
  """x: [batch, seq, hidden] @ head: [hidden, vocab] -> float32 logits [batch, seq, vocab].

  Both operands in the compute dtype, accumulated in float32. The backward casts the float32
  logits cotangent to the compute dtype before its two matmuls (float32 accumulation), as every other
  backward matmul of the model runs; left to autodiff, both would run in float32 (TF32 on GPUs, about
  half the bf16 rate) over the full vocabulary.
  """
  return jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)


def _lm_logits_fwd(x, head):
  return lm_logits(x, head), (x, head)


def _lm_logits_bwd(residuals, cotangent):
  x, head = residuals
  cotangent = cotangent.astype(x.dtype)
  dx = jnp.einsum("btv,dv->btd", cotangent, head, preferred_element_type=jnp.float32)
  dhead = jnp.einsum("btd,btv->dv", x, cotangent, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dhead.astype(head.dtype)


lm_logits.defvjp(_lm_logits_fwd, _lm_logits_bwd)
