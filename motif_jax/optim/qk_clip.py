"""QK-Clip for Grouped Differential Attention, as an optax transform (docs/optimizer.md).

The forward pass records, per layer and query head, the largest pre-softmax logit q.k / sqrt(d):
`max_logits` float32 [layers, groups, signal_heads_per_group + 1], the noise head last. After the
optimizer step, a head whose max exceeds `tau` gets gamma = tau / max, and its query columns and the
columns of the key it reads are each scaled by sqrt(gamma). The signal key k1_g, read by all signal
heads of group g, takes the smallest scale among them; the noise key k2_g takes the noise head's.
Query columns of heads at or under tau are left exactly as the optimizer made them; since a group's
signal heads share k1_g, clipping one of them also scales the logits of its unclipped siblings.

Column layouts (per layer): wq [hidden, groups * (S + 1) * head_dim], group-major, each group S signal
heads then the noise head; wk [hidden, groups * 2 * head_dim], each group [k1_g, k2_g].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from motif_jax.optim.muon import path_name


def max_logit_per_layer(max_logits: jax.Array) -> jax.Array:
  """[layers, groups, heads_per_group] -> [layers]: the largest logit of each layer (for logging)."""
  return jnp.max(max_logits, axis=(-2, -1))


def head_scales(max_logits: jax.Array, tau: float) -> jax.Array:
  """sqrt(tau / max) where max > tau, else 1; same shape as `max_logits`."""
  over = max_logits > tau
  return jnp.where(over, jnp.sqrt(tau / jnp.where(over, max_logits, tau)), 1.0)


def column_scales(max_logits: jax.Array, tau: float, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """Per-column scales of wq [layers, groups*(S+1)*head_dim] and wk [layers, groups*2*head_dim]."""
  scales = head_scales(max_logits, tau)                                    # [L, G, S+1]
  key = jnp.stack([jnp.min(scales[..., :-1], axis=-1), scales[..., -1]], axis=-1)  # [L, G, 2]
  per_column = lambda s: jnp.repeat(s.reshape(s.shape[0], -1), head_dim, axis=-1)
  return per_column(scales), per_column(key)


def qk_clip(*, num_kv_groups: int, signal_heads_per_group: int, head_dim: int, tau: float = 100.0,
            query_path: str = "blocks/attn/wq",
            key_path: str = "blocks/attn/wk") -> optax.GradientTransformationExtraArgs:
  """Rewrites the updates u of the stacked wq [layers, hidden, Hq] and wk [layers, hidden, Hk] so that
  params + u' = (params + u) * scale on clipped columns; every other update passes through unchanged.

  `update` needs the params and the keyword `max_logits` (float32 [layers, groups, S + 1]).
  """
  heads = signal_heads_per_group + 1

  def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
    del extra_args
    if params is None or max_logits is None:
      raise ValueError("qk_clip needs params and max_logits: call "
                       "tx.update(grads, state, params, max_logits=aux['max_logits']).")
    if max_logits.shape[1:] != (num_kv_groups, heads):
      raise ValueError(f"max_logits has shape {max_logits.shape}; expected [layers, "
                       f"{num_kv_groups}, {heads}] (num_kv_groups, signal_heads_per_group + 1).")
    q_scale, k_scale = column_scales(max_logits.astype(jnp.float32), tau, head_dim)
    column_scale = {query_path: q_scale, key_path: k_scale}

    def clip(path, u, p):
      scale = column_scale.get(path_name(path))
      if scale is None:
        return u
      scale = scale[:, None, :]                                           # [L, 1, columns]
      return jnp.where(scale < 1.0, ((p + u) * scale - p).astype(u.dtype), u)

    found = {path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(updates)[0]}
    missing = set(column_scale) - found
    if missing:
      raise ValueError(f"qk_clip found no parameter at {sorted(missing)}; set query_path/key_path.")
    return jax.tree_util.tree_map_with_path(clip, updates, params), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
