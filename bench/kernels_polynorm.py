"""Benchmark of the fused PolyNorm(gate) * up kernel against the jitted jnp reference.

    python bench/kernels.py polynorm [--shapes 8192x16384,16384x8192] [--dtype bfloat16] [--impl auto]
                                     [--sweep] [--iters 10] [--interpret]

For each shape [rows, features]: forward and forward+backward times (backward through jax.vjp with a random
cotangent) of the kernel and of the reference, in one run, measured two ways:
- fused: forward and backward in one jit, so XLA may fuse the reference's backward into its forward and keep
  nothing between them;
- split (as in a training step without remat): one jit runs the forward and returns what the backward needs
  (the kernel's custom_vjp residuals; for the reference, whatever JAX's autodiff saves), a second jit runs
  the backward from them; the time is the sum of the two. Achieved GB/s counts the bytes a fused pass must move:
forward reads gate and up and writes out (3 arrays); backward reads gate, up and the cotangent and writes dgate
and dup (5 arrays); forward+backward is their sum (8 arrays). The ceilings are `copy_gbps` (an XLA `x * 2`,
read + write) and, on a GPU, `pallas_copy_gbps` (the same as Pallas kernels, the best of Triton tilings and
Mosaic GPU TMA copies; XLA's bfloat16 elementwise kernels run well under the memory's rate) at the same shape
and dtype, measured in the same run. On a GPU the kernel rows are: "kernel" (impl as given: by default Mosaic
GPU where the row fits), "kernel triton" (the Triton kernels) and "split kernels" (the sharded path's
statistics and apply kernels, split=True on a one-device mesh). --sweep also times Triton tuning options
(block_cols, num_warps, num_stages). Prints a table; writes JSON to $OUT/kernels_polynorm.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp

from bench.timing import copy_gbps, median_seconds, pallas_copy_gbps, random_like
from pallas_kernels.polynorm import mul_polynorm, mul_polynorm_reference, mul_polynorm_sharded

# Triton tuning options (block_cols, num_warps, num_stages); block_cols 0 means the whole row in one chunk.
GPU_SWEEP = [(1024, 4, 1), (1024, 4, 3), (1024, 8, 2), (2048, 4, 2), (2048, 8, 2), (4096, 8, 2), (4096, 16, 2),
             (0, 16, 1), (0, 32, 1)]


def _inputs(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  gate = jax.random.normal(keys[0], shape, dtype)
  up = jax.random.normal(keys[1], shape, dtype)
  weight = jax.random.normal(keys[2], (3,), jnp.float32)
  bias = jax.random.normal(keys[3], (1,), jnp.float32)
  return gate, up, weight, bias


def _forward_backward(fn):
  """jit of (args, cotangent) -> (out, grads of gate, up, weight, bias) through jax.vjp."""

  def run(args, cotangent):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)

  return jax.jit(run)


def _split_seconds(fn, args, cotangent, iters):
  """Seconds of a forward jit that returns the residuals plus a backward jit that consumes them."""
  forward = jax.jit(lambda a: jax.vjp(fn, *a))
  backward = jax.jit(lambda vjp, ct: vjp(ct))
  _, vjp = forward(args)
  return (median_seconds(forward, args, iters=iters)
          + median_seconds(backward, vjp, cotangent, iters=iters))


def _time_pair(fn, args, cotangent, iters):
  """(forward s, fused forward+backward s, split forward+backward s, forward output) of fn(gate, up, w, b)."""
  forward = jax.jit(fn)
  out = forward(*args)
  return (median_seconds(forward, *args, iters=iters),
          median_seconds(_forward_backward(fn), args, cotangent, iters=iters),
          _split_seconds(fn, args, cotangent, iters), out)


def _row(name, shape, dtype, forward_s, total_s, split_s, copies, reference=None, error=None):
  size = shape[0] * shape[1] * jnp.dtype(dtype).itemsize
  row = {
      "impl": name, "shape": list(shape), "dtype": jnp.dtype(dtype).name,
      "fwd_ms": forward_s * 1e3, "fwd_bwd_ms": total_s * 1e3, "bwd_ms": (total_s - forward_s) * 1e3,
      "split_fwd_bwd_ms": split_s * 1e3,
      "fwd_gbps": 3 * size / forward_s / 1e9, "fwd_bwd_gbps": 8 * size / total_s / 1e9, **copies,
  }
  row["fwd_bwd_pct_copy"] = 100 * row["fwd_bwd_gbps"] / copies["copy_gbps"]
  if "pallas_copy_gbps" in copies:
    row["fwd_bwd_pct_pallas_copy"] = 100 * row["fwd_bwd_gbps"] / copies["pallas_copy_gbps"]
  if reference is not None:
    row["fwd_speedup"] = reference["fwd_ms"] / row["fwd_ms"]
    row["fwd_bwd_speedup"] = reference["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    row["split_speedup"] = reference["split_fwd_bwd_ms"] / row["split_fwd_bwd_ms"]
  if error is not None:
    row["max_rel_err_fwd"] = error
  return row


def _relative_error(got, want):
  got, want = got.astype(jnp.float32), want.astype(jnp.float32)
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def bench_shape(shape, dtype, impl, sweep, iters, interpret=False):
  """Rows of results for one shape: reference, kernel with default options, on a GPU the Triton kernels and the
  split kernels of the sharded path (on a one-device mesh: statistics kernel, then apply kernel, in each pass),
  then the sweep."""
  args = _inputs(shape, dtype)
  cotangent = random_like(jax.random.key(1), args[0])
  copies = {"copy_gbps": copy_gbps(shape, dtype)}
  if jax.default_backend() == "gpu":
    copies["pallas_copy_gbps"], copies["pallas_copy_kernel"] = pallas_copy_gbps(shape, dtype)
  forward_s, total_s, split_s, want = _time_pair(mul_polynorm_reference, args, cotangent, iters)
  reference = _row("reference", shape, dtype, forward_s, total_s, split_s, copies)
  rows = [reference]
  one_device = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
  options = [("kernel", mul_polynorm, {"impl": impl})]
  if impl in ("auto", "pallas_gpu") and (interpret or jax.default_backend() == "gpu"):
    triton = {"impl": "pallas_triton"}
    options += [("kernel triton", mul_polynorm, triton),
                ("split kernels", mul_polynorm_sharded, {**triton, "mesh": one_device, "split": True})]
    if sweep:
      options += [(f"kernel triton c{c or 'row'} w{w} s{s}", mul_polynorm,
                   dict(triton, block_cols=c or shape[1], num_warps=w, num_stages=s)) for c, w, s in GPU_SWEEP]
  for name, function, kwargs in options:
    fn = functools.partial(function, interpret=interpret, **kwargs)
    try:
      forward_s, total_s, split_s, got = _time_pair(fn, args, cotangent, iters)
    except Exception as e:  # a tuning option the compiler rejects (registers, shared memory): report, go on
      rows.append({"impl": name, "shape": list(shape), "error": f"{type(e).__name__}: {str(e)[:200]}"})
      continue
    rows.append(_row(name, shape, dtype, forward_s, total_s, split_s, copies, reference,
                     _relative_error(got, want)))
  return rows


def _print_table(rows):
  columns = [("impl", "{}"), ("shape", "{}"), ("fwd_ms", "{:.3f}"), ("fwd_bwd_ms", "{:.3f}"), ("bwd_ms", "{:.3f}"),
             ("fwd_gbps", "{:.0f}"), ("fwd_bwd_gbps", "{:.0f}"), ("copy_gbps", "{:.0f}"),
             ("fwd_bwd_pct_copy", "{:.1f}"), ("pallas_copy_gbps", "{:.0f}"), ("fwd_bwd_pct_pallas_copy", "{:.1f}"),
             ("split_fwd_bwd_ms", "{:.3f}"), ("fwd_speedup", "{:.2f}"),
             ("fwd_bwd_speedup", "{:.2f}"), ("split_speedup", "{:.2f}"),
             ("max_rel_err_fwd", "{:.1e}")]
  print(" | ".join(name for name, _ in columns))
  for row in rows:
    if "error" in row:
      print(f"{row['impl']} | {row['shape']} | error: {row['error']}")
      continue
    print(" | ".join(fmt.format(row[name]) if name in row else "-" for name, fmt in columns))


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/kernels.py polynorm")
  parser.add_argument("--shapes", default="8192x16384,16384x8192", help="comma-separated ROWSxFEATURES")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--impl", default="auto", help="mul_polynorm impl for the kernel rows")
  parser.add_argument("--sweep", action="store_true", help="also time the GPU tuning options in GPU_SWEEP")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--interpret", action="store_true", help="kernels in interpret mode (a CPU smoke run)")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
  print(f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}, jax {jax.__version__}")
  rows = []
  for shape in shapes:
    rows += bench_shape(shape, dtype, args.impl, args.sweep, args.iters, args.interpret)
  _print_table(rows)
  if os.environ.get("OUT"):
    path = os.path.join(os.environ["OUT"], "kernels_polynorm.json")
    with open(path, "w") as f:
      json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                 "jax": jax.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
