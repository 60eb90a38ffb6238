"""MuonClip: Muon (sharded Newton-Schulz) for hidden matrices, AdamW for the rest, then QK-Clip."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from motif_jax.optim.muon import (ADAM, DEFAULT_CHUNK_BYTES, MUON, describe_routing, matrix_muon,
                                  routing_labels)
from motif_jax.optim.newton_schulz import Coeffs, newton_schulz, ns_flops
from motif_jax.optim.qk_clip import max_logit_per_layer, qk_clip
from motif_jax.sharding import DEFAULT_RULES, Rules

__all__ = ["describe_routing", "max_logit_per_layer", "muonclip", "newton_schulz", "ns_flops"]


def muonclip(learning_rate: optax.ScalarOrSchedule, *, logical_axes, num_kv_groups: int,
             signal_heads_per_group: int, head_dim: int, weight_decay: float = 0.1,
             momentum: float = 0.95, ns_steps: int = 5, ns_coeffs: Coeffs = "classic",
             adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
             adam_learning_rate: optax.ScalarOrSchedule | None = None,
             adam_weight_decay: float | None = None, qk_clip_tau: float | None = 100.0,
             mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
             ns_dtype=jnp.bfloat16,
             ns_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> optax.GradientTransformationExtraArgs:
  """The MuonClip optimizer over the model's params (a nested dict; `logical_axes` the same tree of
  PartitionSpecs, from `motif_jax.model.param_logical_axes`).

  Muon leaves (see `describe_routing`): W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) NS(g'), Nesterov
  momentum `momentum`, `ns_steps` Newton-Schulz steps with `ns_coeffs` in `ns_dtype`, run over
  same-shaped matrices in chunks whose float32 working array stays within `ns_chunk_bytes` per
  device (None: all at once). Other leaves:
  AdamW(adam_learning_rate or learning_rate, adam_b1, adam_b2, adam_eps, decoupled weight decay
  adam_weight_decay, default `weight_decay`). Then QK-Clip at `qk_clip_tau` (None turns it off; the
  state keeps the same structure). `mesh` turns on Parallel Muon with params laid out by `rules`.

  Call as `tx.update(grads, state, params, max_logits=aux["max_logits"])`.
  """
  adam_wd = weight_decay if adam_weight_decay is None else adam_weight_decay
  route = optax.partition(
      {
          MUON: matrix_muon(learning_rate, logical_axes=logical_axes, weight_decay=weight_decay,
                            momentum=momentum, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                            ns_dtype=ns_dtype, ns_chunk_bytes=ns_chunk_bytes, mesh=mesh,
                            rules=rules),
          ADAM: optax.adamw(learning_rate if adam_learning_rate is None else adam_learning_rate,
                            b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=adam_wd),
      },
      routing_labels(logical_axes))
  clip = optax.identity() if qk_clip_tau is None else qk_clip(
      num_kv_groups=num_kv_groups, signal_heads_per_group=signal_heads_per_group,
      head_dim=head_dim, tau=qk_clip_tau)
  return optax.chain(route, clip)
