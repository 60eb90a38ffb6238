"""Timing helpers shared by the benchmark scripts: medians over timed calls and measured ceilings.

Every figure a benchmark reports is a ratio against a ceiling measured in the same run: `matmul_tflops`
(a bf16 matmul through XLA) and `copy_gbps` (an elementwise read+write through XLA at the reported shape).
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp


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


def random_like(key, tree):
  """Random normal arrays with the shapes and dtypes of `tree` (e.g. cotangents for `jax.vjp`)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
