"""The Motif-2 decoder: pre-norm blocks over depth, and `MotifForCausalLM`.

Block: `h = x + GDA(RMSNorm(x)); y = h + MLP(RMSNorm(h))`; logits = `lm_head(RMSNorm(h_L))`.
The blocks' parameters are stacked on a leading `layers` axis. With `scan_layers` (the default) they
are applied with `jax.lax.scan`, so compile time does not grow with depth; otherwise by an unrolled
loop over per-layer slices. Each step receives its 0-based layer index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from motif_jax.configs import ModelConfig
from motif_jax.model.attention import GroupedDifferentialAttention
from motif_jax.model.layers import RMSNorm, lm_logits, normal_init, param
from motif_jax.model.mlp import PolyNormMLP
from motif_jax.sharding import Rules, constrain
from pallas_kernels import gda_attention, polynorm

_REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the Pallas kernels' residuals (attention: q, k, v, outputs, lse; PolyNorm: gate, up,
    # statistics), so the backward recomputes only projections and elementwise work. With the
    # reference implementations these names are absent and the policies act like "full".
    "attention": jax.checkpoint_policies.save_only_these_names(gda_attention.CHECKPOINT_NAME),
    "kernels": jax.checkpoint_policies.save_only_these_names(gda_attention.CHECKPOINT_NAME,
                                                             polynorm.CHECKPOINT_NAME),
}


@jax.custom_vjp
def unstack_layers(stacked):
  """A pytree of [layers, ...] leaves -> a tuple of per-layer pytrees (the leaves' [i] slices).

  Its backward stacks the per-layer cotangents in one concatenation, where autodiff of the slices
  would add up one zero-padded [layers, ...] array per layer.
  """
  layers = jax.tree.leaves(stacked)[0].shape[0]
  return tuple(jax.tree.map(lambda leaf: leaf[i], stacked) for i in range(layers))


def stack_layers(per_layer):
  """The inverse of `unstack_layers`: a sequence of per-layer pytrees -> one of [layers, ...] leaves."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)


def _unstack_forward(stacked):
  return unstack_layers(stacked), None


def _unstack_backward(_, per_layer):
  return (stack_layers(per_layer),)


unstack_layers.defvjp(_unstack_forward, _unstack_backward)


class DecoderBlock(nnx.Module):
  """One pre-norm block: GDA then the PolyNorm MLP, each behind an RMSNorm and a residual add."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
    self.attn = GroupedDifferentialAttention(cfg, rngs=rngs, rules=rules)
    self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = PolyNormMLP(cfg, rngs=rngs, rules=rules)
    self.rules = rules

  def __call__(self, x, positions, segment_ids, layer_index):
    """x: [batch, seq, hidden] -> (same shape, max_logits float32 [groups, signal + 1])."""
    with jax.named_scope("norm_residual"):
      normed = self.attn_norm(x)
    attn_out, max_logits = self.attn(normed, positions, segment_ids, layer_index)
    with jax.named_scope("norm_residual"):
      h = x + attn_out
      normed = self.mlp_norm(h)
    mlp_out = self.mlp(normed)
    with jax.named_scope("norm_residual"):
      y = constrain(h + mlp_out, ("batch", "act_length", "act_embed"), self.rules)
    return y, max_logits


class MotifForCausalLM(nnx.Module):
  """Motif-2 causal LM. `rules` (logical-axis rules) only adds activation sharding constraints."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
    self.config, self.rules = cfg, rules
    init = normal_init(cfg.init_std)
    self.embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), init,
                           cfg.param_dtype)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_blocks(rngs):
      return DecoderBlock(cfg, rngs=rngs, rules=rules)

    self.blocks = stacked_blocks(rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=cfg.param_dtype,
                              rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), init,
                           cfg.param_dtype)

  def __call__(self, tokens, positions=None, segment_ids=None, *, return_aux: bool = False,
               layer_blocks=None):
    """tokens: int32 [batch, seq]; positions, segment_ids: int32 [batch, seq] for packed rows.

    layer_blocks: with `scan_layers=False`, the blocks' state already split per layer (a tuple of
      `num_layers` trees, as `unstack_layers` gives), used instead of slicing `self.blocks`; a caller
      that runs the model on several micro-batches slices once instead of once per call.
    Returns float32 logits [batch, seq, vocab]; with `return_aux`, also
    `{"max_logits": float32 [layers, groups, signal + 1]}` for QK-Clip.
    """
    cfg = self.config
    if layer_blocks is not None and (cfg.scan_layers or len(layer_blocks) != cfg.num_layers):
      raise ValueError(f"layer_blocks takes {cfg.num_layers} per-layer states and scan_layers=False; "
                       f"got {len(layer_blocks)} with scan_layers={cfg.scan_layers}.")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    compute = jnp.dtype(cfg.compute_dtype)
    with jax.named_scope("embedding"):
      x = jnp.take(self.embedding[...], tokens, axis=0).astype(compute)
      x = constrain(x, ("batch", "act_length", "act_embed"), self.rules)

    graphdef, stacked = nnx.split(self.blocks)

    def layer(carry, scanned):
      block_state, layer_index = scanned
      return nnx.merge(graphdef, block_state)(carry, positions, segment_ids, layer_index)

    if cfg.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    if cfg.scan_layers:
      x, max_logits = jax.lax.scan(layer, x, (stacked, jnp.arange(cfg.num_layers)))
    else:
      per_layer_max = []
      per_layer = unstack_layers(stacked) if layer_blocks is None else layer_blocks
      for layer_index, block_state in enumerate(per_layer):
        x, layer_max = layer(x, (block_state, jnp.int32(layer_index)))
        per_layer_max.append(layer_max)
      max_logits = jnp.stack(per_layer_max)

    with jax.named_scope("lm_head"):
      x = self.final_norm(x)
      head = self.embedding[...].T if cfg.tie_embeddings else self.lm_head[...]
      logits = lm_logits(x, head.astype(compute))
      logits = constrain(logits, ("batch", "act_length", "act_vocab"), self.rules)
    return (logits, {"max_logits": max_logits}) if return_aux else logits


