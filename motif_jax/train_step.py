"""The jitted training step: loss, gradient accumulation over micro-batches, clipping, update.

The train state is a plain pytree `TrainState(step, params, opt_state)`; the step is
`jax.jit`-ed with explicit in/out shardings derived from the parameters' logical axes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from motif_jax.configs import ModelConfig
from motif_jax.model.transformer import stack_layers, unstack_layers

BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")

# Why a step was skipped: `metrics["nonfinite_reason"]` indexes this (0: it was not). The first
# failing check wins: the loss, then the gradients, then the update (new params or optimizer state).
NONFINITE_REASONS = ("none", "loss", "gradients", "update")


class TrainState(NamedTuple):
  step: jax.Array  # int32 []
  params: Any  # nested dict of arrays
  opt_state: Any


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  z_loss_weight: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Weighted sums of token losses (not means): returns (sum of loss, sum of weights).

  logits: float32 [batch, seq, vocab]; targets: int32 [batch, seq]; weights: float32 [batch, seq].
  With `z_loss_weight`, adds `z_loss_weight * logsumexp(logits)^2` per token.
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  token_loss = log_z - target_logit + z_loss_weight * jnp.square(log_z)
  return jnp.sum(token_loss * weights), jnp.sum(weights)


def cast_block_matrices(params, dtype):
  """The blocks' stacked weight matrices ([layers, in, out]) in `dtype`, every other leaf as is.

  The model casts these to the compute dtype before every use, so casting them once per step, not
  once per layer and micro-batch, changes no value: the forward reads the same numbers, and the
  gradients taken against the cast matrices, upcast, equal those against the originals. Norm gains,
  lambdas and the embedding (whose lookup gradient sums over tokens) keep the parameter dtype.
  """
  blocks = jax.tree.map(lambda w: w.astype(dtype) if w.ndim >= 3 else w, params["blocks"])
  return {**params, "blocks": blocks}


def _checked_leaves(params, opt_state) -> list[tuple[str, Any]]:
  """(name, leaf) of every float leaf of the params and the optimizer state, in a fixed order.

  Names are paths such as `params/blocks/mlp/w_up` or
  `opt_state/inner_state/1/0/inner_states/muon/inner_state/0/0/trace/blocks/mlp/w_up`. Integer
  leaves (step counts) cannot be non-finite and are left out. Works on arrays and on
  ShapeDtypeStructs alike.
  """
  checked = []
  for prefix, tree in (("params", params), ("opt_state", opt_state)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if jnp.issubdtype(leaf.dtype, jnp.inexact):
        checked.append((f"{prefix}/{jax.tree_util.keystr(path, simple=True, separator='/')}", leaf))
  return checked


def checked_leaf_names(params, opt_state) -> tuple[str, ...]:
  """The leaf names `metrics["nonfinite_leaves"]` refers to, position by position."""
  return tuple(name for name, _ in _checked_leaves(params, opt_state))


def _finite_per_leaf(params, opt_state) -> jax.Array:
  """bool [checked leaves]: whether each checked leaf is all finite (one reduction per leaf)."""
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for _, leaf in _checked_leaves(params, opt_state)])


def _nonfinite_reason(loss_ok: jax.Array, grads_ok: jax.Array, update_ok: jax.Array) -> jax.Array:
  """int32 []: an index into NONFINITE_REASONS, the first failing check (0 when all pass)."""
  return jnp.select([~loss_ok, ~grads_ok, ~update_ok], [1, 2, 3], 0).astype(jnp.int32)


def applied_learning_rate(opt_state) -> jax.Array | None:
  """float32 []: the `learning_rate` that `optax.inject_hyperparams` recorded in `opt_state` (the
  rate of the update that produced it), or None when the optimizer injects none."""
  return optax.tree.get(opt_state, "learning_rate",
                        filtering=lambda _, value: isinstance(value, jax.Array))


def make_train_step(cfg: ModelConfig, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformationExtraArgs, schedule: optax.Schedule, *,
                    micro_batches: int = 1,
                    z_loss_weight: float = 0.0) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  batch: dict of [global_batch, seq] arrays (`BATCH_KEYS`); rows are split into `micro_batches`
  equal micro-batches whose gradients are summed before one optimizer update. The loss is the
  token-weighted mean over the whole batch, so the result does not depend on `micro_batches`.
  A step whose loss or gradients are not finite, or whose new params or optimizer state would hold
  a NaN or inf (an optimizer that overflowed on finite gradients), leaves params and optimizer state
  unchanged (`metrics["finite"]` is False); the step counter still advances, as the data does,
  but the optimizer's own count (and so its learning-rate schedule) does not.
  `metrics["learning_rate"]` is the rate the optimizer used for this update, read from its state
  (`applied_learning_rate`, so `tx` built with `optax.inject_hyperparams`, as `plan_step` does);
  `schedule(step)` stands in only for an optimizer whose state records no learning rate.
  `metrics["nonfinite_reason"]` indexes NONFINITE_REASONS, and `metrics["nonfinite_leaves"]` flags
  each new params/optimizer-state leaf that is not finite, in the order of `checked_leaf_names`.
  """

  def summed_loss(params, micro, layer_blocks=None):
    model = nnx.merge(graphdef, params)
    logits, aux = model(micro["inputs"], micro["positions"], micro["segment_ids"], return_aux=True,
                        layer_blocks=layer_blocks)
    with jax.named_scope("cross_entropy"):
      loss_sum, weight_sum = cross_entropy(logits, micro["targets"], micro["loss_weights"],
                                           z_loss_weight)
    return loss_sum, (weight_sum, aux["max_logits"])

  def summed_grads(params, batch):
    """(grads, loss sum, weight sum, max logits) summed over the batch's micro-batches.

    Gradients are taken at the cast matrices (see cast_block_matrices) and returned, and summed, in
    the params' dtypes. With unrolled layers and several micro-batches, the cast blocks are split per
    layer once per step and the gradients kept per layer until the end of the step, so the loop over
    micro-batches neither slices nor restacks the layers.
    """
    cast = cast_block_matrices(params, cfg.compute_dtype)
    dtypes = jax.tree.map(lambda x: x.dtype, params)
    per_layer = not cfg.scan_layers and micro_batches > 1
    if per_layer:  # the point of differentiation: (every leaf but the blocks, the blocks per layer)
      rest = lambda tree: {k: v for k, v in tree.items() if k != "blocks"}
      point = (rest(cast), unstack_layers(cast["blocks"]))
      dtypes = (rest(dtypes), (dtypes["blocks"],) * cfg.num_layers)
      loss_fn = lambda p, micro: summed_loss({**p[0], "blocks": cast["blocks"]}, micro, p[1])
    else:
      point, loss_fn = cast, summed_loss
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(micro):
      value, grads = value_and_grad(point, micro)
      return value, jax.tree.map(lambda g, dtype: g.astype(dtype), grads, dtypes)

    def as_params(grads):
      if not per_layer:
        return grads
      other_grads, layer_grads = grads
      return {**other_grads, "blocks": stack_layers(layer_grads)}

    if micro_batches == 1:  # no accumulation buffer: the gradients are the step's own
      (loss_sum, (weight_sum, max_logits)), grads = grad_fn(batch)
      return as_params(grads), loss_sum, weight_sum, max_logits
    rows = batch["inputs"].shape[0]
    micro = jax.tree.map(lambda x: x.reshape((micro_batches, rows // micro_batches) + x.shape[1:]),
                         batch)

    def accumulate(carry, micro_batch):
      grads, loss_sum, weight_sum, max_logits = carry
      (loss, (weight, logits_max)), micro_grads = grad_fn(micro_batch)
      return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + loss, weight_sum + weight,
              jnp.maximum(max_logits, logits_max)), None

    zeros = jax.tree.map(lambda x, dtype: jnp.zeros(x.shape, dtype), point, dtypes)
    init_max = jnp.full((cfg.num_layers, cfg.num_kv_groups, cfg.signal_heads_per_group + 1),
                        -jnp.inf, jnp.float32)
    grads, loss_sum, weight_sum, max_logits = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0, init_max), micro)[0]
    return as_params(grads), loss_sum, weight_sum, max_logits

  def train_step(state: TrainState, batch):
    grads, loss_sum, weight_sum, max_logits = summed_grads(state.params, batch)
    with jax.named_scope("optimizer"):
      denominator = jnp.maximum(weight_sum, 1.0)
      grads = jax.tree.map(lambda g: g / denominator, grads)
      loss, grad_norm = loss_sum / denominator, optax.tree.norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params, max_logits=max_logits)
      learning_rate = applied_learning_rate(opt_state)
      if learning_rate is None:
        learning_rate = schedule(state.step)
      params = optax.apply_updates(state.params, updates)
      # A NaN or inf anywhere in the gradients makes their norm non-finite; the optimizer can also
      # overflow on finite gradients. Either way the step is skipped: the old state is kept.
      leaf_finite = _finite_per_leaf(params, opt_state)
      reason = _nonfinite_reason(jnp.isfinite(loss), jnp.isfinite(grad_norm), jnp.all(leaf_finite))
      finite = reason == 0
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "finite": finite,
        "nonfinite_reason": reason,
        "nonfinite_leaves": ~leaf_finite,
        "learning_rate": learning_rate,
        "tokens": weight_sum,
        "max_logit": jnp.max(max_logits),
        "max_logit_per_layer": jnp.max(max_logits, axis=(1, 2)),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings,
                    mesh) -> TrainState:
  """Shardings of every TrainState leaf: optimizer moments follow their parameter, the rest replicate."""
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # leaves another branch of a partition owns
  opt_shardings = optax.tree_map_params(
      tx, lambda leaf, sharding: leaf if masked(leaf) else sharding, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  return TrainState(replicated, param_shardings, opt_shardings)
