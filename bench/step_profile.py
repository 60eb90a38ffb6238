"""Step-time breakdown of one training step from a profiler trace: `python bench/step_profile.py`.

    python bench/step_profile.py [--model motif-2.6b] [--layers N] [--batch 2] [--micro_batches 1]
                                 [--seq_len 4096] [--variant pallas/pallas/full] [--steps 2] [--top 15]

Compiles the same MuonClip step as `bench/train_step.py`, runs it under `jax.profiler` and attributes
every device kernel to the part of the model that emitted it, through the compiled HLO's `op_name`
metadata and the named scopes the model sets (attention_projections, attention_core,
attention_output, mlp_matmuls, polynorm, norm_residual, embedding, lm_head, cross_entropy,
optimizer). Each part is split by phase: forward, recompute (remat) and backward (JAX's
`transpose(...)`), and by kernel kind (matmul or other). "idle" is the step's wall time during which
no kernel ran (launch gaps, host work). The traced run disables XLA's CUDA-graph command buffers
(which hide each kernel's HLO op), so its step time can differ a little from `bench/train_step.py`'s.
Prints the table and the slowest kernels; writes JSON to $OUT/step_profile_<model>_<variant>.json
when OUT is set (with --dump, also the trace, the HLO text and XLA's dump of the step).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path set-up above)

from bench.train_step import (DATASHEET_PEAK, build_train_step, peak_bytes,  # noqa: E402
                              synthetic_batch, variant_config)
from motif_jax import metrics  # noqa: E402

SCOPES = ("optimizer", "cross_entropy", "lm_head", "embedding", "attention_core",
          "attention_projections", "attention_output", "polynorm", "mlp_matmuls", "norm_residual")
MATMUL_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|matmul|wgmma|cublas", re.IGNORECASE)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+)\s.*\{\s*$|^ENTRY\s+%?([\w.\-]+)")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> JAX op_name, for every instruction of an optimized HLO module.

  A fusion without metadata of its own takes the most common op_name of the computation it calls.
  Names are also entered with '.' and '-' replaced by '_', as kernel names spell them.
  """
  own, calls, by_computation = {}, {}, collections.defaultdict(collections.Counter)
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      computation = header.group(1) or header.group(2)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    if op_name:
      own[name] = op_name.group(1)
      by_computation[computation][op_name.group(1)] += 1
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if called:
      calls[name] = called.group(1)
  names = dict(own)
  for name, computation in calls.items():
    if name not in names and by_computation[computation]:
      names[name] = by_computation[computation].most_common(1)[0][0]
  names.update({re.sub(r"[.\-]", "_", k): v for k, v in list(names.items())})
  return names


def classify(op_name: str) -> tuple[str, str]:
  """(part, phase) of an op_name: the innermost model scope it lies in, and forward/recompute/backward."""
  positions = {scope: op_name.rfind(scope) for scope in SCOPES}
  found = {scope: pos for scope, pos in positions.items() if pos >= 0}
  part = max(found, key=found.get) if found else "other"
  if part == "optimizer":
    return part, "update"
  if "rematted_computation" in op_name:
    return part, "recompute"
  if "transpose(" in op_name:
    return part, "backward"
  return part, "forward"


def _load_trace(profile_dir: str):
  from jax.profiler import ProfileData

  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise RuntimeError(f"the profiler wrote no .xplane.pb under {profile_dir}")
  return paths[-1], ProfileData.from_file(paths[-1])


def _stats(event) -> dict:
  return {name: value for name, value in event.stats}


