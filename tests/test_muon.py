"""Muon: Newton-Schulz, routing, equality with optax.contrib.muon, and Parallel Muon on 8 CPU devices."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from motif_jax.configs import get_model_config
from motif_jax.model import abstract_params, param_logical_axes
from motif_jax.optim import describe_routing, muonclip, newton_schulz, ns_flops
from motif_jax.optim.muon import (ADAM, MUON, chunk_layout, matrix_muon, orthogonalize,
                                  routing_labels)
from motif_jax.optim.newton_schulz import resolve_coeffs
from motif_jax.sharding import make_mesh, tree_shardings


def _random_tree(seed, tree, scale=1.0):
  """Normal float32 arrays shaped like `tree` (numpy: no per-shape compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_newton_schulz_orthogonalizes_batches_and_tall_matrices(dtype):
  x = jax.random.normal(jax.random.key(0), (3, 48, 80), jnp.float32)
  out = newton_schulz(x, dtype=dtype)
  assert out.shape == x.shape and out.dtype == x.dtype
  singular = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
  assert singular.min() > 0.6 and singular.max() < 1.3, (singular.min(), singular.max())
  tall = newton_schulz(jnp.swapaxes(x, -1, -2), dtype=dtype)
  np.testing.assert_array_equal(np.asarray(tall), np.asarray(jnp.swapaxes(out, -1, -2)))


def test_coefficient_sets():
  assert resolve_coeffs("classic", 3) == ((3.4445, -4.7750, 2.0315),) * 3
  assert len(resolve_coeffs("dion", 5)) == 5
  assert resolve_coeffs(((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), 2)[1] == (4.0, 5.0, 6.0)
  with pytest.raises(ValueError, match="ns_steps=4"):
    resolve_coeffs("dion", 4)
  with pytest.raises(ValueError, match="not a known coefficient set"):
    resolve_coeffs("cubic", 5)
  assert ns_flops(256, 512, 5) == ns_flops(512, 256, 5) == 5 * (4 * 256**2 * 512 + 2 * 256**3
                                                                + 3 * 256**2 + 2 * 256 * 512)


def test_routing_of_tiny_model():
  cfg = get_model_config("tiny")
  axes = param_logical_axes(cfg)
  labels = routing_labels(axes)
  muon_leaves = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
  assert {k for k, v in labels["blocks"]["attn"].items() if v == MUON} | {
      k for k, v in labels["blocks"]["mlp"].items() if v == MUON} == muon_leaves
  assert labels["embedding"] == labels["lm_head"] == labels["final_norm"]["scale"] == ADAM
  assert labels["blocks"]["attn"]["lambda_q1"] == labels["blocks"]["mlp"]["polynorm_weight"] == ADAM
  table = describe_routing(abstract_params(cfg), axes)
  assert "blocks/attn/wq" in table and "Muon   2 x 128x192" in table
  assert re.search(r"embedding\s+\[384, 128\]\s+AdamW", table)


# A small tree with every kind of leaf: stacked and plain matrices (one tall), an embedding, a 1-D gain.
_AXES = {"embedding": P("vocab", "embed"), "stack": P("layers", "embed", "mlp"),
         "tall": P("mlp", "embed"), "gain": P("norm")}
_SHAPES = {"embedding": (40, 24), "stack": (2, 24, 40), "tall": (40, 24), "gain": (24,)}


def _optax_grads_for(targets, mu, step, beta):
  """Gradients that make optax's bias-corrected Nesterov momentum equal `targets` at `step` (1-based).

  optax: m_t = b m_{t-1} + (1-b) g_t;  mu_hat_t = b m_t / (1 - b^(t+1)) + (1-b) g_t / (1 - b^t).
  Returns (g_t, m_t), in float64.
  """
  c_next, c_now = 1 - beta ** (step + 1), 1 - beta**step
  grad = (targets - beta**2 * mu / c_next) / (beta * (1 - beta) / c_next + (1 - beta) / c_now)
  return grad, beta * mu + (1 - beta) * grad


@pytest.mark.parametrize("coeffs, optax_coeffs", [("classic", "standard"), ("dion", "dion")])
def test_matches_optax_contrib_muon(coeffs, optax_coeffs):
  """Like for like: the same Newton-Schulz input (optax fed gradients that undo its bias correction),
  NS in float32, consistent_rms=0.2, decoupled weight decay. Adam leaves against optax.adamw."""
  lr, wd, beta = 0.02, 0.1, 0.95
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), _SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  params = _random_tree(0, shapes, 0.1)
  ours = muonclip(lr, logical_axes=_AXES, num_kv_groups=1, signal_heads_per_group=1, head_dim=1,
                  weight_decay=wd, momentum=beta, ns_coeffs=coeffs, qk_clip_tau=None,
                  ns_dtype=jnp.float32)
  dims = {"embedding": None, "stack": optax.contrib.MuonDimensionNumbers(1, 2),
          "tall": optax.contrib.MuonDimensionNumbers(0, 1), "gain": None}
  reference = optax.contrib.muon(lr, ns_coeffs=optax_coeffs, beta=beta, eps=1e-7, weight_decay=wd,
                                 nesterov=True, muon_weight_dimension_numbers=dims,
                                 consistent_rms=0.2)
  adamw = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd)
  states = ours.init(params), reference.init(params), adamw.init(params)
  update = jax.jit(lambda tx_index, g, s, p: (ours, reference, adamw)[tx_index].update(g, s, p),
                   static_argnums=0)
  matrices = ("stack", "tall")
  buf = {k: np.zeros(_SHAPES[k]) for k in matrices}
  optax_mu = {k: np.zeros(_SHAPES[k]) for k in matrices}
  ours_params, ref_params = params, params
  for step in range(1, 4):
    grads = _random_tree(step, shapes)
    ref_grads = dict(grads)
    for k in matrices:   # our Nesterov input: buf = mu buf + g; g' = g + mu buf
      g = np.asarray(grads[k], np.float64)
      buf[k] = beta * buf[k] + g
      ref_g, optax_mu[k] = _optax_grads_for(g + beta * buf[k], optax_mu[k], step, beta)
      ref_grads[k] = jnp.asarray(ref_g, jnp.float32)
    ours_updates, s0 = update(0, grads, states[0], ours_params)
    ref_updates, s1 = update(1, ref_grads, states[1], ref_params)
    adam_updates, s2 = update(2, grads, states[2], ours_params)
    states = s0, s1, s2
    for k in matrices:
      np.testing.assert_allclose(ours_updates[k], ref_updates[k], rtol=1e-4, atol=2e-6)
    for k in ("embedding", "gain"):
      np.testing.assert_allclose(ours_updates[k], adam_updates[k], rtol=1e-6, atol=1e-9)
    ours_params = optax.apply_updates(ours_params, ours_updates)
    ref_params = optax.apply_updates(ref_params, ref_updates)


