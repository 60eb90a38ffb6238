"""Fused GDA attention: kernels against the jnp reference, outputs, max logits and gradients.

CPU runs use interpret mode (plain `interpret=True` for the Triton kernel, `pltpu.InterpretParams()` for
the Mosaic TPU kernel) on tiny shapes; the `on_gpu` tests run the compiled Triton kernels and the
cuDNN composition at the 12.7B head shapes and are skipped unless JAX's default backend is a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gda_attention import (GdaOutput, gda_attention, gda_attention_reference,
                                          gda_attention_sharded)

on_gpu = pytest.mark.gpu  # compiled kernels: the GPU tier (tests/conftest.py skips it elsewhere)
on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="CPU-side test (interpret mode, simulated devices)")


def make_inputs(seed, *, batch=1, seq_len=72, groups=2, signal_heads=4, head_dim=32,
                dtype=jnp.float32, segments=True):
  """Fresh random GDA inputs; segment ids (if any) start new documents at random positions."""
  keys = jax.random.split(jax.random.key(seed), 6)
  shape = (batch, seq_len, groups, head_dim)
  inputs = (jax.random.normal(keys[0], (batch, seq_len, groups, signal_heads, head_dim), dtype),
            jax.random.normal(keys[1], shape, dtype),
            jax.random.normal(keys[2], shape, dtype),
            jax.random.normal(keys[3], shape, dtype),
            jax.random.normal(keys[4], shape[:-1] + (2 * head_dim,), dtype))
  segment_ids = None
  if segments:
    starts = jax.random.bernoulli(keys[5], 0.08, (batch, seq_len)).astype(jnp.int32)
    segment_ids = jnp.cumsum(starts, axis=1)
  return inputs, segment_ids


def compile_and_run(fn, *args):
  """Runs jit(fn); on CPU with XLA's backend optimisations off, which compiles the interpret-mode
  kernels about four times faster (they run for milliseconds either way)."""
  options = None
  if jax.default_backend() == "cpu":
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return jax.jit(fn).trace(*args).lower().compile(compiler_options=options)(*args)


def outputs_and_grads(fn, inputs, seed=100):
  """fn's outputs and the input gradients for random cotangents on every output field."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    leaves, treedef = jax.tree_util.tree_flatten(out)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    cotangents = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    return out, vjp(cotangents)
  return compile_and_run(run, *inputs)


def assert_close(actual, expected, tol, name):
  """|actual - expected| <= tol * (|expected| + max|expected|), element-wise, in float32."""
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def check_against_reference(inputs, segment_ids, *, causal, tol, **kernel_kwargs):
  kernel = functools.partial(gda_attention, segment_ids=segment_ids, causal=causal, **kernel_kwargs)
  reference = functools.partial(gda_attention_reference, segment_ids=segment_ids, causal=causal)
  out, grads = outputs_and_grads(kernel, inputs)
  ref_out, ref_grads = outputs_and_grads(reference, inputs)
  assert out.signal.dtype == inputs[0].dtype and out.max_logits.dtype == jnp.float32
  for name in GdaOutput._fields:
    assert getattr(out, name).shape == getattr(ref_out, name).shape, name
    assert_close(getattr(out, name), getattr(ref_out, name), tol, name)
  for name, grad, ref_grad in zip(("dq_signal", "dq_noise", "dk_signal", "dk_noise", "dvalue"),
                                  grads, ref_grads):
    assert_close(grad, ref_grad, tol, name)


# --- The reference against the SPEC's four plain attention calls and brute-force max logits. ---


