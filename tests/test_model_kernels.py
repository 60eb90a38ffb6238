"""The model with its Pallas kernels (interpret mode on CPU) equals the model with the references."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from motif_jax import configs, sharding
from motif_jax.model import init_params, param_logical_axes
from motif_jax.train_step import cross_entropy

ROWS, SEQ = 4, 40  # SEQ off the kernels' block sizes


def _batch():
  keys = jax.random.split(jax.random.key(11), 2)
  tokens = jax.random.randint(keys[0], (ROWS, SEQ + 1), 1, 259)
  segment_ids = 1 + jnp.cumsum(jax.random.bernoulli(keys[1], 0.1, (ROWS, SEQ)), axis=1)
  positions = jnp.broadcast_to(jnp.arange(SEQ), (ROWS, SEQ))  # positions only feed RoPE here
  return tokens[:, :-1], tokens[:, 1:], segment_ids.astype(jnp.int32), positions


def _loss_and_grads(cfg, mesh=None):
  inputs, targets, segment_ids, positions = _batch()
  rules = sharding.DEFAULT_RULES if mesh is not None else None
  shardings = sharding.tree_shardings(param_logical_axes(cfg), mesh) if mesh is not None else None
  context = jax.set_mesh(mesh) if mesh is not None else _Null()
  with context:
    graphdef, params = init_params(cfg, 5, shardings, rules)

    def loss(p):
      logits, aux = nnx.merge(graphdef, p)(inputs, positions, segment_ids, return_aux=True)
      total, weight = cross_entropy(logits, targets, jnp.ones_like(targets, jnp.float32))
      return total / weight, aux["max_logits"]

    (value, max_logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return jax.device_get((value, max_logits, grads))


class _Null:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


CFG = configs.get_model_config("tiny", num_kv_groups=2, signal_heads_per_group=2, num_layers=2)


@pytest.fixture(scope="module")
def reference():
  return _loss_and_grads(CFG)


def _assert_same(got, want, rtol):
  (loss, max_logits, grads), (ref_loss, ref_max, ref_grads) = got, want
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
  np.testing.assert_allclose(max_logits, ref_max, rtol=rtol, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=50 * rtol, atol=1e-6), grads,
               ref_grads)


on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="interpret-mode checks; TPU interpret mode calls back into a CPU device")


@pytest.mark.parametrize("backend, remat_policy",
                         [("gpu", "full"), ("gpu", "kernels"), pytest.param("tpu", "none", marks=on_cpu)])
def test_pallas_model_equals_reference(reference, backend, remat_policy):
  # TPU interpret mode runs its kernels through IO callbacks, which remat cannot differentiate.
  cfg = CFG.replace(attention_impl="pallas", mlp_impl="pallas", pallas_backend=backend,
                    pallas_interpret=True, remat_policy=remat_policy)
  _assert_same(_loss_and_grads(cfg), reference, rtol=1e-5)


def _recomputed_kernel_ops(remat_policy: str) -> dict[str, int]:
  """Ops of each Pallas forward kernel that the compiled gradient runs again in the backward.

  Counted in the optimized HLO (after XLA's dead-code elimination) by op_name: JAX marks the
  recomputation `rematted_computation`; interpret mode lowers a kernel to ops named after it.
  """
  cfg = CFG.replace(attention_impl="pallas", mlp_impl="pallas", pallas_backend="gpu",
                    pallas_interpret=True, remat_policy=remat_policy)
  inputs, _, segment_ids, positions = _batch()
  graphdef, params = init_params(cfg, 5)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(inputs, positions, segment_ids))
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  recomputed = re.findall(r'op_name="([^"]*rematted_computation[^"]*)"', hlo)
  return {name: sum(name in op for op in recomputed) for name in ("gda_forward", "polynorm_forward")}


@on_cpu
def test_kernels_remat_policy_keeps_the_forward_kernels_out_of_the_backward():
  """"full" runs both forward kernels again in the backward; "attention" keeps the attention
  kernel's residuals, "kernels" those of both kernels, so neither is run again."""
  full, attention, kernels = (_recomputed_kernel_ops(p) for p in ("full", "attention", "kernels"))
  assert full["gda_forward"] > 0 and full["polynorm_forward"] > 0
  assert attention["gda_forward"] == 0 and attention["polynorm_forward"] > 0
  assert kernels == {"gda_forward": 0, "polynorm_forward": 0}


@pytest.mark.slow
def test_sharded_pallas_model_equals_reference(devices, reference):
  cfg = CFG.replace(attention_impl="pallas", mlp_impl="pallas", pallas_backend="gpu",
                    pallas_interpret=True)
  _assert_same(_loss_and_grads(cfg, sharding.make_mesh((2, 2, 2))), reference, rtol=1e-5)


@pytest.mark.gpu
def test_compiled_gpu_kernels_in_the_2_6b_layer_shapes():
  """Two motif-2.6b-width layers in bfloat16: compiled kernels against the XLA reference path."""
  cfg = configs.get_model_config("motif-2.6b", num_layers=2, vocab_size=4096,
                                 signal_heads_per_group=2)
  tokens = jax.random.randint(jax.random.key(1), (2, 513), 0, cfg.vocab_size)
  segment_ids = jnp.where(jnp.arange(512) < 300, 1, 2)[None].repeat(2, 0).astype(jnp.int32)

  def run(model_cfg):
    graphdef, params = init_params(model_cfg, 0)

    def loss(p):
      logits, aux = nnx.merge(graphdef, p)(tokens[:, :-1], None, segment_ids, return_aux=True)
      total, weight = cross_entropy(logits, tokens[:, 1:], jnp.ones((2, 512), jnp.float32))
      return total / weight, aux["max_logits"]

    return jax.device_get(jax.jit(jax.value_and_grad(loss, has_aux=True))(params))

  (loss, max_logits), grads = run(cfg.replace(attention_impl="pallas", mlp_impl="pallas"))
  (ref_loss, ref_max), ref_grads = run(cfg)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)
  np.testing.assert_allclose(max_logits, ref_max, rtol=2e-2, atol=2e-2)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    error = np.linalg.norm(np.asarray(got, np.float64) - want) / (np.linalg.norm(want) + 1e-12)
    assert error < 5e-2, error