@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16])
def test_optax_trace_momentum_equals_the_hand_written_nesterov(grad_dtype):
  """matrix_muon (optax.trace + orthogonalize_updates) against the former hand-written momentum:
  buf = mu buf + g and g' = g + mu buf in float32, then NS, 0.2 sqrt(max(m, n)), weight decay, lr."""
  lr, wd, mu = 0.02, 0.1, 0.95
  axes = {k: _AXES[k] for k in ("stack", "tall")}
  shapes = {k: jax.ShapeDtypeStruct(_SHAPES[k], jnp.float32) for k in axes}
  params = _random_tree(0, shapes, 0.1)
  tx = matrix_muon(lr, logical_axes=axes, weight_decay=wd, momentum=mu, ns_dtype=jnp.float32)

  @jax.jit
  def hand_written(grads, buf, params):
    buf = jax.tree.map(lambda b, g: mu * b + g.astype(jnp.float32), buf, grads)
    nesterov = jax.tree.map(lambda b, g: g.astype(jnp.float32) + mu * b, buf, grads)
    ortho = orthogonalize(nesterov, None, steps=5, coeffs="classic", dtype=jnp.float32, mesh=None)
    updates = jax.tree.map(
        lambda o, p: -lr * (o * (0.2 * np.sqrt(max(o.shape[-2:]))) + wd * p), ortho, params)
    return updates, buf

  state, buf = tx.init(params), jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = jax.tree.map(lambda g: jnp.asarray(g, grad_dtype), _random_tree(step + 1, shapes))
    ours, state = update(grads, state, params)
    want, buf = hand_written(grads, buf, params)
    for k in axes:
      np.testing.assert_allclose(ours[k], want[k], rtol=1e-6, atol=1e-9)
      assert ours[k].dtype == jnp.float32
    params = optax.apply_updates(params, ours)
  np.testing.assert_array_equal(state[0][0].trace["stack"], buf["stack"])  # the float32 buffer


