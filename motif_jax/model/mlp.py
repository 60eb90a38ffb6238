"""The PolyNorm-gated MLP: `down(PolyNorm(gate(x)) * up(x))` (SPEC.md section 3).

`PolyNorm(gate) * up` runs in float32 over the full intermediate axis, either as plain jnp
(`mlp_impl="reference"`) or as the fused Pallas kernel (`mlp_impl="pallas"`), both from
`pallas_kernels.polynorm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from motif_jax.configs import ModelConfig
from motif_jax.model.layers import constant_init, normal_init, param
from motif_jax.sharding import DEFAULT_RULES, Rules, constrain, mesh_axes
from pallas_kernels import polynorm


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
    with jax.named_scope("mlp_matmuls"):
      gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dt))
      up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dt))
      gate = constrain(gate, ("batch", "act_length", "act_mlp"), self.rules)
      up = constrain(up, ("batch", "act_length", "act_mlp"), self.rules)
    with jax.named_scope("polynorm"):
      weight, bias = self.polynorm_weight[...], self.polynorm_bias[...]
      if self.cfg.mlp_impl == "pallas":
        hidden = self._fused_polynorm(gate, up, weight, bias)
      else:
        hidden = polynorm.mul_polynorm_reference(gate, up, weight, bias, eps=self.cfg.norm_eps)
    with jax.named_scope("mlp_matmuls"):
      return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dt))

  def _fused_polynorm(self, gate, up, weight, bias):
    """The Pallas kernel; under a multi-device mesh, per shard with the row sums reduced over tensor."""
    cfg = self.cfg
    kernel_args = dict(eps=cfg.norm_eps, impl=cfg.pallas_impl, interpret=cfg.pallas_interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return polynorm.mul_polynorm(gate, up, weight, bias, **kernel_args)
    rules = self.rules or DEFAULT_RULES
    feature_axes = mesh_axes("act_mlp", rules) or ("tensor",)
    return polynorm.mul_polynorm_sharded(gate, up, weight, bias, mesh=mesh, axis=feature_axes[0],
                                         batch_axes=mesh_axes("batch", rules), **kernel_args)