def _kernel_events(data):
  """(kernel name, start_ns, duration_ns, hlo_op) of every kernel on the first GPU/TPU device plane,
  and (kernel name, hlo_op, raw trace stats) of its first 5 copies (their sizes, for `copies_report`)."""
  planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  if planes:
    plane = sorted(planes, key=lambda p: p.name)[0]
    lines = [line for line in plane.lines if line.name.startswith("Stream")]
    if not lines:  # TPU or a newer trace layout: the per-op line
      lines = [line for line in plane.lines if line.name in ("XLA Ops", "TensorCore XLA Ops")]
  else:  # XLA:CPU (a smoke run of this script): the thunks its worker threads ran
    plane = next(p for p in data.planes if p.name == "/host:CPU")
    lines = [line for line in plane.lines if line.name.startswith("tf_XLA")]
  print(f"trace plane {plane.name}: lines {[line.name for line in plane.lines]}")
  events, copy_samples = [], []
  for line in lines:
    for event in line.events:
      stats = _stats(event)
      if "hlo_op" in stats and not str(stats["hlo_op"]).startswith("command_buffer"):
        hlo_op = str(stats["hlo_op"])
      elif planes:
        hlo_op = event.name  # XLA names a fusion's kernel after the fusion
      else:
        continue
      # On XLA:CPU a while/call thunk encloses its body's thunks: count the body only.
      if not planes and re.match(r"(while|call|conditional)\b", event.name):
        continue
      events.append((event.name, event.start_ns, event.duration_ns, hlo_op))
      if "memcpy" in event.name.lower() and len(copy_samples) < 5:
        copy_samples.append((event.name, hlo_op, stats))
  return events, copy_samples


def copies_report(events, copy_samples, op_names: dict[str, str], steps: int, top: int) -> None:
  """Prints the device-to-device copies of a step grouped by the HLO op that issued them, then the
  raw trace stats of `copy_samples` (from `_kernel_events`)."""
  groups = collections.defaultdict(lambda: [0, 0.0])
  for name, _, duration, hlo_op in events:
    if "memcpy" in name.lower():
      groups[(name, hlo_op)][0] += 1
      groups[(name, hlo_op)][1] += duration / 1e6
  count = sum(c for c, _ in groups.values())
  print(f"\ncopies: {count / steps:,.0f} per step from {len(groups)} HLO ops; the largest by time "
        "(ms per step, copies per step, op, op_name):")
  for (name, hlo_op), (c, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"  {ms / steps:8.2f} ms x{c / steps:6.0f}  {name[:20]}  {hlo_op[:60]}  <- "
          f"{op_names.get(hlo_op, '')[-100:]}")
  for name, hlo_op, stats in copy_samples:
    print(f"  sample {name} {hlo_op}: {stats}")