@pytest.fixture(scope="module")
def tiny_problem():
  cfg = get_model_config("tiny")
  axes = param_logical_axes(cfg)
  abstract = abstract_params(cfg)
  params = _random_tree(0, abstract, 0.02)
  grads = [_random_tree(k, abstract) for k in (1, 2)]
  heads = (cfg.num_layers, cfg.num_kv_groups, cfg.signal_heads_per_group + 1)
  max_logits = 150.0 * np.random.default_rng(3).uniform(size=heads).astype(np.float32)   # some heads above tau=100
  kwargs = dict(logical_axes=axes, num_kv_groups=cfg.num_kv_groups,
                signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim)

  def run(mesh):
    # NS in float32: in bfloat16, ulp-level differences of the float32 momentum (fused differently
    # per layout) flip roundings, so sharded and unsharded agree only to ~1e-2.
    tx = muonclip(1e-2, mesh=mesh, ns_dtype=jnp.float32, **kwargs)
    p, gs = params, grads
    if mesh is not None:
      shardings = tree_shardings(axes, mesh)
      p, gs = jax.device_put(p, shardings), [jax.device_put(g, shardings) for g in gs]
    @jax.jit
    def step(g, s, p):
      updates, s = tx.update(g, s, p, max_logits=max_logits)
      return optax.apply_updates(p, updates), updates, s

    state = jax.jit(tx.init)(p)
    for g in gs:
      p, updates, state = step(g, state, p)
    return p, updates

  return run, run(None)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_matches_unsharded(tiny_problem, mesh_shape):
  run, (ref_params, ref_updates) = tiny_problem
  params, updates = run(make_mesh(mesh_shape))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               updates, ref_updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params, ref_params)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)])
def test_parallel_newton_schulz_runs_once_per_matrix(mesh_shape):
  """16 matrices of 256x512 on 8 devices: each device runs NS on 2 whole matrices, nothing more."""
  mesh = make_mesh(mesh_shape)
  axes = {"w": P("layers", "embed", "mlp")}
  tx = matrix_muon(1e-3, logical_axes=axes, mesh=mesh)
  params = {"w": jax.ShapeDtypeStruct((16, 256, 512), jnp.float32,
                                      sharding=tree_shardings(axes, mesh)["w"])}
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(tx.update).lower(params, state, params).compile()
  per_device = compiled.cost_analysis()["flops"]
  ideal = 16 * ns_flops(256, 512, 5) / mesh.size
  assert abs(per_device - ideal) < 0.25 * ideal, (per_device, ideal)
  # Every matmul is local to whole matrices: batch 2, full 256x256 or 256x512 dims.
  dot_shapes = re.findall(r"\[([\d,]+)\]\{[\d,]*\} dot\(", compiled.as_text())
  assert len(dot_shapes) == 3 * 5 and set(dot_shapes) == {"2,256,256", "2,256,512"}, dot_shapes


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2), (8, 1, 1)])
def test_chunked_newton_schulz_equals_whole_groups(mesh_shape):
  """20 matrices of 48x80 in three leaves (one tall, so transposed into the group), chunked so that
  3 fit a chunk: the same orthogonalized leaves as one whole-group batch, on one device and over a
  mesh, and Newton-Schulz's matmuls run on [3, 48, 48|80] chunks inside a loop."""
  axes = {"a": P("layers", "embed", "mlp"), "b": P("layers", "mlp", "embed"), "c": P("embed", "mlp")}
  shapes = {"a": (12, 48, 80), "b": (7, 80, 48), "c": (48, 80)}
  rng = np.random.default_rng(7)
  leaves = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  mesh = None if mesh_shape is None else make_mesh(mesh_shape)
  specs = None
  if mesh is not None:
    shardings = tree_shardings(axes, mesh)
    leaves = jax.device_put(leaves, shardings)
    specs = {k: s.spec for k, s in shardings.items()}
  chunk = 3 * 4 * 48 * 80
  run = lambda chunk_bytes: jax.jit(lambda l: orthogonalize(
      l, specs, steps=5, coeffs="classic", dtype=jnp.float32, mesh=mesh, chunk_bytes=chunk_bytes))
  whole, chunked = run(None)(leaves), run(chunk)(leaves)
  for k in shapes:
    np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, atol=1e-6)
  assert chunk_layout(20, 48, 80, shards=1, chunk_bytes=chunk) == (7, 3)
  assert chunk_layout(20, 48, 80, shards=8, chunk_bytes=chunk) == (1, 3)
  assert chunk_layout(20, 48, 80, shards=1, chunk_bytes=None) == (1, 20)
  if mesh is None:  # one device: 7 chunks of 3 (1 padding matrix), each step's matmuls on a chunk
    hlo = run(chunk).lower(leaves).compile().as_text()
    dot_shapes = set(re.findall(r"\[([\d,]+)\]\{[\d,]*\} dot\(", hlo))
    assert dot_shapes == {"3,48,48", "3,48,80"}, dot_shapes
