"""MuonClip optimizer benchmark on one accelerator: `python bench/optimizer.py [options]`.

    python bench/optimizer.py [--model motif-2.6b] [--ns_coeffs classic] [--iters 10]
                              [--tokens_per_step 1048576] [--seq_len 4096] [--train_step_seconds S]

1. Ceiling: a bf16 [8192]^3 matmul through XLA (`bench.timing.matmul_tflops`), measured in this run.
2. Newton-Schulz throughput for every Muon matrix shape of the model, run as the optimizer runs it: one
   bf16 batch [count, m, n] (m <= n) of all same-shaped matrices; TFLOP/s = count * ns_flops / time.
3. The whole optimizer step on all the model's params (random float32 params and grads built from the
   abstract shapes, on this one device): `muonclip(...).update` + `optax.apply_updates`, jitted.
4. Its share of a training step of `--tokens_per_step` tokens. The training step time is
   `--train_step_seconds` (measured on `--train_devices` devices; the one-device optimizer time is then
   divided by that count, the ideal scaling of Parallel Muon and of the sharded elementwise work,
   communication not included) if given, otherwise an ESTIMATE: the step's FLOPs on one device at the
   measured matmul ceiling (an optimistic step time, so the share shown is an upper bound). Step FLOPs = 6 * params *
   tokens (params without the embedding table: its lookup is not a matmul; a tied embedding counts once,
   as the LM head) + attention: per layer and token, QK over all query heads x head_dim and PV over
   all maps x 2*head_dim, causal half (seq_len / 2 keys), forward+backward = 3 x forward.

Prints a table; writes JSON to $OUT/optimizer.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path set-up above)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bench.timing import matmul_tflops, median_seconds  # noqa: E402
from bench.train_step import peak_bytes  # noqa: E402
from motif_jax.configs import count_params, get_model_config  # noqa: E402
from motif_jax.model import abstract_params, param_logical_axes  # noqa: E402
from motif_jax.optim import muonclip, newton_schulz, ns_flops  # noqa: E402
from motif_jax.optim.muon import DEFAULT_CHUNK_BYTES, MUON, routing_labels  # noqa: E402


def muon_matrix_groups(cfg) -> dict[tuple[int, int], int]:
  """{(m, n) with m <= n: number of Muon matrices of that shape (up to a transpose)} for the model."""
  groups: dict[tuple[int, int], int] = {}
  labels = jax.tree.leaves(routing_labels(param_logical_axes(cfg)))
  for label, leaf in zip(labels, jax.tree.leaves(abstract_params(cfg))):
    if label == MUON:
      key = tuple(sorted(leaf.shape[-2:]))
      groups[key] = groups.get(key, 0) + math.prod(leaf.shape[:-2])
  return groups


def bench_newton_schulz(groups, coeffs, steps, iters):
  """One row per matrix shape: NS of the whole same-shape batch in bf16."""
  rows = []
  run = jax.jit(lambda x: newton_schulz(x, steps=steps, coeffs=coeffs))
  for (m, n), count in sorted(groups.items()):
    x = jax.random.normal(jax.random.key(0), (count, m, n), jnp.bfloat16)
    seconds = median_seconds(run, x, iters=iters)
    flops = count * ns_flops(m, n, steps)
    rows.append({"shape": f"{count} x {m}x{n}", "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                 "gflop": flops / 1e9})
  return rows


def _random_params(cfg, seed=0):
  """float32 normal(0, 0.02) arrays with the model's abstract shapes, made on the device."""
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape: 0.02 * jax.random.normal(k, shape, jnp.float32), static_argnums=1)
  return jax.tree.unflatten(treedef, [make(k, leaf.shape) for k, leaf in zip(keys, leaves)])


def bench_optimizer_step(cfg, coeffs, steps, iters, chunk_bytes=DEFAULT_CHUNK_BYTES):
  """(seconds, compiled memory analysis) of one jitted MuonClip update + apply on all params (no
  QK-Clip scaling triggered), Newton-Schulz chunked at `chunk_bytes` (None: each group at once)."""
  tx = muonclip(1e-3, logical_axes=param_logical_axes(cfg), num_kv_groups=cfg.num_kv_groups,
                signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim,
                ns_steps=steps, ns_coeffs=coeffs, ns_chunk_bytes=chunk_bytes)
  params, grads = _random_params(cfg, 0), _random_params(cfg, 1)
  state = jax.jit(tx.init)(params)
  max_logits = jnp.full((cfg.num_layers, cfg.num_kv_groups, cfg.signal_heads_per_group + 1), 10.0)

  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params, max_logits=max_logits)
    return optax.apply_updates(params, updates), state

  memory = step.lower(grads, state, params).compile().memory_analysis()
  return median_seconds(step, grads, state, params, warmup=2, iters=iters), memory


def train_step_flops(cfg, tokens: int, seq_len: int) -> float:
  """Model FLOPs of a forward+backward over `tokens` tokens (conventions in the module docstring)."""
  params = count_params(cfg) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_embeddings else 1)
  maps = cfg.num_query_heads                    # one softmax map per query head
  attention_fwd = cfg.num_layers * maps * (2 * cfg.head_dim + 2 * 2 * cfg.head_dim) * seq_len / 2
  return 6.0 * params * tokens + 3.0 * attention_fwd * tokens


