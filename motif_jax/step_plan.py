"""The training step planned from settings: model, mesh, optimizer, shardings and the jitted step.

`plan_step` checks that the model, batch and mesh fit together and builds everything short of
allocating or compiling. It imports no gin, so the trainer (`motif_jax.trainer`), the AOT compiler
(`motif_jax.aot`) and the benchmarks (`bench/`) build the very same step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from motif_jax import checkpoint, configs, sharding, train_step
from motif_jax.model import abstract_params, init_params, param_logical_axes
from motif_jax.train_step import BATCH_KEYS, TrainState, make_train_step, state_shardings


class StepPlan(NamedTuple):
  """The jitted training step and what it was built from; nothing is allocated or compiled yet."""

  cfg: configs.ModelConfig
  mesh: Mesh
  rules: sharding.Rules
  tx: optax.GradientTransformationExtraArgs
  lr: optax.Schedule
  graphdef: nnx.GraphDef
  shardings: TrainState  # a NamedSharding per state leaf
  batch_sharding: NamedSharding
  step_fn: Callable  # (state, batch) -> (state, metrics); the state is donated

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the train state, with its shardings (for restore and lowering)."""
    params = abstract_params(self.cfg)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params,
                       jax.eval_shape(self.tx.init, params))
    return checkpoint.abstract_like(state, self.shardings)

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len),
                                    jnp.float32 if k == "loss_weights" else jnp.int32,
                                    sharding=self.batch_sharding) for k in BATCH_KEYS}

  def checked_leaf_names(self) -> tuple[str, ...]:
    """Names of the leaves the step's `metrics["nonfinite_leaves"]` flags, position by position."""
    state = self.abstract_state()
    return train_step.checked_leaf_names(state.params, state.opt_state)

  def initial_state(self, seed: int) -> TrainState:
    """A freshly initialised train state, laid out by `shardings` (parameters born sharded)."""
    _, params = init_params(self.cfg, seed, self.shardings.params, self.rules)
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state)
    return jax.device_put(state, self.shardings)


def plan_step(*, model: str, model_overrides: dict | None, num_steps: int, batch_size: int,
              micro_batches: int, mesh_shape: Sequence[int], rules: sharding.Rules,
              optimizer: Callable, schedule: Callable, grad_clip_norm: float | None,
              z_loss_weight: float, devices=None) -> StepPlan:
  """Checks the layout and builds the optimizer and the jitted step over `devices` (default: all).

  Raises ValueError naming the setting when the model, batch and mesh do not fit together.
  """
  cfg = configs.get_model_config(model, **dict(model_overrides or {}))
  mesh = sharding.make_mesh(mesh_shape, devices)
  sharding.validate_layout(cfg, mesh, batch_size, rules)
  if (batch_size // micro_batches) % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"micro-batch rows = batch_size / micro_batches = {batch_size // micro_batches} "
                     f"is not divisible by data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}; "
                     "change train.micro_batches or train.batch_size.")
  lr = schedule(total_steps=num_steps)
  logical_axes = param_logical_axes(cfg)

  def build(learning_rate):
    tx = optimizer(learning_rate, logical_axes=logical_axes, num_kv_groups=cfg.num_kv_groups,
                   signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim,
                   mesh=mesh, rules=rules)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx) if grad_clip_norm else tx

  # The schedule runs on the optimizer's own count of applied updates and the rate it gives is kept
  # in the state (`opt_state.hyperparams["learning_rate"]`), which the step logs.
  tx = optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(learning_rate=lr)
  param_shardings = sharding.tree_shardings(logical_axes, mesh, rules)
  shardings = state_shardings(tx, abstract_params(cfg), param_shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  graphdef = _graphdef(cfg, rules)
  step_fn = jax.jit(
      make_train_step(cfg, graphdef, tx, lr, micro_batches=micro_batches,
                      z_loss_weight=z_loss_weight),
      in_shardings=(shardings, {k: batch_sharding for k in BATCH_KEYS}),
      out_shardings=(shardings, None), donate_argnums=(0,))
  return StepPlan(cfg, mesh, rules, tx, lr, graphdef, shardings, batch_sharding, step_fn)


def _graphdef(cfg: configs.ModelConfig, rules: sharding.Rules) -> nnx.GraphDef:
  """The model's graph definition, from an abstract initialisation (no memory, no compute)."""
  captured = {}

  def build():
    captured["graphdef"], params = init_params(cfg, 0, None, rules)
    return params

  jax.eval_shape(build)
  return captured["graphdef"]
