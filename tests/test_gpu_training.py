"""The GPU tier (`JAX_PLATFORMS=cuda python -m pytest -m gpu tests`): what a CPU run cannot check.

On CPU, Newton-Schulz upcasts bfloat16 operands to float32 and XLA:CPU compiles other kernels, so the
bf16 optimizer path at real widths is only ever run here. Each test skips without a GPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from motif_jax import configs, optim, sharding
from motif_jax.model import abstract_params, param_logical_axes
from motif_jax.optim.muon import MUON, RMS_SCALE, path_name, routing_labels
from motif_jax.step_plan import plan_step

pytestmark = pytest.mark.gpu

# (preset, layers): Motif-2.6B at full depth; Motif-2-12.7B's widths at the depth one GPU holds.
REAL_SHAPES = [("motif-2.6b", None), ("motif-2-12.7b", 8)]
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.1


def _config(preset, layers):
  return configs.get_model_config(preset, **({"num_layers": layers} if layers else {}))


def _random_leaves(abstract, seed, scale):
  """Normal float32 arrays shaped like `abstract`, drawn on the device."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  draw = jax.jit(lambda key, shape: scale * jax.random.normal(key, shape, jnp.float32),
                 static_argnums=1)
  return jax.tree.unflatten(treedef, [draw(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def _per_matrix_relative_error(got, want):
  got = got.reshape(-1, *got.shape[-2:])
  want = want.reshape(-1, *want.shape[-2:])
  return jnp.sqrt(jnp.sum(jnp.square(got - want), (-2, -1)) / jnp.sum(jnp.square(want), (-2, -1)))


@pytest.mark.parametrize("preset, layers", REAL_SHAPES)
def test_bf16_muonclip_first_update_matches_float32_newton_schulz_per_leaf(preset, layers):
  """The bf16 MuonClip update of every Muon matrix against float32 Newton-Schulz of that leaf alone.

  The reference runs each leaf in its own jit, with no grouping, concatenation or chunking: a fault in
  how the optimizer assembles its batches (the first-step inf in w_up at full depth came from there)
  shows as a wrong matrix, not only as a non-finite one. At step 1 the Nesterov input is 1.95 g,
  which Newton-Schulz's normalisation removes. Measured on the H200: per-matrix error 0.013 (2.6B)
  and 0.020 (12.7B widths), the rounding of a bf16 iteration.
  """
  cfg = _config(preset, layers)
  axes = param_logical_axes(cfg)
  abstract = abstract_params(cfg)
  params = _random_leaves(abstract, 0, 0.02)
  grads = _random_leaves(abstract, 1, 1e-3)
  tx = optim.muonclip(LEARNING_RATE, logical_axes=axes, num_kv_groups=cfg.num_kv_groups,
                      signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim,
                      weight_decay=WEIGHT_DECAY, qk_clip_tau=None)
  max_logits = jnp.zeros((cfg.num_layers, cfg.num_kv_groups, cfg.signal_heads_per_group + 1))
  updates = jax.jit(lambda g, p: tx.update(g, tx.init(p), p, max_logits=max_logits)[0])(grads, params)
  reference_ns = jax.jit(lambda g: optim.newton_schulz(g, dtype=jnp.float32))
  labels = dict((path_name(p), l) for p, l in jax.tree_util.tree_flatten_with_path(
      routing_labels(axes), is_leaf=lambda x: isinstance(x, str))[0])
  checked = 0
  for path, update in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = path_name(path)
    if labels[name] != MUON:
      continue
    grad, param = _leaf(grads, path), _leaf(params, path)
    scale = RMS_SCALE * math.sqrt(max(grad.shape[-2:]))
    # update = -lr (scale NS(g') + wd W): take the weight decay off to get the orthogonalized g'.
    direction = (update + LEARNING_RATE * WEIGHT_DECAY * param) / (-LEARNING_RATE * scale)
    error = np.asarray(_per_matrix_relative_error(direction, reference_ns(grad)))
    assert bool(jnp.all(jnp.isfinite(update))), f"{name}: non-finite update"
    assert error.max() < 0.05, f"{name}: per-matrix relative error up to {error.max():.3f} " \
                               f"(matrix {int(error.argmax())}); bf16 rounding gives about 0.02"
    checked += 1
  assert checked == 7  # wq, wk, wv, wo, w_gate, w_up, w_down


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.parametrize("preset, layers", REAL_SHAPES)
def test_gpu_default_trains_on_a_fixed_batch_for_20_steps(preset, layers):
  """gpu.gin's step (Pallas kernels, remat 'kernels', unrolled layers, MuonClip in bf16) on one GPU:
  every step finite and applied, the loss falling. Before the fix, Motif-2.6B's went NaN at step 2."""
  overrides = dict(attention_impl="pallas", mlp_impl="pallas", remat_policy="kernels",
                   scan_layers=False, **({"num_layers": layers} if layers else {}))
  rows, seq_len = 2, 4096
  plan = plan_step(model=preset, model_overrides=overrides, num_steps=20, batch_size=rows,
                   micro_batches=1, mesh_shape=(1, -1, 1), rules=sharding.DEFAULT_RULES,
                   optimizer=optim.muonclip,
                   schedule=lambda total_steps: optax.constant_schedule(1e-4),
                   grad_clip_norm=1.0, z_loss_weight=0.0, devices=jax.devices()[:1])
  tokens = jax.random.randint(jax.random.key(0), (rows, seq_len + 1), 0, plan.cfg.vocab_size)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               loss_weights=jnp.ones((rows, seq_len), jnp.float32),
               segment_ids=jnp.ones((rows, seq_len), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len)))
  losses = []
  with jax.set_mesh(plan.mesh):
    state = plan.initial_state(0)
    batch = jax.device_put(batch, plan.batch_sharding)
    for _ in range(20):
      state, metrics = plan.step_fn(state, batch)
      assert bool(metrics["finite"]), f"step {len(losses) + 1} was skipped: {metrics}"
      losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state.params))
