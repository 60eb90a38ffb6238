"""GDA attention benchmark: `python bench/kernels.py gda [--seq-lens 4096,8192] [--sweep]`.

12.7B head layout (G=8 groups, S=4 signal heads + 1 noise head per group, head dim 128, value 256;
--signal-heads 1 gives the 2.6B layout),
batch 2, bfloat16, causal. Times the forward and the forward+backward (`jax.vjp` with random
cotangents on both outputs) of:
  pallas         `gda_attention(impl="pallas_gpu")` (or "pallas_tpu" on a TPU), max logits included;
  cudnn-4call    four `jax.nn.dot_product_attention(implementation="cudnn")` calls, no max logits;
  cudnn+stats    `gda_attention(impl="cudnn")`: the four calls plus the XLA max-logit/lse pass;
  tokamax-2call  two `tokamax.dot_product_attention` calls (value width 256), if tokamax imports;
  reference      `gda_attention(impl="reference")`.
cudnn+stats and reference materialise T x T scores: they run at T <= --reference-max-len only.
TFLOP/s use the fused-kernel count: QK over 5 heads x 128 and PV over 5 heads x 256 per group, half of
the T x T square (causal); forward+backward = 3.5 x forward. `--sweep` first times several Pallas GPU
tile settings at the first length and uses the fastest forward and backward settings for the table.
Prints a table and writes gda.json into $OUT (or the working directory).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from bench.timing import matmul_tflops, median_seconds, random_like
from pallas_kernels.gda_attention import gda_attention

GROUPS, SIGNAL_HEADS, HEAD_DIM, WIDTH = 8, 4, 128, 256

# Pallas GPU settings tried by --sweep: forward (block_q, block_k, num_stages), backward
# (block_q_dq, block_k_dq, block_q_dkv, block_k_dkv, num_warps_dq, num_warps_dkv).
FORWARD_TILES = [(128, 128, 2), (128, 64, 3)]
BACKWARD_TILES = [(64, 32, 64, 32, 4, 4), (64, 32, 64, 32, 8, 4), (64, 32, 64, 32, 4, 8),
                  (64, 32, 64, 32, 8, 8), (128, 32, 64, 32, 8, 8), (128, 32, 64, 32, 8, 4),
                  (64, 64, 64, 64, 4, 8), (64, 64, 64, 64, 8, 8), (64, 32, 32, 64, 4, 8),
                  (32, 64, 64, 32, 4, 4), (128, 64, 64, 32, 8, 4), (64, 32, 128, 32, 4, 8)]


def gda_flops(batch, seq_len, signal_heads):
  """Causal forward FLOPs of one GDA layer under the fused-kernel convention."""
  per_head = 2 * seq_len * seq_len * (HEAD_DIM + WIDTH) / 2
  return batch * GROUPS * (signal_heads + 1) * per_head


def cudnn_four_calls(q_signal, q_noise, k_signal, k_noise, value):
  """The composition a user can build today: q1k1v1, q1k1v2, q2k2v1, q2k2v2 through cuDNN."""
  batch, seq_len, groups, signal_heads, head_dim = q_signal.shape
  attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
  v1, v2 = value[..., :head_dim], value[..., head_dim:]
  q_flat = q_signal.reshape(batch, seq_len, groups * signal_heads, head_dim)
  signal = jnp.concatenate([attend(q_flat, k_signal, v1), attend(q_flat, k_signal, v2)], axis=-1)
  noise = jnp.concatenate([attend(q_noise, k_noise, v1), attend(q_noise, k_noise, v2)], axis=-1)
  return signal.reshape(q_signal.shape[:-1] + (2 * head_dim,)), noise


def tokamax_two_calls(tokamax, q_signal, q_noise, k_signal, k_noise, value):
  """One tokamax call per softmax map, each against the 256-wide value."""
  batch, seq_len, groups, signal_heads, head_dim = q_signal.shape
  q_flat = q_signal.reshape(batch, seq_len, groups * signal_heads, head_dim)
  signal = tokamax.dot_product_attention(q_flat, k_signal, value, is_causal=True)
  noise = tokamax.dot_product_attention(q_noise, k_noise, value, is_causal=True)
  return signal.reshape(q_signal.shape[:-1] + (value.shape[-1],)), noise


def kernel_fn(impl, **tiles):
  def fn(*inputs):
    out = gda_attention(*inputs, impl=impl, **tiles)
    return out.signal, out.noise, out.max_logits
  return fn


def time_fn(fn, inputs, with_backward):
  """Median seconds of jit(fn) (forward) or of jit(vjp of fn's first two outputs)."""
  if not with_backward:
    return median_seconds(jax.jit(fn), *inputs)
  outputs = jax.eval_shape(fn, *inputs)
  cotangents = random_like(jax.random.key(1), tuple(outputs[:2]))

  def forward_backward(inputs, cotangents):
    _, vjp = jax.vjp(lambda *args: fn(*args)[:2], *inputs)
    extras = fn(*inputs)[2:]  # statistics the implementation reports (kept alive, not differentiated)
    return vjp(cotangents), extras

  return median_seconds(jax.jit(forward_backward), inputs, cotangents)


def make_inputs(batch, seq_len, signal_heads):
  shapes = (jax.ShapeDtypeStruct((batch, seq_len, GROUPS, signal_heads, HEAD_DIM), jnp.bfloat16),) + (
      jax.ShapeDtypeStruct((batch, seq_len, GROUPS, HEAD_DIM), jnp.bfloat16),) * 3 + (
      jax.ShapeDtypeStruct((batch, seq_len, GROUPS, WIDTH), jnp.bfloat16),)
  return random_like(jax.random.key(seq_len), shapes)


def sweep_tiles(batch, seq_len, signal_heads, log):
  """Fastest forward and backward Pallas GPU tile settings at this length. The backward settings are
  tried on top of the fastest forward ones, whose num_stages then applies to all three kernels."""
  inputs = make_inputs(batch, seq_len, signal_heads)
  best_fwd, best_fwd_s = None, float("inf")
  for block_q, block_k, stages in FORWARD_TILES:
    tiles = dict(block_q=block_q, block_k=block_k, num_stages=stages)
    seconds = _try_time(kernel_fn("pallas_gpu", **tiles), inputs, False, f"fwd {tiles}", log)
    if seconds < best_fwd_s:
      best_fwd, best_fwd_s = tiles, seconds
  best_bwd, best_total_s = None, float("inf")
  names = ("block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv", "num_warps_dq",
           "num_warps_dkv")
  for settings in BACKWARD_TILES:
    tiles = dict(best_fwd, **dict(zip(names, settings)))
    seconds = _try_time(kernel_fn("pallas_gpu", **tiles), inputs, True, f"fwd+bwd {tiles}", log)
    if seconds < best_total_s:
      best_bwd, best_total_s = tiles, seconds
  return best_fwd, best_bwd


def _try_time(fn, inputs, with_backward, label, log):
  """time_fn, or inf (logged) for settings that do not compile (registers, shared memory)."""
  try:
    seconds = time_fn(fn, inputs, with_backward)
  except Exception as e:  # noqa: BLE001  (any compile failure just drops the setting)
    log(f"  {label}: failed ({type(e).__name__}: {str(e)[:200]})")
    return float("inf")
  log(f"  {label}: {seconds * 1e3:.3f} ms")
  return seconds


def _cell(row, key):
  if key not in row:
    return "-"
  return f"{row[key]:.3f}" if key.endswith("ms") else f"{row[key]:.0f}"


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/kernels.py gda", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq-lens", default="4096,8192")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--signal-heads", type=int, default=SIGNAL_HEADS,
                      help="signal heads per group: 4 is the 12.7B layout, 1 the 2.6B one")
  parser.add_argument("--reference-max-len", type=int, default=4096,
                      help="longest T for the rows that materialise T x T scores")
  parser.add_argument("--sweep", action="store_true", help="tune the Pallas GPU tiles first")
  parser.add_argument("--impls", default="pallas,cudnn-4call,cudnn+stats,tokamax-2call,reference",
                      help="comma-separated rows to time")
  args = parser.parse_args(argv)
  seq_lens = [int(t) for t in args.seq_lens.split(",")]
  out_dir = os.environ.get("OUT") or "."
  backend = jax.default_backend()
  rows = []

  def log(line):
    print(line, flush=True)

  log(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, backend {backend}")
  ceiling = matmul_tflops()
  log(f"bf16 8192^3 matmul through XLA: {ceiling:.0f} TFLOP/s (ceiling)")

  impls = {}
  fwd_tiles, bwd_tiles = {}, {}
  if backend == "gpu":
    if args.sweep:
      log(f"sweeping Pallas GPU tiles at T={seq_lens[0]}:")
      fwd_tiles, bwd_tiles = sweep_tiles(args.batch, seq_lens[0], args.signal_heads, log)
      log(f"chosen: forward {fwd_tiles}, forward+backward {bwd_tiles}")
    impls["pallas"] = (kernel_fn("pallas_gpu", **fwd_tiles),
                       kernel_fn("pallas_gpu", **(bwd_tiles or fwd_tiles)))
    impls["cudnn-4call"] = (cudnn_four_calls,) * 2
    impls["cudnn+stats"] = (kernel_fn("cudnn"),) * 2
    try:
      import tokamax  # noqa: PLC0415  (optional dependency)
      two_calls = functools.partial(tokamax_two_calls, tokamax)
      impls["tokamax-2call"] = (two_calls, two_calls)
    except ImportError as e:
      log(f"tokamax not importable ({e}); skipping the tokamax rows")
  elif backend == "tpu":
    impls["pallas"] = (kernel_fn("pallas_tpu"),) * 2
  impls["reference"] = (kernel_fn("reference"),) * 2
  wanted = args.impls.split(",")
  impls = {name: fns for name, fns in impls.items() if name in wanted}

  for seq_len in seq_lens:
    inputs = make_inputs(args.batch, seq_len, args.signal_heads)
    flops = gda_flops(args.batch, seq_len, args.signal_heads)
    for name, (fwd_fn, train_fn) in impls.items():
      if name in ("reference", "cudnn+stats") and seq_len > args.reference_max_len:
        continue
      row = {"seq_len": seq_len, "impl": name, "max_logits": name not in ("cudnn-4call", "tokamax-2call")}
      for key, fn, with_backward, factor in (("fwd", fwd_fn, False, 1.0),
                                             ("fwd_bwd", train_fn, True, 3.5)):
        start = time.perf_counter()
        try:
          seconds = time_fn(fn, inputs, with_backward)
        except Exception as e:  # report and go on: one failing implementation must not hide the rest
          log(f"T={seq_len} {name} {key}: failed ({type(e).__name__}: {str(e)[:300]})")
          continue
        row[f"{key}_ms"] = seconds * 1e3
        row[f"{key}_tflops"] = factor * flops / seconds / 1e12
        log(f"T={seq_len} {name} {key}: {seconds * 1e3:.3f} ms "
            f"({row[f'{key}_tflops']:.0f} TFLOP/s; {time.perf_counter() - start:.0f} s with compile)")
      rows.append(row)

  log("\n| T | implementation | max logits | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  log("|---|---|---|---|---|---|---|")
  for row in rows:
    cells = [_cell(row, key) for key in ("fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops")]
    log(f"| {row['seq_len']} | {row['impl']} | {'yes' if row['max_logits'] else 'no'} | "
        + " | ".join(cells) + " |")
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": args.batch,
            "layout": dict(groups=GROUPS, signal_heads=args.signal_heads, head_dim=HEAD_DIM, width=WIDTH),
            "flop_convention": "QK over 5 heads x 128 + PV over 5 heads x 256 per group, causal half; "
                               "fwd+bwd = 3.5 x fwd",
            "matmul_ceiling_tflops": ceiling, "pallas_tiles": {"fwd": fwd_tiles, "fwd_bwd": bwd_tiles},
            "rows": rows}
  with open(os.path.join(out_dir, "gda.json"), "w") as f:
    json.dump(result, f, indent=2)