def breakdown(events, op_names: dict[str, str], steps: int) -> tuple[dict, list, float]:
  """Per (part, phase): {"ms", "matmul_ms"} per step; the slowest kernels; busy ms per step."""
  table = collections.defaultdict(lambda: {"ms": 0.0, "matmul_ms": 0.0})
  kernels = collections.defaultdict(lambda: {"ms": 0.0, "count": 0, "op_name": ""})
  intervals = []
  for name, start, duration, hlo_op in events:
    op_name = op_names.get(hlo_op, "")
    key = classify(op_name)
    ms = duration / 1e6 / steps
    table[key]["ms"] += ms
    if MATMUL_KERNEL.search(name):
      table[key]["matmul_ms"] += ms
    kernel = kernels[(key, name[:90])]
    kernel["ms"] += ms
    kernel["count"] += 1
    kernel["op_name"] = op_name[-110:]
    intervals.append((start, start + duration))
  busy, end = 0.0, -1
  for start, stop in sorted(intervals):  # union of kernel intervals over all streams
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  top = sorted(({"part": k[0][0], "phase": k[0][1], "kernel": k[1], **v} for k, v in kernels.items()),
               key=lambda r: -r["ms"])
  return dict(table), top, busy / 1e6 / steps


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/step_profile.py")
  parser.add_argument("--model", default="motif-2.6b")
  parser.add_argument("--layers", type=int, default=None, help="override num_layers")
  parser.add_argument("--batch", type=int, default=2, help="rows per optimizer step")
  parser.add_argument("--micro_batches", type=int, default=1)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--variant", default="pallas/pallas/full", help="attention/mlp/remat")
  parser.add_argument("--steps", type=int, default=2, help="traced steps")
  parser.add_argument("--top", type=int, default=15, help="slowest kernels to list")
  parser.add_argument("--copies", action="store_true",
                      help="also list the device-to-device copies by the HLO op that issued them")
  parser.add_argument("--dump", action="store_true",
                      help="also write the trace, the HLO text and XLA's dump of the step to $OUT")
  args = parser.parse_args(argv)
  # Kernels replayed from a CUDA graph carry the graph's name, not their HLO op's: profile without
  # them. XLA reads its flags when the backend starts, which nothing here has done yet.
  if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
  if args.dump and os.environ.get("OUT"):  # XLA's own dump: the HLO as compiled, pass by pass
    os.environ["XLA_FLAGS"] += (f" --xla_dump_to={os.path.join(os.environ['OUT'], 'xla_dump')}"
                                " --xla_dump_hlo_module_re=train_step --xla_dump_hlo_as_text")

  cfg = variant_config(args.model, args.variant, args.layers)
  batch = synthetic_batch(args.batch, args.seq_len, cfg.vocab_size)
  built = build_train_step(cfg, batch, micro_batches=args.micro_batches)
  compiled, state, batch = built["compiled"], built["state"], built["batch"]
  hlo_text = compiled.as_text()
  op_names = hlo_op_names(hlo_text)

  with jax.set_mesh(built["plan"].mesh):
    for _ in range(2):  # warm-up
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    profile_dir = tempfile.mkdtemp(prefix="step_profile_")
    jax.profiler.start_trace(profile_dir)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    jax.profiler.stop_trace()

  trace_path, data = _load_trace(profile_dir)
  events, copy_samples = _kernel_events(data)
  mapped = sum(1 for event in events if event[3] in op_names)
  print(f"{len(events)} kernels traced, {mapped} mapped to an HLO op_name")
  if args.dump and os.environ.get("OUT"):  # the raw trace and HLO, to study offline
    shutil.copy(trace_path, os.path.join(os.environ["OUT"], "step.xplane.pb"))
    with open(os.path.join(os.environ["OUT"], "step_hlo.txt"), "w") as f:
      f.write(hlo_text)
  table, top, busy_ms = breakdown(events, op_names, args.steps)
  if args.copies:
    copies_report(events, copy_samples, op_names, args.steps, args.top)
  tokens = args.batch * args.seq_len
  flops = metrics.train_flops_per_token(cfg, args.seq_len) * tokens
  print(f"\n{args.model} layers={cfg.num_layers} batch={args.batch} micro_batches={args.micro_batches} "
        f"seq={args.seq_len} variant={args.variant}: step {wall_ms:.1f} ms (traced), "
        f"{tokens / wall_ms * 1e3:,.0f} tokens/s, "
        f"MFU(989) {100 * flops / (wall_ms / 1e3) / DATASHEET_PEAK:.1f}%, "
        f"peak {peak_bytes(built['memory']) / 2**30:.1f} GiB")
  print(f"{'part':24s} {'phase':10s} {'ms/step':>9s} {'matmul ms':>10s} {'% step':>7s}")
  rows = sorted(table.items(), key=lambda kv: -kv[1]["ms"])
  for (part, phase), value in rows:
    print(f"{part:24s} {phase:10s} {value['ms']:9.2f} {value['matmul_ms']:10.2f} "
          f"{100 * value['ms'] / wall_ms:6.1f}%")
  idle = wall_ms - busy_ms
  print(f"{'idle (no kernel running)':35s} {idle:9.2f} {'':10s} {100 * idle / wall_ms:6.1f}%")
  parts = collections.Counter()
  for (part, _), value in table.items():
    parts[part] += value["ms"]
  print("by part: " + ", ".join(f"{p} {100 * ms / wall_ms:.1f}%" for p, ms in parts.most_common()))
  print(f"\nslowest {args.top} kernels (ms per step, launches per step):")
  for row in top[:args.top]:
    print(f"  {row['ms']:8.2f} ms x{row['count'] / args.steps:5.0f}  {row['part']}/{row['phase']}  "
          f"{row['kernel']}  <- {row['op_name']}")
  if os.environ.get("OUT"):
    name = f"step_profile_{args.model}_{args.variant.replace('/', '-')}.json"
    path = os.path.join(os.environ["OUT"], name)
    with open(path, "w") as f:
      json.dump({"model": args.model, "layers": cfg.num_layers, "batch": args.batch,
                 "micro_batches": args.micro_batches, "seq_len": args.seq_len, "variant": args.variant,
                 "step_ms": wall_ms, "busy_ms": busy_ms,
                 "peak_gib": peak_bytes(built["memory"]) / 2**30,
                 "breakdown": [{"part": p, "phase": ph, **v} for (p, ph), v in rows],
                 "top_kernels": top[:50]}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
