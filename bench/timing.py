"""Timing helpers shared by the benchmark scripts: medians over timed calls and measured ceilings.

Every figure a benchmark reports is a ratio against a ceiling measured in the same run: `matmul_tflops`
(a bf16 matmul through XLA), `copy_gbps` (an elementwise read+write through XLA at the reported shape) and
`pallas_copy_gbps` (the same read+write as Pallas kernels, the best of a few Triton tilings and of Mosaic GPU
copies through shared memory by TMA: XLA's elementwise kernels do not reach the memory's rate on every shape,
so a kernel can beat `copy_gbps`).
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

# Pallas copy tilings (block_rows, block_cols, num_warps) that `pallas_copy_gbps` tries on a GPU.
GPU_COPY_TILINGS = ((1, 4096, 4), (1, 8192, 8), (2, 4096, 8), (4, 2048, 8), (8, 1024, 4), (8, 2048, 8),
                    (16, 1024, 8), (32, 512, 4), (64, 256, 4))
# Mosaic GPU copies (Hopper and newer): TMA transfers per row that `pallas_copy_gbps` tries.
MOSAIC_COPY_PARTS = (1, 2, 4, 8)


def median_seconds(fn, *args, warmup: int = 3, iters: int = 10, batch_seconds: float = 0.05) -> float:
  """Median seconds per call of `fn(*args)` over `iters` timed batches, after `warmup` calls.

  Each batch dispatches enough back-to-back calls to run about `batch_seconds` and blocks once, on
  the last output (one device stream runs them in order), so the host's dispatch and blocking cost
  is not counted: a 0.2 ms kernel timed one call at a time reads up to twice its true time.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, min(200, math.ceil(batch_seconds / (time.perf_counter() - start))))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def matmul_tflops(size: int = 8192, dtype=jnp.bfloat16, seed: int = 0) -> float:
  """Achieved TFLOP/s of a jitted `[size, size] @ [size, size]` on random inputs."""
  ka, kb = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(ka, (size, size), dtype)
  b = jax.random.normal(kb, (size, size), dtype)
  seconds = median_seconds(jax.jit(jnp.matmul), a, b)
  return 2 * size**3 / seconds / 1e12


def copy_gbps(shape, dtype=jnp.bfloat16, seed: int = 0) -> float:
  """Achieved GB/s (bytes read + bytes written) of a jitted `x * 2` over a random tensor of `shape`."""
  x = jax.random.normal(jax.random.key(seed), shape, dtype)
  seconds = median_seconds(jax.jit(lambda v: v * 2), x)
  return 2 * x.size * x.dtype.itemsize / seconds / 1e9


def _pallas_copy(x, block_rows: int, block_cols: int, num_warps: int, interpret: bool):
  """x * 2 as a Pallas Triton kernel over [block_rows, block_cols] tiles of a 2-D x."""
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  spec = pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(x.shape[0], block_rows), pl.cdiv(x.shape[1], block_cols)), in_specs=[spec],
      out_specs=spec, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps), interpret=interpret)(x)


def _mosaic_copy(x, parts: int, interpret: bool):
  """x * 2 as a Mosaic GPU kernel, a CUDA block per row: TMA brings the row [features] (a multiple of 256) into
  shared memory in `parts` transfers, registers double each part in place, TMA sends it back."""
  rows, features = x.shape
  lines = features // 256
  part_lines = lines // parts
  chunk_lines = math.gcd(part_lines, 8)

  def kernel(x_hbm, out_hbm, smem, barriers):
    row = lax.axis_index("rows")
    for p in range(parts):
      part = pl.ds(p * part_lines, part_lines)
      plmgpu.copy_gmem_to_smem(x_hbm.at[row, part], smem.at[part], barriers.at[p])
    for p in range(parts):
      part = pl.ds(p * part_lines, part_lines)
      plmgpu.barrier_wait(barriers.at[p])

      def double(j, carry, p=p):
        chunk = pl.ds(p * part_lines + j * chunk_lines, chunk_lines)
        smem[chunk] = smem[chunk] * 2
        return carry

      lax.fori_loop(0, part_lines // chunk_lines, double, 0)
      plmgpu.commit_smem()
      plmgpu.copy_smem_to_gmem(smem.at[part], out_hbm.at[row, part])
    plmgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out = plmgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((rows, lines, 256), x.dtype),
      scratch_types=[plmgpu.SMEM((lines, 256), x.dtype), plmgpu.Barrier(num_barriers=parts)],
      grid=(rows,), grid_names=("rows",), interpret=plmgpu.InterpretGPUParams() if interpret else None,
  )(x.reshape(rows, lines, 256))
  return out.reshape(rows, features)


def pallas_copy_gbps(shape, dtype=jnp.bfloat16, tilings=GPU_COPY_TILINGS, mosaic_parts=MOSAIC_COPY_PARTS,
                     seed: int = 0, interpret: bool = False) -> tuple[float, str]:
  """(best GB/s, which kernel) of a Pallas `x * 2` over a random [rows, cols] tensor, bytes read + written:
  Triton over `tilings` (block_rows, block_cols, num_warps), and Mosaic GPU with `mosaic_parts` TMA transfers
  per row where cols is a multiple of 256 with parts dividing cols / 256. A kernel the compiler rejects is
  skipped."""
  x = jax.random.normal(jax.random.key(seed), shape, dtype)
  kernels = {f"triton {t}": functools.partial(_pallas_copy, block_rows=t[0], block_cols=t[1], num_warps=t[2],
                                              interpret=interpret) for t in tilings}
  if shape[1] % 256 == 0:
    kernels.update({f"mosaic_gpu parts={p}": functools.partial(_mosaic_copy, parts=p, interpret=interpret)
                    for p in mosaic_parts if (shape[1] // 256) % p == 0})
  best = (0.0, None)
  for name, kernel in kernels.items():
    try:
      seconds = median_seconds(jax.jit(kernel), x)
    except Exception:  # a kernel over the compiler's limits (registers, shared memory) or the chip's
      continue
    best = max(best, (2 * x.size * x.dtype.itemsize / seconds / 1e9, name))
  return best


def random_like(key, tree):
  """Random normal arrays with the shapes and dtypes of `tree` (e.g. cotangents for `jax.vjp`)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
