"""Model semantics: parameter counts, GDA against a plain Differential Transformer, packing, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from motif_jax import configs, sharding
from motif_jax.model import MotifForCausalLM, abstract_params, param_logical_axes, split_model
from motif_jax.model.attention import GroupedDifferentialAttention
from motif_jax.model.layers import lm_logits, rotary_embedding


def test_parameter_counts_match_the_released_models():
  assert configs.count_params(configs.get_model_config("motif-2-12.7b")) == 12_703_860_896
  assert configs.count_params(configs.get_model_config("motif-2.6b")) == 2_597_218_432


def test_lambda_init_uses_the_zero_based_layer_index():
  cfg = configs.get_model_config("tiny")
  np.testing.assert_allclose(cfg.lambda_init(0), 0.8 - 0.6 * np.exp(0.3), rtol=1e-6)
  assert abs(float(cfg.lambda_init(0)) + 0.0099) < 1e-3


def _plain_diff_attention(x, attn, layer_index, cfg):
  """Original Differential Transformer, one head pair at a time (1:1 ratio), written independently."""
  b, t, _ = x.shape
  hd = cfg.head_dim
  wq, wk, wv, wo = (np.asarray(getattr(attn, n)[...], np.float64) for n in ("wq", "wk", "wv", "wo"))
  x = np.asarray(x, np.float64)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  lam_init = 0.8 - 0.6 * np.exp(-0.3 * (layer_index - 1))
  lam = (np.exp(np.sum(np.asarray(attn.lambda_q1[...], np.float64) * np.asarray(attn.lambda_k1[...])))
         - np.exp(np.sum(np.asarray(attn.lambda_q2[...], np.float64) * np.asarray(attn.lambda_k2[...])))
         + lam_init)
  mask = np.tril(np.ones((t, t), bool))
  heads = []
  for g in range(cfg.num_kv_groups):
    def proj(w, index):
      y = x @ w[:, index * hd:(index + 1) * hd]
      return y

    q1, q2 = proj(wq, 2 * g), proj(wq, 2 * g + 1)
    k1, k2 = proj(wk, 2 * g), proj(wk, 2 * g + 1)
    v = np.concatenate([proj(wv, 2 * g), proj(wv, 2 * g + 1)], axis=-1)
    rope = lambda u: np.asarray(rotary_embedding(jnp.asarray(u, jnp.float32)[:, :, None], positions,
                                                 cfg.rope_theta))[:, :, 0].astype(np.float64)
    q1, q2, k1, k2 = rope(q1), rope(q2), rope(k1), rope(k2)

    def softmax_map(q, k):
      s = np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(hd)
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      return p / p.sum(-1, keepdims=True)

    o = softmax_map(q1, k1) @ v - lam * (softmax_map(q2, k2) @ v)
    o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + cfg.attention_norm_eps)
    o = o * np.asarray(attn.sub_norm_scale[...]) * (1 - lam_init)
    heads.append(o)
  return np.concatenate(heads, axis=-1) @ wo


def test_one_to_one_gda_equals_plain_differential_attention():
  cfg = configs.get_model_config("tiny", signal_heads_per_group=1, num_kv_groups=3)
  attn = GroupedDifferentialAttention(cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, 24, cfg.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
  for layer_index in (0, 5):
    out, max_logits = attn(x, positions, None, layer_index)
    expected = _plain_diff_attention(x, attn, layer_index, cfg)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-4, atol=2e-5)
  assert max_logits.shape == (3, 2)


def test_four_to_one_max_logits_match_explicit_scores():
  cfg = configs.get_model_config("tiny", signal_heads_per_group=4, num_kv_groups=2)
  attn = GroupedDifferentialAttention(cfg, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 16, cfg.hidden_size), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  _, max_logits = attn(x, positions, None, 1)
  hd, s = cfg.head_dim, 4
  q = rotary_embedding((x @ attn.wq[...]).reshape(2, 16, 2, s + 1, hd), positions, cfg.rope_theta)
  k = rotary_embedding((x @ attn.wk[...]).reshape(2, 16, 2, 2, hd), positions, cfg.rope_theta)
  causal = np.tril(np.ones((16, 16), bool))
  for g in range(2):
    for j in range(s + 1):
      key = k[:, :, g, 0] if j < s else k[:, :, g, 1]
      scores = np.einsum("bqd,bkd->bqk", q[:, :, g, j], key) / np.sqrt(hd)
      np.testing.assert_allclose(max_logits[g, j], scores[:, causal].max(), rtol=1e-5)


def _tiny_model(**overrides):
  cfg = configs.get_model_config("tiny", **overrides)
  return cfg, MotifForCausalLM(cfg, rngs=nnx.Rngs(0))


def test_packed_rows_give_each_document_its_own_logits():
  cfg, model = _tiny_model()
  lengths = (7, 12, 5)
  docs = [jax.random.randint(jax.random.key(10 + i), (n,), 0, cfg.vocab_size) for i, n in enumerate(lengths)]
  tokens = jnp.concatenate(docs)[None]
  segment_ids = jnp.concatenate([jnp.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
  positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
  packed = model(tokens, positions, segment_ids)
  start = 0
  for doc, n in zip(docs, lengths):
    alone = model(doc[None])
    np.testing.assert_allclose(packed[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
    start += n


@pytest.mark.parametrize("policy", ["none", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(policy):
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 384)

  def loss_and_grads(remat_policy):
    cfg, model = _tiny_model(remat_policy=remat_policy)
    graphdef, params = split_model(model)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return jax.value_and_grad(loss)(params)

  (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads("full"), loss_and_grads(policy)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_a, grads_b)


def test_unrolled_layers_equal_the_scan():
  """scan_layers=False: the same logits, max logits and gradients as the scan over layers."""
  tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 384)
  weights = jax.random.normal(jax.random.key(7), (2, 16, 384))

  def run(scan_layers):
    _, model = _tiny_model(scan_layers=scan_layers, num_layers=3, compute_dtype="float32")
    graphdef, params = split_model(model)

    def loss(p):
      logits, aux = nnx.merge(graphdef, p)(tokens, return_aux=True)
      return jnp.sum(logits * weights), aux["max_logits"]

    return jax.value_and_grad(loss, has_aux=True)(params)

  ((loss_a, max_a), grads_a), ((loss_b, max_b), grads_b) = run(True), run(False)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  np.testing.assert_allclose(max_a, max_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max()),
               grads_a, grads_b)


def test_tied_embeddings_have_no_lm_head():
  params = abstract_params(configs.get_model_config("tiny", tie_embeddings=True))
  assert "lm_head" not in params and "embedding" in params


def test_abstract_12_7b_sharded_over_8_devices_reports_per_device_bytes(devices):
  cfg = configs.get_model_config("motif-2-12.7b")
  mesh = sharding.make_mesh((1, 4, 2))
  shardings = sharding.tree_shardings(param_logical_axes(cfg), mesh)
  shapes = abstract_params(cfg)
  per_device = {d: 0 for d in mesh.devices.flat}
  for shape, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
    shard_shape = sh.shard_shape(shape.shape)
    for d in sh.device_set:
      per_device[d] += int(np.prod(shard_shape)) * shape.dtype.itemsize
  total = configs.count_params(cfg) * 4
  print(f"motif-2-12.7b float32 parameters per device on mesh (1,4,2): "
        f"{max(per_device.values()) / 2**30:.2f} GiB (total {total / 2**30:.2f} GiB)")
  assert max(per_device.values()) == min(per_device.values())
  # 1-D params are replicated; everything else splits 8 ways.
  assert total / 8 <= max(per_device.values()) < total / 8 * 1.001


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_lm_logits_gradients_match_autodiff_of_the_float32_matmul(dtype, tolerance):
  """lm_logits' backward (cotangent cast to the compute dtype) against autodiff in float32."""
  kx, kh, kc = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 16, 64), jnp.float32)
  head = jax.random.normal(kh, (64, 384), jnp.float32) / 8
  cotangent = jax.random.normal(kc, (2, 16, 384), jnp.float32)
  exact = jax.vjp(lambda a, b: jnp.einsum("btd,dv->btv", a, b), x, head)
  got = jax.vjp(lm_logits, x.astype(dtype), head.astype(dtype))
  assert got[0].dtype == jnp.float32
  np.testing.assert_allclose(got[0], exact[0], rtol=tolerance, atol=tolerance)
  for g, want in zip(got[1](cotangent), exact[1](cotangent)):
    assert g.dtype == dtype
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(want) / scale,
                               atol=tolerance)
