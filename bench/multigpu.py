"""Sharded training on all local GPUs against one GPU: `python bench/multigpu.py [options]`.

    python bench/multigpu.py [--model motif-2.6b] [--layers N] [--rows_per_device 2] [--seq_len 4096]
                             [--steps 3] [--variant pallas/pallas/kernels/unrolled] [--mesh_shape 1,-1,1]

Runs the MuonClip train step with FSDP over all local devices (mesh `--mesh_shape`, default
(1, -1, 1)) at a global batch of `rows_per_device x devices` rows, then the same global batch on one
device with `devices` micro-batches of `rows_per_device` rows (gradient accumulation keeps the math
the same and the memory of one device). Prints per configuration: tokens/s per device, MFU against
the 989 TFLOP/s datasheet peak, the optimizer update's share of the step, peak memory; the scaling
ratio (per-device throughput on N devices / on 1); and the losses of the first steps of both runs,
which must agree to bfloat16 tolerance. Writes JSON to $OUT/multigpu.json when OUT is set. On a
CPU host, XLA_FLAGS=--xla_force_host_platform_device_count=8 gives it devices to shard over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path set-up above)
import numpy as np  # noqa: E402

from bench.train_step import DATASHEET_PEAK, synthetic_batch, time_train_step, variant_config  # noqa: E402
from motif_jax import metrics  # noqa: E402


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/multigpu.py")
  parser.add_argument("--model", default="motif-2.6b")
  parser.add_argument("--layers", type=int, default=None, help="override num_layers")
  parser.add_argument("--rows_per_device", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variant", default="pallas/pallas/kernels/unrolled",
                      help="attention_impl/mlp_impl/remat_policy[/unrolled] (default: gpu.gin's)")
  parser.add_argument("--mesh_shape", default="1,-1,1")
  args = parser.parse_args(argv)

  cfg = variant_config(args.model, args.variant, args.layers)
  devices = jax.devices()
  rows = args.rows_per_device * len(devices)
  batch = synthetic_batch(rows, args.seq_len, cfg.vocab_size)
  flops = metrics.train_flops_per_token(cfg, args.seq_len) * rows * args.seq_len
  mesh_shape = tuple(int(x) for x in args.mesh_shape.split(","))

  runs = {
      f"{len(devices)} devices": time_train_step(cfg, batch, args.steps, devices=devices,
                                                 mesh_shape=mesh_shape, time_optimizer=True),
      "1 device": time_train_step(cfg, batch, args.steps, devices=devices[:1],
                                  micro_batches=len(devices), time_optimizer=True),
  }
  table = []
  for name, run in runs.items():
    count = len(devices) if name != "1 device" else 1
    seconds = run["step_seconds"]
    table.append({
        "run": name, "devices": count, "step_ms": seconds * 1e3,
        "tokens_per_s_per_device": rows * args.seq_len / seconds / count,
        "mfu": flops / seconds / (DATASHEET_PEAK * count),
        "optimizer_share": run["optimizer_seconds"] / seconds,
        "peak_gib": run["peak_bytes"] / 2**30, "losses": run["losses"]})
  scaling = table[0]["tokens_per_s_per_device"] / table[1]["tokens_per_s_per_device"]
  loss_gap = float(np.max(np.abs(np.subtract(table[0]["losses"], table[1]["losses"]))
                          / np.abs(table[1]["losses"])))

  print(f"\n{args.model} ({cfg.num_layers} layers), {args.variant}, global batch {rows} x "
        f"{args.seq_len}; FLOPs {metrics.FLOP_CONVENTION}, both GDA maps, training = 3 x forward")
  print(f"{'run':12s} {'step ms':>9s} {'tok/s/dev':>10s} {'MFU(989)':>9s} {'opt share':>9s} "
        f"{'peak GiB':>9s}  losses")
  for r in table:
    print(f"{r['run']:12s} {r['step_ms']:9.1f} {r['tokens_per_s_per_device']:10,.0f} "
          f"{100 * r['mfu']:8.1f}% {100 * r['optimizer_share']:8.2f}% {r['peak_gib']:9.1f}  "
          + " ".join(f"{x:.5f}" for x in r["losses"]))
  print(f"scaling (per-device throughput, {len(devices)} vs 1): {scaling:.3f}; "
        f"max relative loss difference: {loss_gap:.2e}")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "multigpu.json"), "w") as f:
      json.dump({"runs": table, "scaling": scaling, "max_relative_loss_gap": loss_gap}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
