"""The PolyNorm-gated MLP: `down(PolyNorm(gate(x)) * up(x))` (SPEC.md section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from motif_jax.configs import ModelConfig
from motif_jax.model.layers import constant_init, normal_init, param
from motif_jax.sharding import Rules, constrain


def mul_polynorm_reference(gate: jax.Array, up: jax.Array, weight: jax.Array, bias: jax.Array,
                           eps: float = 1e-6) -> jax.Array:
  """PolyNorm(gate) * up over the full last axis, in float32, cast to gate's dtype once.

  gate, up: [..., intermediate]; weight: [3] (for gate^3, gate^2, gate); bias: [1].
  """
  z = gate.astype(jnp.float32)

  def normalize(u):
    return u * jax.lax.rsqrt(jnp.mean(jnp.square(u), axis=-1, keepdims=True) + eps)

  poly = (weight[0] * normalize(z**3) + weight[1] * normalize(z**2) + weight[2] * normalize(z)
          + bias[0])
  return (poly * up.astype(jnp.float32)).astype(gate.dtype)


class PolyNormMLP(nnx.Module):
  """Gate/up [hidden, intermediate], down [intermediate, hidden], one PolyNorm (3 weights + bias)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
    self.cfg, self.rules = cfg, rules
    dtype, init = cfg.param_dtype, normal_init(cfg.init_std)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.w_gate = param(rngs, (d, f), ("embed", "mlp"), init, dtype)
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), init, dtype)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"), init, dtype)
    self.polynorm_weight = param(rngs, (3,), ("polynorm",), constant_init(1 / 3), "float32")
    self.polynorm_bias = param(rngs, (1,), ("polynorm",), constant_init(0.0), "float32")

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, hidden] in the compute dtype -> [batch, seq, hidden]."""
    dt = x.dtype
    gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dt))
    up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dt))
    gate = constrain(gate, ("batch", "act_length", "act_mlp"), self.rules)
    up = constrain(up, ("batch", "act_length", "act_mlp"), self.rules)
    weight, bias = self.polynorm_weight[...], self.polynorm_bias[...]
    if self.cfg.mlp_impl == "pallas":
      from pallas_kernels.polynorm import mul_polynorm  # kernels never import the model

      hidden = mul_polynorm(gate, up, weight, bias, eps=self.cfg.norm_eps)
    else:
      hidden = mul_polynorm_reference(gate, up, weight, bias, eps=self.cfg.norm_eps)
    return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dt))