def _abstract_state(cfg: ModelConfig, rules: Rules | None = None):
  """(graphdef, parameter State with ShapeDtypeStruct values): no memory, no computation.

  Uses `jax.eval_shape`, which, unlike `nnx.eval_shape`, leaves the logical `out_sharding` names
  alone when a mesh is set.
  """
  captured = {}

  def build():
    graphdef, state = nnx.split(MotifForCausalLM(cfg, rngs=nnx.Rngs(0), rules=rules), nnx.Param)
    captured["graphdef"] = graphdef
    return state

  state = jax.eval_shape(build)
  return captured["graphdef"], state


def abstract_params(cfg: ModelConfig):
  """Parameters as a nested dict of `jax.ShapeDtypeStruct`."""
  return nnx.to_pure_dict(_abstract_state(cfg)[1])


def param_logical_axes(cfg: ModelConfig):
  """The parameters' logical axis names: a nested dict (same structure) of PartitionSpecs."""
  return nnx.to_pure_dict(nnx.get_partition_spec(_abstract_state(cfg)[1]))


def split_model(model: MotifForCausalLM):
  """(graphdef, params as a nested dict of arrays) — the functional form the trainer uses."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def init_params(cfg: ModelConfig, seed: int, shardings=None, rules: Rules | None = None):
  """Initialises (graphdef, params), the params born with `shardings` (a tree like the params)."""
  graphdef, _ = _abstract_state(cfg, rules)

  def build():
    return split_model(MotifForCausalLM(cfg, rngs=nnx.Rngs(seed), rules=rules))[1]

  return graphdef, jax.jit(build, out_shardings=shardings)()