def test_reference_matches_four_plain_attention_calls():
  (q_signal, q_noise, k_signal, k_noise, value), segment_ids = make_inputs(0, batch=2, seq_len=40)
  out = compile_and_run(functools.partial(gda_attention, segment_ids=segment_ids, impl="reference"),
                        q_signal, q_noise, k_signal, k_noise, value)
  batch, seq_len, groups, signal_heads, head_dim = q_signal.shape
  mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  attend = functools.partial(jax.nn.dot_product_attention, mask=mask, is_causal=True,
                             implementation="xla")
  v1, v2 = value[..., :head_dim], value[..., head_dim:]
  q_flat = q_signal.reshape(batch, seq_len, groups * signal_heads, head_dim)
  signal = jnp.concatenate([attend(q_flat, k_signal, v1), attend(q_flat, k_signal, v2)], -1)
  noise = jnp.concatenate([attend(q_noise, k_noise, v1), attend(q_noise, k_noise, v2)], -1)
  assert_close(out.signal, signal.reshape(out.signal.shape), 1e-5, "signal")
  assert_close(out.noise, noise, 1e-5, "noise")

  allowed = np.tril(np.ones((seq_len, seq_len), bool)) & np.asarray(mask[:, 0])  # [B, T, T]
  queries = np.concatenate([np.asarray(q_signal), np.asarray(q_noise)[:, :, :, None]], axis=3)
  keys = np.stack([np.asarray(k_signal)] * signal_heads + [np.asarray(k_noise)], axis=3)
  logits = np.einsum("btghd,bughd->btugh", queries, keys) / np.sqrt(head_dim)
  max_logits = np.where(allowed[..., None, None], logits, -np.inf).max(axis=(0, 1, 2))  # [G, S+1]
  assert_close(out.max_logits, max_logits, 1e-5, "max_logits")


def test_argument_errors():
  inputs, _ = make_inputs(1, seq_len=16)
  with pytest.raises(ValueError, match="impl="):
    gda_attention(*inputs, impl="flash")
  with pytest.raises(ValueError, match="value must be"):
    gda_attention(*inputs[:4], inputs[4][:, :8])
  with pytest.raises(ValueError, match="powers of two"):
    gda_attention(*inputs, impl="pallas_gpu", block_q=48)


# --- Kernels in interpret mode on CPU. ---


@on_cpu
def test_gpu_kernel_interpret_packed_segments_float32():
  """S=4, causal, random document boundaries, T=72 off the 32 block: float32 to 1e-5."""
  inputs, segment_ids = make_inputs(2, seq_len=72)
  check_against_reference(inputs, segment_ids, causal=True, tol=1e-5, impl="pallas_gpu",
                          block_q=32, block_k=32, block_q_dq=16, block_k_dq=32,
                          block_q_dkv=32, block_k_dkv=16, interpret=True)


@on_cpu
def test_gpu_kernel_interpret_ratio_one_bfloat16_not_causal():
  """S=1 (the original Differential Transformer), bfloat16, no causal mask, T=48 off the block."""
  inputs, _ = make_inputs(3, batch=2, seq_len=48, signal_heads=1, head_dim=64, dtype=jnp.bfloat16,
                          segments=False)
  check_against_reference(inputs, None, causal=False, tol=2e-2, impl="pallas_gpu",
                          block_q=32, block_k=32, interpret=True)


@on_cpu
def test_tpu_kernel_interpret_packed_segments_float32():
  """The Mosaic kernel in TPU interpret mode: S=4, causal, packed segments, T=24 off the 16 block."""
  inputs, segment_ids = make_inputs(4, seq_len=24)
  check_against_reference(inputs, segment_ids, causal=True, tol=1e-5, impl="pallas_tpu",
                          block_q=16, block_k=16, interpret=pltpu.InterpretParams())


@on_cpu
def test_tpu_kernel_interpret_ratio_one_bfloat16_not_causal():
  """The Mosaic kernel with S=1, bfloat16, no causal mask (padded keys masked), T=24 off the block."""
  inputs, _ = make_inputs(9, seq_len=24, signal_heads=1, dtype=jnp.bfloat16, segments=False)
  check_against_reference(inputs, None, causal=False, tol=2e-2, impl="pallas_tpu",
                          block_q=16, block_k=16, interpret=pltpu.InterpretParams())