def _print_table(title, rows, columns):
  print(f"\n{title}")
  print(" | ".join(name for name, _ in columns))
  for row in rows:
    print(" | ".join(fmt.format(row[name]) for name, fmt in columns))


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/optimizer.py")
  parser.add_argument("--model", default="motif-2.6b")
  parser.add_argument("--ns_coeffs", default="classic")
  parser.add_argument("--ns_steps", type=int, default=5)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--ns_chunk_bytes", default=f"none,{DEFAULT_CHUNK_BYTES}",
                      help="comma list of Newton-Schulz chunk sizes to time ('none': whole groups); "
                           "the last one is the step used for the shares below")
  parser.add_argument("--matmul_size", type=int, default=8192)
  parser.add_argument("--tokens_per_step", type=int, default=1 << 20)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--train_step_seconds", type=float, default=None,
                      help="a measured training step time; otherwise estimated at the matmul ceiling")
  parser.add_argument("--train_devices", type=int, default=1,
                      help="devices the --train_step_seconds figure ran on")
  args = parser.parse_args(argv)
  cfg = get_model_config(args.model)
  device = jax.devices()[0].device_kind
  print(f"backend {jax.default_backend()}, device {device}, jax {jax.__version__}, model {cfg.name}")

  ceiling = matmul_tflops(args.matmul_size)
  print(f"bf16 matmul {args.matmul_size}^3: {ceiling:.1f} TFLOP/s")
  groups = muon_matrix_groups(cfg)
  ns_rows = bench_newton_schulz(groups, args.ns_coeffs, args.ns_steps, args.iters)
  for row in ns_rows:
    row["pct_matmul"] = 100 * row["tflops"] / ceiling
  _print_table(f"Newton-Schulz, {args.ns_steps} steps, '{args.ns_coeffs}', bf16 (batch per shape)",
               ns_rows, [("shape", "{}"), ("gflop", "{:.1f}"), ("ms", "{:.2f}"), ("tflops", "{:.1f}"),
                         ("pct_matmul", "{:.1f}")])

  chunk_rows = []
  for chunk in args.ns_chunk_bytes.split(","):
    chunk_bytes = None if chunk == "none" else int(chunk)
    seconds, memory = bench_optimizer_step(cfg, args.ns_coeffs, args.ns_steps, args.iters, chunk_bytes)
    chunk_rows.append({"ns_chunk_bytes": chunk, "ms": seconds * 1e3,
                       "temp_gib": memory.temp_size_in_bytes / 2**30,
                       "peak_gib": peak_bytes(memory) / 2**30})
  _print_table("MuonClip step (update + apply, all params, float32 state, one device) by "
               "Newton-Schulz chunk size; temp = XLA's scratch beyond arguments and outputs",
               chunk_rows, [("ns_chunk_bytes", "{}"), ("ms", "{:.1f}"), ("temp_gib", "{:.2f}"),
                            ("peak_gib", "{:.2f}")])
  step_s = chunk_rows[-1]["ms"] / 1e3
  ns_s = sum(row["ms"] for row in ns_rows) / 1e3
  flops = train_step_flops(cfg, args.tokens_per_step, args.seq_len)
  if args.train_step_seconds is not None:
    train_s, devices = args.train_step_seconds, args.train_devices
    train_source = f"measured (--train_step_seconds) on {devices} device(s)"
  else:
    train_s, devices = flops / (ceiling * 1e12), 1
    train_source = "ESTIMATE: step FLOPs on one device at the measured matmul ceiling"
  summary = {
      "params": count_params(cfg), "optimizer_step_ms": step_s * 1e3, "ns_total_ms": ns_s * 1e3,
      "ns_pct_of_optimizer_step": 100 * ns_s / step_s, "tokens_per_step": args.tokens_per_step,
      "seq_len": args.seq_len, "train_step_tflop": flops / 1e12, "train_step_s": train_s,
      "train_step_source": train_source, "train_devices": devices,
      "optimizer_pct_of_train_step": 100 * step_s / devices / train_s,
  }
  print(f"\nMuonClip step on all {summary['params']:,} params (float32, one device): "
        f"{step_s * 1e3:.1f} ms, of which Newton-Schulz ~{ns_s * 1e3:.1f} ms "
        f"({summary['ns_pct_of_optimizer_step']:.0f}%)")
  print(f"Training step at {args.tokens_per_step:,} tokens (seq {args.seq_len}): "
        f"{flops / 1e12:,.0f} TFLOP, {train_s:.2f} s [{train_source}]")
  print(f"Optimizer share of the training step: {summary['optimizer_pct_of_train_step']:.2f}% "
        f"(optimizer time / {devices} device(s), ideal scaling, no communication)")
  if os.environ.get("OUT"):
    path = os.path.join(os.environ["OUT"], "optimizer.json")
    with open(path, "w") as f:
      json.dump({"backend": jax.default_backend(), "device": device, "jax": jax.__version__,
                 "model": cfg.name, "ns_coeffs": args.ns_coeffs, "ns_steps": args.ns_steps,
                 "matmul_tflops": ceiling, "newton_schulz": ns_rows, "optimizer_step": chunk_rows,
                 "summary": summary}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
