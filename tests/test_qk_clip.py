"""QK-Clip on the tiny model: an inflated head is brought back to tau, every other head is untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from motif_jax.configs import get_model_config
from motif_jax.model import MotifForCausalLM, param_logical_axes, split_model
from motif_jax.optim import max_logit_per_layer, muonclip
from motif_jax.optim.qk_clip import qk_clip

LAYER, GROUP, HEAD = 0, 1, 0          # the inflated head: signal head 0 of group 1 in layer 0


@pytest.fixture(scope="module")
def problem():
  cfg = get_model_config("tiny")
  graphdef, params = split_model(MotifForCausalLM(cfg, rngs=nnx.Rngs(0)))
  s, hd = cfg.signal_heads_per_group, cfg.head_dim
  start = (GROUP * (s + 1) + HEAD) * hd
  wq = params["blocks"]["attn"]["wq"]
  params["blocks"]["attn"]["wq"] = wq.at[LAYER, :, start:start + hd].multiply(30.0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
  max_logits = jax.jit(
      lambda p: nnx.merge(graphdef, p)(tokens, return_aux=True)[1]["max_logits"])
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  return cfg, params, grads, max_logits


def _step(cfg, params, grads, max_logits, lr, tau):
  tx = muonclip(lr, logical_axes=param_logical_axes(cfg), num_kv_groups=cfg.num_kv_groups,
                signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim,
                qk_clip_tau=tau)
  updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, max_logits=max_logits))(
      grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def _tau(before):
  """A threshold between the inflated head's max logit and every other head's."""
  target = float(before[LAYER, GROUP, HEAD])
  others = float(before.at[LAYER, GROUP, HEAD].set(-jnp.inf).max())
  assert target > max(others, 0.0), (target, others)
  return 0.5 * (target + max(others, 0.0)), target


@pytest.mark.parametrize("lr", [0.0, 1e-3])
def test_clips_only_the_hot_head(problem, lr):
  cfg, params, grads, max_logits = problem
  before = max_logits(params)
  tau, target = _tau(before)
  clipped = _step(cfg, params, grads, before, lr, tau)
  plain = _step(cfg, params, grads, before, lr, None)
  gamma = tau / target

  # Parameters: identical except the hot head's wq columns and its group's signal key k1_g.
  s, hd = cfg.signal_heads_per_group, cfg.head_dim
  q_cols = slice((GROUP * (s + 1) + HEAD) * hd, (GROUP * (s + 1) + HEAD + 1) * hd)
  k_cols = slice(2 * GROUP * hd, (2 * GROUP + 1) * hd)
  for path, a in jax.tree_util.tree_flatten_with_path(clipped)[0]:
    b = plain
    for key in path:
      b = b[key.key]
    a, b = np.array(a), np.array(b)
    name = path[-1].key
    if name in ("wq", "wk"):
      cols = q_cols if name == "wq" else k_cols
      np.testing.assert_allclose(a[LAYER, :, cols], b[LAYER, :, cols] * np.sqrt(gamma),
                                 rtol=1e-6, atol=1e-9)
      a[LAYER, :, cols] = b[LAYER, :, cols]
    np.testing.assert_array_equal(a, b, err_msg=name)

  # Logits of the clipped layer, recomputed (later layers see a changed input): the hot head's max
  # scales by gamma, its group's other signal heads (they read the clipped k1_g) by sqrt(gamma).
  after, unclipped = max_logits(clipped)[LAYER], max_logits(plain)[LAYER]
  expected = unclipped.at[GROUP, HEAD].multiply(gamma)
  expected = expected.at[GROUP, HEAD + 1:s].multiply(np.sqrt(gamma))
  np.testing.assert_allclose(after, expected, rtol=1e-4)
  if lr == 0.0:
    assert float(after[GROUP, HEAD]) <= tau * (1 + 1e-5)
  assert float(max_logit_per_layer(after[None])[0]) < target


def test_requires_max_logits():
  tx = qk_clip(num_kv_groups=2, signal_heads_per_group=2, head_dim=4)
  params = {"blocks": {"attn": {"wq": jnp.zeros((1, 8, 24)), "wk": jnp.zeros((1, 8, 16))}}}
  with pytest.raises(ValueError, match="max_logits"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match=r"expected \[layers, 2, 3\]"):
    tx.update(params, tx.init(params), params, max_logits=jnp.zeros((1, 2, 2)))