@on_cpu
def test_sharded_matches_unsharded(devices):
  """gda_attention_sharded: rows over `data` (2 ways), groups over `tensor` (4 ways, one group each):
  outputs, max logits (pmax over the rows) and gradients equal the unsharded kernels'."""
  inputs, segment_ids = make_inputs(5, batch=2, seq_len=32, groups=4, signal_heads=2)
  mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  kernel = dict(impl="pallas_gpu", block_q=16, block_k=16, interpret=True)
  sharded = functools.partial(gda_attention_sharded, segment_ids=segment_ids, mesh=mesh,
                              batch_axes=("data", "fsdp"), group_axes=("tensor",), **kernel)
  out, grads = outputs_and_grads(sharded, inputs)
  want, want_grads = outputs_and_grads(
      functools.partial(gda_attention, segment_ids=segment_ids, **kernel), inputs)
  assert out.signal.sharding.shard_shape(out.signal.shape) == (1, 32, 1, 2, 64)
  assert out.max_logits.sharding.shard_shape(out.max_logits.shape) == (1, 3)
  for name, got, expected in zip(GdaOutput._fields, out, want):
    assert_close(got, expected, 1e-6, name)
  for name, got, expected in zip(("dq_signal", "dq_noise", "dk_signal", "dk_noise", "dvalue"),
                                 grads, want_grads):
    assert_close(got, expected, 1e-6, name)


@on_cpu
def test_sharded_without_a_mesh_to_split_is_gda_attention(devices):
  """No mesh, a one-device mesh, or impl="reference": no shard_map, the plain `gda_attention` call."""
  inputs, segment_ids = make_inputs(6, seq_len=16, groups=2, signal_heads=2)
  one_device = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=devices[:1],
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
  eight = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), devices=devices,
                        axis_types=(jax.sharding.AxisType.Auto,) * 3)
  for mesh, impl in ((None, "pallas_gpu"), (one_device, "pallas_gpu"), (eight, "reference")):
    call = functools.partial(gda_attention_sharded, segment_ids=segment_ids, mesh=mesh, impl=impl,
                             interpret=True)
    assert "shard_map" not in str(jax.make_jaxpr(call)(*inputs)), (mesh, impl)
  model_reference = functools.partial(gda_attention_sharded, segment_ids=segment_ids, mesh=None,
                                      impl="reference", exact=False)
  oracle = functools.partial(gda_attention_reference, segment_ids=segment_ids)
  for got, want in zip(compile_and_run(model_reference, *inputs), compile_and_run(oracle, *inputs)):
    np.testing.assert_array_equal(got, want)  # float32 with HIGHEST default precision (conftest)


# --- Compiled kernels on a GPU. ---


@on_gpu
@pytest.mark.parametrize("dtype,tol,segments", [(jnp.bfloat16, 2e-2, False),
                                                (jnp.bfloat16, 2e-2, True),
                                                (jnp.float32, 1e-4, True)])
def test_gpu_kernel_compiled(dtype, tol, segments):
  """The compiled Triton kernels, 12.7B head shapes (S=4, D=128, value 256), T=300 off the block."""
  inputs, segment_ids = make_inputs(6, batch=2, seq_len=300, signal_heads=4, head_dim=128,
                                    dtype=dtype, segments=segments)
  check_against_reference(inputs, segment_ids, causal=True, tol=tol, impl="pallas_gpu")


@on_gpu
def test_gpu_kernel_compiled_ratio_one():
  inputs, segment_ids = make_inputs(7, batch=1, seq_len=256, signal_heads=1, head_dim=128,
                                    dtype=jnp.bfloat16)
  check_against_reference(inputs, segment_ids, causal=True, tol=2e-2, impl="auto")


@on_gpu
@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_composition(segments):
  inputs, segment_ids = make_inputs(8, batch=2, seq_len=256, signal_heads=4, head_dim=128,
                                    dtype=jnp.bfloat16, segments=segments)
  kernel = functools.partial(gda_attention, segment_ids=segment_ids, impl="cudnn")
  reference = functools.partial(gda_attention_reference, segment_ids=segment_ids)
  out, ref_out = compile_and_run(kernel, *inputs), compile_and_run(reference, *inputs)
  for name in GdaOutput._fields:
    assert_close(getattr(out, name), getattr(ref_out, name), 2e-2, name)
  _, grads = outputs_and_grads(lambda *a: kernel(*a)[:2], inputs)
  _, ref_grads = outputs_and_grads(lambda *a: reference(*a)[:2], inputs)
  for grad, ref_grad in zip(grads, ref_grads):
    assert_close(grad, ref_grad, 2e-2, "grad")
