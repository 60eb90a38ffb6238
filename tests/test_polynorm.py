"""Fused PolyNorm(gate) * up: the Pallas kernels and the tensor-sharded path against the plain jnp reference.

On CPU the kernels run in interpret mode (the Triton kernels in plain interpret mode, the TPU kernel under
pltpu.InterpretParams, the Mosaic GPU kernels under plmgpu.InterpretGPUParams); on a GPU the compiled Mosaic GPU
and Triton kernels run instead and the interpret tests are skipped. Reference gradients come from jax.vjp of the
reference, which has no custom VJP.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.polynorm import mul_polynorm, mul_polynorm_reference, mul_polynorm_sharded

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
NAMES = ("out", "dgate", "dup", "dweight", "dbias")

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret mode, run on CPU")
on_gpu = pytest.mark.gpu  # compiled kernels: the GPU tier (tests/conftest.py skips it elsewhere)


def random_inputs(shape, dtype, seed=0):
  """gate, up [shape]; weight [3], bias [1] float32; a cotangent [shape]; all random normal."""
  keys = jax.random.split(jax.random.key(seed), 5)
  gate = jax.random.normal(keys[0], shape, dtype)
  up = jax.random.normal(keys[1], shape, dtype)
  weight = jax.random.normal(keys[2], (3,), jnp.float32)
  bias = jax.random.normal(keys[3], (1,), jnp.float32)
  cotangent = jax.random.normal(keys[4], shape, dtype)
  return (gate, up, weight, bias), cotangent


def value_and_grads(fn, args, cotangent):
  """(out, dgate, dup, dweight, dbias) of fn(gate, up, weight, bias) under jax.vjp with `cotangent`, jitted."""

  def run(args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(cotangent))

  return jax.jit(run)(args, cotangent)


def assert_all_close(got, want, dtype):
  """Per element |got - want| <= tol * (|want| + max|want|): relative, with an absolute floor at the array's
  scale (the gradients cancel terms, so small entries carry the rounding error of large ones)."""
  tol = TOLERANCE[dtype]
  for name, g, w in zip(NAMES, got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tol, atol=tol * np.abs(w).max(),
                               err_msg=name)


def reference_values(args, cotangent):
  return value_and_grads(mul_polynorm_reference, args, cotangent)


# (shape, dtype, TPU options, GPU options): a ragged row count (46 rows in TPU blocks of 16) and two GPU column
# chunks, the second ragged (384 = 256 + 128); bfloat16 with a width that is no power of two (one masked GPU chunk).
INTERPRET_CASES = {
    "f32_ragged_2x23x384": ((2, 23, 384), jnp.float32, {"block_rows": 16}, {"block_cols": 256}),
    "bf16_100x320": ((100, 320), jnp.bfloat16, {"block_rows": 32}, {}),
}


@on_cpu
@pytest.mark.parametrize("case", INTERPRET_CASES)
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_triton"])
def test_kernel_matches_reference_interpret(impl, case):
  shape, dtype, tpu_options, gpu_options = INTERPRET_CASES[case]
  options = tpu_options if impl == "pallas_tpu" else gpu_options
  args, cotangent = random_inputs(shape, dtype, seed=len(case))
  fn = lambda *a: mul_polynorm(*a, impl=impl, interpret=True, **options)  # noqa: E731
  assert_all_close(value_and_grads(fn, args, cotangent), reference_values(args, cotangent), dtype)


# Mosaic GPU rows are [lines, 256]: 3 lines make one TMA part of 1-line chunks; 8 lines make 4 parts of 2.
MOSAIC_INTERPRET_CASES = {
    "f32_2x5x768": ((2, 5, 768), jnp.float32),
    "bf16_13x2048": ((13, 2048), jnp.bfloat16),
}


@on_cpu
@pytest.mark.parametrize("case", MOSAIC_INTERPRET_CASES)
def test_mosaic_gpu_kernel_matches_reference_interpret(case):
  shape, dtype = MOSAIC_INTERPRET_CASES[case]
  args, cotangent = random_inputs(shape, dtype, seed=len(case))
  fn = lambda *a: mul_polynorm(*a, impl="pallas_mosaic_gpu", interpret=True)  # noqa: E731
  assert_all_close(value_and_grads(fn, args, cotangent), reference_values(args, cotangent), dtype)


@pytest.mark.parametrize("features", [512, 320])
def test_pallas_gpu_takes_mosaic_gpu_where_it_fits(features):
  """Compiled on a Hopper GPU, rows of a multiple of 256 go to the Mosaic GPU kernels and other widths to Triton;
  in interpret mode (on CPU) all go to Triton (Mosaic GPU's interpret mode does not run under remat)."""
  args, _ = random_inputs((4, features), jnp.float32)
  interpret = jax.default_backend() == "cpu"
  jaxpr = str(jax.make_jaxpr(lambda *a: mul_polynorm(*a, impl="pallas_gpu", interpret=interpret))(*args))
  mosaic = not interpret and features % 256 == 0
  assert "polynorm_forward" in jaxpr and ("polynorm_forward_mosaic_gpu" in jaxpr) == mosaic


@on_cpu
def test_mosaic_gpu_rejects_rows_it_cannot_hold(mesh):
  args, _ = random_inputs((4, 320), jnp.float32)
  with pytest.raises(ValueError, match="not a multiple of 256.*impl='pallas_gpu'"):
    mul_polynorm(*args, impl="pallas_mosaic_gpu", interpret=True)
  args, _ = random_inputs((4, 18432), jnp.float32)
  with pytest.raises(ValueError, match="exceed .* bytes of shared memory"):
    mul_polynorm(*args, impl="pallas_mosaic_gpu", interpret=True)
  args, _ = random_inputs((4, 512), jnp.float32)
  with pytest.raises(ValueError, match="block_cols tune the Triton kernels"):
    mul_polynorm(*args, impl="pallas_mosaic_gpu", interpret=True, block_cols=256)
  args, _ = random_inputs((4, 2, 512), jnp.float32)
  with pytest.raises(ValueError, match="split over devices"):
    mul_polynorm_sharded(*args, mesh=mesh, impl="pallas_mosaic_gpu", interpret=True)


@pytest.fixture(scope="module")
def mesh(devices):
  return jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def sharded_inputs(mesh, shape, dtype, seed):
  (gate, up, weight, bias), cotangent = random_inputs(shape, dtype, seed)
  data = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
  replicated = NamedSharding(mesh, P())
  args = (jax.device_put(gate, data), jax.device_put(up, data), jax.device_put(weight, replicated),
          jax.device_put(bias, replicated))
  return args, jax.device_put(cotangent, data)


@on_cpu
@pytest.mark.parametrize("impl, dtype", [("pallas_gpu", jnp.float32), ("pallas_tpu", jnp.bfloat16),
                                         ("reference", jnp.float32)])
def test_sharded_matches_unsharded(mesh, impl, dtype):
  """Features split 4 ways (128 per device), rows 2 ways: psummed row statistics give the unsharded result."""
  args, cotangent = sharded_inputs(mesh, (4, 10, 512), dtype, seed=3)
  interpret = impl != "reference"
  sharded = lambda *a: mul_polynorm_sharded(*a, mesh=mesh, impl=impl, interpret=interpret)  # noqa: E731
  unsharded = lambda *a: mul_polynorm(*a, impl=impl, interpret=interpret)  # noqa: E731
  got = value_and_grads(sharded, args, cotangent)
  assert got[0].sharding.spec == P(("data", "fsdp"), None, "tensor")
  assert_all_close(got, value_and_grads(unsharded, args, cotangent), dtype)
  assert_all_close(got, reference_values(args, cotangent), dtype)


@on_cpu
def test_sharded_with_whole_rows_runs_the_fused_kernels():
  """Rows split 8 ways and features on one device: the fused kernels run per shard, with no psum (Triton here;
  test_compiled_gpu_sharded_whole_rows runs the Mosaic GPU kernels under shard_map on a GPU)."""
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  args, cotangent = sharded_inputs(mesh, (8, 3, 512), jnp.float32, seed=4)
  sharded = lambda *a: mul_polynorm_sharded(*a, mesh=mesh, impl="pallas_gpu", interpret=True)  # noqa: E731
  jaxpr = str(jax.make_jaxpr(lambda a, c: value_and_grads(sharded, a, c))(args, cotangent))
  assert "polynorm_backward" in jaxpr and "polynorm_grad_sums" not in jaxpr and "psum" not in jaxpr
  got = value_and_grads(sharded, args, cotangent)
  assert got[0].sharding.spec == P(("data", "fsdp"), None, "tensor")
  assert_all_close(got, reference_values(args, cotangent), jnp.float32)


@on_cpu
def test_sharded_without_a_mesh_to_split_is_mul_polynorm(devices):
  """No mesh or a one-device mesh: `mul_polynorm`, no shard_map; split=True still runs the split kernels."""
  args, _ = random_inputs((2, 3, 256), jnp.float32, seed=7)
  one_device = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=devices[:1],
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
  want = mul_polynorm(*args, impl="pallas_gpu", interpret=True)
  for mesh, split in ((None, None), (one_device, None), (one_device, True)):
    sharded = functools.partial(mul_polynorm_sharded, mesh=mesh, impl="pallas_gpu", interpret=True, split=split)
    jaxpr = str(jax.make_jaxpr(sharded)(*args))
    assert ("shard_map" in jaxpr) == bool(split) and ("polynorm_power_sums" in jaxpr) == bool(split), split
    np.testing.assert_allclose(jax.jit(sharded)(*args), want, rtol=1e-6, atol=1e-6)


@on_cpu
def test_sharded_rejects_indivisible_shapes(mesh):
  (gate, up, weight, bias), _ = random_inputs((4, 3, 510), jnp.float32)
  with pytest.raises(ValueError, match="mesh axis 'tensor'"):
    mul_polynorm_sharded(gate, up, weight, bias, mesh=mesh, impl="pallas_gpu", interpret=True)


def test_auto_dispatch_and_bad_impl():
  args, _ = random_inputs((8, 128), jnp.float32)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(mul_polynorm(*args), mul_polynorm_reference(*args))
  with pytest.raises(ValueError, match="impl="):
    mul_polynorm(*args, impl="pallas")


# (shape, dtype, Triton options). "auto" runs Mosaic GPU on widths of a multiple of 256 (all but 1000;
# 2816 is 11 lines, one TMA part of 1-line chunks) and Triton on 1000; "pallas_triton" runs Triton on all, whose
# default options take one 4096-column chunk here, so the ragged f32 case walks three 1024-column chunks, the
# last one masked.
GPU_CASES = {
    "bf16_2x512x4096": ((2, 512, 4096), jnp.bfloat16, {}),
    "f32_2x512x4096": ((2, 512, 4096), jnp.float32, {}),
    "bf16_ragged_777x1000": ((777, 1000), jnp.bfloat16, {}),
    "f32_ragged_3x37x2816": ((3, 37, 2816), jnp.float32, {"block_cols": 1024, "num_warps": 4}),
    "bf16_256x16384": ((256, 16384), jnp.bfloat16, {}),
    "f32_64x16384": ((64, 16384), jnp.float32, {}),
}


@on_gpu
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("impl", ["auto", "pallas_triton"])
def test_compiled_gpu_kernel_matches_reference(impl, case):
  shape, dtype, triton_options = GPU_CASES[case]
  args, cotangent = random_inputs(shape, dtype, seed=len(case))
  want = reference_values(args, cotangent)
  options = triton_options if impl == "pallas_triton" else {}
  got = value_and_grads(lambda *a: mul_polynorm(*a, impl=impl, **options), args, cotangent)
  assert_all_close(got, want, dtype)


@on_gpu
def test_compiled_gpu_split_kernels_match_reference():
  """The sharded path's Triton statistics and apply kernels, compiled, on a one-device mesh (split=True)."""
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  args, cotangent = random_inputs((4, 100, 3000), jnp.bfloat16, seed=5)
  got = value_and_grads(lambda *a: mul_polynorm_sharded(*a, mesh=mesh, split=True), args, cotangent)
  assert_all_close(got, reference_values(args, cotangent), jnp.bfloat16)


@on_gpu
def test_compiled_gpu_sharded_whole_rows():
  """mul_polynorm_sharded on a one-device mesh (the model on one GPU): whole rows, `mul_polynorm`'s Mosaic GPU
  kernels, no shard_map."""
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  args, cotangent = random_inputs((4, 100, 4096), jnp.bfloat16, seed=6)
  jaxpr = str(jax.make_jaxpr(lambda *a: mul_polynorm_sharded(*a, mesh=mesh))(*args))
  assert "polynorm_forward_mosaic_gpu" in jaxpr and "shard_map" not in jaxpr
  got = value_and_grads(lambda *a: mul_polynorm_sharded(*a, mesh=mesh), args, cotangent)
  assert_all_close(got, reference_values(args, cotangent), jnp.bfloat16)
