"""Grouped Differential Attention (docs/model.md: the math, the head layout, lambda_init).

Head layout, as the released weights store it: the query projection's output columns are grouped by
KV group, each group holding `signal_heads_per_group` signal heads then one noise head
(`[s, .., s, n] x groups`); the key and value projections hold, per group, the signal then the noise
head (`[k1, k2] x groups`, `[v1, v2] x groups`), so a group's value `V_g = [v1_g, v2_g]` is one
contiguous `2 * head_dim` slice. Sharding the head columns over `tensor` therefore splits whole groups.

Both softmax maps come from one call of `pallas_kernels.gda_attention.gda_attention_sharded`: the
Pallas or cuDNN kernels per shard, or the plain jnp reference (`attention_impl="reference"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from motif_jax.configs import ModelConfig
from motif_jax.model.layers import constant_init, normal_init, param, rms_normalize, rotary_embedding
from motif_jax.sharding import DEFAULT_RULES, Rules, constrain, mesh_axes
from pallas_kernels import gda_attention


class GroupedDifferentialAttention(nnx.Module):
  """GDA with `num_kv_groups` groups of `signal_heads_per_group` signal heads and one noise head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
    self.cfg, self.rules = cfg, rules
    d, hd, g, s = cfg.hidden_size, cfg.head_dim, cfg.num_kv_groups, cfg.signal_heads_per_group
    dtype, init = cfg.param_dtype, normal_init(cfg.init_std)
    self.wq = param(rngs, (d, g * (s + 1) * hd), ("embed", "q_heads"), init, dtype)
    self.wk = param(rngs, (d, g * 2 * hd), ("embed", "kv_heads"), init, dtype)
    self.wv = param(rngs, (d, g * 2 * hd), ("embed", "kv_heads"), init, dtype)
    self.wo = param(rngs, (g * s * 2 * hd, d), ("o_heads", "embed"), init, dtype)
    lambda_init = normal_init(cfg.lambda_init_std)
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
      setattr(self, name, param(rngs, (hd,), ("head_dim",), lambda_init, "float32"))
    self.sub_norm_scale = param(rngs, (2 * hd,), ("head_dim",), constant_init(1.0), dtype)

  def differential_lambda(self, lambda_init: jax.Array) -> jax.Array:
    """The layer's scalar lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, in float32."""
    return (jnp.exp(jnp.sum(self.lambda_q1[...] * self.lambda_k1[...]))
            - jnp.exp(jnp.sum(self.lambda_q2[...] * self.lambda_k2[...])) + lambda_init)

  def __call__(self, x, positions, segment_ids, layer_index) -> tuple[jax.Array, jax.Array]:
    """x: [batch, seq, hidden]; positions, segment_ids: int32 [batch, seq] (segment_ids may be None).

    Returns the attention output [batch, seq, hidden] and max_logits float32 [groups, signal + 1].
    """
    cfg, dt = self.cfg, x.dtype
    b, t, _ = x.shape
    g, s, hd = cfg.num_kv_groups, cfg.signal_heads_per_group, cfg.head_dim
    with jax.named_scope("attention_projections"):
      q = jnp.einsum("btd,dh->bth", x, self.wq[...].astype(dt)).reshape(b, t, g, s + 1, hd)
      k = jnp.einsum("btd,dh->bth", x, self.wk[...].astype(dt)).reshape(b, t, g, 2, hd)
      v = jnp.einsum("btd,dh->bth", x, self.wv[...].astype(dt)).reshape(b, t, g, 2 * hd)
      q = constrain(rotary_embedding(q, positions, cfg.rope_theta),
                    ("batch", "act_length", "act_groups", None, None), self.rules)
      k = constrain(rotary_embedding(k, positions, cfg.rope_theta),
                    ("batch", "act_length", "act_groups", None, None), self.rules)
      v = constrain(v, ("batch", "act_length", "act_groups", None), self.rules)
    with jax.named_scope("attention_core"):
      rules = self.rules or DEFAULT_RULES
      impl = cfg.pallas_impl if cfg.attention_impl == "pallas" else cfg.attention_impl
      maps = gda_attention.gda_attention_sharded(
          q[:, :, :, :s], q[:, :, :, s], k[:, :, :, 0], k[:, :, :, 1], v, segment_ids=segment_ids,
          mesh=jax.sharding.get_abstract_mesh(), batch_axes=mesh_axes("batch", rules),
          group_axes=mesh_axes("act_groups", rules), impl=impl, exact=False,
          interpret=cfg.pallas_interpret or None)

    with jax.named_scope("attention_output"):
      lambda_init = cfg.lambda_init(layer_index)
      lam = self.differential_lambda(lambda_init)
      combined = maps.signal.astype(jnp.float32) - lam * maps.noise.astype(jnp.float32)[:, :, :, None]
      normed = rms_normalize(combined, cfg.attention_norm_eps) * self.sub_norm_scale[...]
      heads = ((1.0 - lambda_init) * normed).astype(dt).reshape(b, t, g * s * 2 * hd)
      return jnp.einsum("bth,hd->btd", heads, self.wo[...].astype(dt)), maps.max_logits
