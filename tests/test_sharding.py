"""Sharded loss and gradients equal the single-device ones; impossible layouts fail before compiling."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from motif_jax import configs, sharding
from motif_jax.model import init_params, param_logical_axes
from motif_jax.train_step import cross_entropy

CFG = configs.get_model_config("tiny", num_kv_groups=2, signal_heads_per_group=2)


def _batch(rows=8, seq=32):
  keys = jax.random.split(jax.random.key(7), 3)
  tokens = jax.random.randint(keys[0], (rows, seq + 1), 1, 259)
  boundaries = jax.random.bernoulli(keys[1], 0.08, (rows, seq)).astype(jnp.int32)
  segment_ids = 1 + jnp.cumsum(boundaries, axis=1)
  starts = jnp.concatenate([jnp.ones((rows, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  index = jnp.broadcast_to(jnp.arange(seq), (rows, seq))
  positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  weights = jax.random.uniform(keys[2], (rows, seq)) > 0.1
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids,
              positions=positions, loss_weights=weights.astype(jnp.float32))


def _loss_and_grads(mesh):
  rules = sharding.DEFAULT_RULES if mesh is not None else None
  shardings = (sharding.tree_shardings(param_logical_axes(CFG), mesh) if mesh is not None else None)
  batch = _batch()
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    graphdef, params = init_params(CFG, 3, shardings, rules)

    def loss(p, b):
      logits = nnx.merge(graphdef, p)(b["inputs"], b["positions"], b["segment_ids"])
      total, weight = cross_entropy(logits, b["targets"], b["loss_weights"], z_loss_weight=1e-3)
      return total / weight

    if mesh is not None:
      batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    if mesh is not None:  # parameters really are laid out over the mesh
      expected = NamedSharding(mesh, sharding.logical_to_spec(("layers", "embed", "q_heads")))
      assert params["blocks"]["attn"]["wq"].sharding.is_equivalent_to(expected, 3)
    value, grads = jax.jit(jax.value_and_grad(loss))(params, batch)
  return jax.device_get((value, grads))


@pytest.fixture(scope="module")
def single_device():
  return _loss_and_grads(None)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_loss_and_grads_equal_single_device(devices, single_device, mesh_shape):
  single_loss, single_grads = single_device
  loss, grads = _loss_and_grads(sharding.make_mesh(mesh_shape))
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads,
               single_grads)


def test_mesh_shape_minus_one_takes_the_rest(devices):
  assert sharding.make_mesh((2, -1, 1)).devices.shape == (2, 4, 1)
  assert sharding.make_mesh((1, 1, -1)).devices.shape == (1, 1, 8)


def test_logical_rules_use_each_mesh_axis_once():
  rules = sharding.DEFAULT_RULES + (("twice", "tensor"),)
  assert sharding.logical_to_spec(("mlp", "twice"), rules) == P("tensor", None)


@pytest.mark.parametrize("mesh_shape, cfg_changes, batch, message", [
    ((1, 1, 4), dict(num_kv_groups=2), 8, "num_kv_groups=2 is not divisible by 4"),
    ((1, 1, 8), dict(num_kv_groups=8, intermediate_size=500), 8, "intermediate_size=500"),
    ((2, 4, 1), dict(), 12, "batch_size=12 is not divisible by 8"),
    ((1, 8, 1), dict(hidden_size=100, head_dim=20), 8, "hidden_size=100"),
])
def test_impossible_layouts_name_the_setting(devices, mesh_shape, cfg_changes, batch, message):
  cfg = CFG.replace(**cfg_changes)
  with pytest.raises(ValueError, match=message):
    sharding.validate_layout(cfg, sharding.make_mesh(mesh_shape), batch)


def test_mesh_larger_than_the_devices_fails(devices):
  with pytest.raises(ValueError, match=r"needs 16 devices but only 8"):
    sharding.make_mesh((2, 4, 2))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh((-1, -1, 1))


def test_unknown_logical_axis_names_the_fix():
  with pytest.raises(ValueError, match="has no sharding rule"):
    sharding.logical_to_spec(("no_such_axis",))
