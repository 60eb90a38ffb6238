"""Grouped Differential Attention (SPEC.md section 2).

Head layout, as the released weights store it: the query projection's output columns are grouped by
KV group, each group holding `signal_heads_per_group` signal heads then one noise head
(`[s, .., s, n] x groups`); the key and value projections hold, per group, the signal then the noise
head (`[k1, k2] x groups`, `[v1, v2] x groups`), so a group's value `V_g = [v1_g, v2_g]` is one
contiguous `2 * head_dim` slice. Sharding the head columns over `tensor` therefore splits whole groups.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from motif_jax.configs import ModelConfig
from motif_jax.model.layers import constant_init, normal_init, param, rms_normalize, rotary_embedding
from motif_jax.sharding import DEFAULT_RULES, Rules, constrain, mesh_axes
from pallas_kernels import gda_attention


class AttentionMaps(NamedTuple):
  """What the attention core returns for one layer.

  signal: [batch, seq, groups, signal_per_group, 2 * head_dim]  A1 V per signal head.
  noise:  [batch, seq, groups, 2 * head_dim]                    A2 V per group.
  max_logits: float32 [groups, signal_per_group + 1]            max pre-softmax logit per query head
      (signal heads from the signal map, the noise head last, from the noise map).
  """

  signal: jax.Array
  noise: jax.Array
  max_logits: jax.Array


def attention_mask(seq_len: int, segment_ids: jax.Array | None) -> jax.Array:
  """bool [batch or 1, seq, seq]: causal in row order, and within one segment when ids are given."""
  causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None]
  if segment_ids is None:
    return causal
  return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def gda_reference(q_signal, q_noise, k_signal, k_noise, value, mask) -> AttentionMaps:
  """Both GDA softmax maps against the shared 2*head_dim value, in plain jnp (float32 softmax).

  q_signal: [b, t, g, s, d]; q_noise, k_signal, k_noise: [b, t, g, d]; value: [b, t, g, 2d];
  mask: bool [b, t, t] (or broadcastable).
  """
  scale = q_signal.shape[-1] ** -0.5
  logits_signal = jnp.einsum("bqgsd,bkgd->bgsqk", q_signal, k_signal,
                             preferred_element_type=jnp.float32) * scale
  logits_noise = jnp.einsum("bqgd,bkgd->bgqk", q_noise, k_noise,
                            preferred_element_type=jnp.float32) * scale
  mask_signal, mask_noise = mask[:, None, None], mask[:, None]
  logits_signal = jnp.where(mask_signal, logits_signal, -jnp.inf)
  logits_noise = jnp.where(mask_noise, logits_noise, -jnp.inf)
  max_logits = jnp.concatenate(
      [jnp.max(logits_signal, axis=(0, 3, 4)), jnp.max(logits_noise, axis=(0, 2, 3))[:, None]],
      axis=1)
  probs_signal = jax.nn.softmax(logits_signal, axis=-1).astype(value.dtype)
  probs_noise = jax.nn.softmax(logits_noise, axis=-1).astype(value.dtype)
  signal = jnp.einsum("bgsqk,bkgv->bqgsv", probs_signal, value)
  noise = jnp.einsum("bgqk,bkgv->bqgv", probs_noise, value)
  return AttentionMaps(signal, noise, jax.lax.stop_gradient(max_logits))


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
      maps = self._attend(q[:, :, :, :s], q[:, :, :, s], k[:, :, :, 0], k[:, :, :, 1], v,
                          segment_ids)

    with jax.named_scope("attention_output"):
      lambda_init = cfg.lambda_init(layer_index)
      lam = self.differential_lambda(lambda_init)
      combined = maps.signal.astype(jnp.float32) - lam * maps.noise.astype(jnp.float32)[:, :, :, None]
      normed = rms_normalize(combined, cfg.attention_norm_eps) * self.sub_norm_scale[...]
      heads = ((1.0 - lambda_init) * normed).astype(dt).reshape(b, t, g * s * 2 * hd)
      return jnp.einsum("bth,hd->btd", heads, self.wo[...].astype(dt)), maps.max_logits

  def _attend(self, q_signal, q_noise, k_signal, k_noise, value, segment_ids) -> AttentionMaps:
    cfg = self.cfg
    if cfg.attention_impl == "reference":
      return gda_reference(q_signal, q_noise, k_signal, k_noise, value,
                           attention_mask(q_signal.shape[1], segment_ids))
    impl = "cudnn" if cfg.attention_impl == "cudnn" else cfg.pallas_impl
    attend = functools.partial(gda_attention.gda_attention, impl=impl,
                               interpret=cfg.pallas_interpret or None)
    args = (q_signal, q_noise, k_signal, k_noise, value)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      out = attend(*args, segment_ids=segment_ids)
      return AttentionMaps(out.signal, out.noise, out.max_logits)
    return _attend_per_shard(attend, args, segment_ids, mesh, self.rules or DEFAULT_RULES)


def _attend_per_shard(attend, args, segment_ids, mesh, rules) -> AttentionMaps:
  """Runs the attention kernel on each device's rows and KV groups (groups are independent).

  Rows split over the mesh axes of logical `batch`, groups over those of `act_groups`; the max
  logits are reduced over the row shards.
  """
  batch, groups = mesh_axes("batch", rules) or None, mesh_axes("act_groups", rules) or None
  packed = segment_ids is not None

  def per_shard(*operands):
    out = attend(*operands[:5], segment_ids=operands[5] if packed else None)
    max_logits = jax.lax.pmax(out.max_logits, batch) if batch else out.max_logits
    return out.signal, out.noise, max_logits

  head_spec, signal_spec = P(batch, None, groups, None), P(batch, None, groups, None, None)
  in_specs = (signal_spec,) + (head_spec,) * 4 + ((P(batch, None),) if packed else ())
  signal, noise, max_logits = jax.shard_map(
      per_shard, mesh=mesh, in_specs=in_specs, out_specs=(signal_spec, head_spec, P(groups, None)),
      check_vma=False)(*args, *((segment_ids,) if packed else ()))  # Pallas declares no varying axes
  return AttentionMaps(signal, noise, max_logits)
