"""The PolyNorm-gated MLP: `down(PolyNorm(gate(x)) * up(x))` (docs/model.md).

`PolyNorm(gate) * up` runs in float32 over the full intermediate axis, in one call of
`pallas_kernels.polynorm.mul_polynorm_sharded`: plain jnp (`mlp_impl="reference"`) or the fused Pallas
kernels (`mlp_impl="pallas"`), per shard with the row sums reduced over the tensor axis.
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
      cfg, rules = self.cfg, self.rules or DEFAULT_RULES
      hidden = polynorm.mul_polynorm_sharded(
          gate, up, self.polynorm_weight[...], self.polynorm_bias[...],
          mesh=jax.sharding.get_abstract_mesh(), axis=(mesh_axes("act_mlp", rules) or ("tensor",))[0],
          batch_axes=mesh_axes("batch", rules), eps=cfg.norm_eps,
          impl=cfg.pallas_impl if cfg.mlp_impl == "pallas" else "reference",
          interpret=cfg.pallas_interpret)
    with jax.named_scope("mlp_matmuls"):
      return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dt))
