"""Training-step throughput on one accelerator: `python bench/train_step.py [options]`.

    python bench/train_step.py [--model motif-2.6b] [--batch 2] [--micro_batches 1] [--seq_len 4096]
                               [--steps 5] [--variants reference/reference/full,...] [--layers N]

Builds the preset (optionally with fewer layers), synthetic random tokens, and the real jitted train
step the trainer runs (`motif_jax.step_plan.plan_step`: MuonClip, clipping at 1.0), then for each
variant `attention_impl/mlp_impl/remat_policy[/unrolled]` prints tokens/s, step time, MFU against the
989 TFLOP/s datasheet peak and against a bf16 matmul ceiling measured in this run, and peak device
memory.
FLOPs follow `motif_jax.metrics` (both GDA maps, causal attention at half, training = 3 x forward).
Writes JSON to $OUT/train_step.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path set-up above)
import jax.numpy as jnp  # noqa: E402

from bench.timing import matmul_tflops, median_seconds  # noqa: E402
from motif_jax import configs, metrics, optim, sharding  # noqa: E402
from motif_jax.step_plan import plan_step  # noqa: E402

DATASHEET_PEAK = 989e12
GRAD_CLIP_NORM = 1.0  # gin_configs/base.gin's train.grad_clip_norm


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  tokens = jax.random.randint(jax.random.key(seed), (rows, seq_len + 1), 0, vocab, jnp.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              loss_weights=jnp.ones((rows, seq_len), jnp.float32),
              segment_ids=jnp.ones((rows, seq_len), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len)))


def variant_config(model: str, variant: str, layers: int | None = None) -> configs.ModelConfig:
  """The preset `model` with a variant "attention_impl/mlp_impl/remat_policy[/unrolled]" applied.

  A fourth field "unrolled" sets `scan_layers=False`; `layers` overrides the depth.
  """
  attention_impl, mlp_impl, remat, *layout = variant.split("/")
  if layout not in ([], ["unrolled"]):
    raise ValueError(f"variant {variant!r}: the optional fourth field is 'unrolled', not {layout}.")
  overrides = dict(attention_impl=attention_impl, mlp_impl=mlp_impl, remat_policy=remat,
                   scan_layers=not layout)
  if layers:
    overrides["num_layers"] = layers
  return configs.get_model_config(model, **overrides)


def build_train_step(cfg: configs.ModelConfig, batch: dict, *, devices=None,
                     mesh_shape=(1, -1, 1), micro_batches: int = 1) -> dict:
  """Compiles the train step of `cfg` for `batch` over `devices` (default: the first device).

  The step is the trainer's own (`motif_jax.step_plan.plan_step`): MuonClip at a constant learning
  rate, gradient clipping at GRAD_CLIP_NORM, the default logical-axis rules on a mesh of
  `mesh_shape`, the batch's rows split into `micro_batches` accumulated micro-batches. Returns a dict
  with the `compiled` step, `compile_seconds`, the initial `state` and `batch` on device, `memory`
  (the compiled memory analysis), and the `plan` for callers that time parts of it.
  """
  devices = jax.devices()[:1] if devices is None else devices
  overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "name"}
  plan = plan_step(model=cfg.name, model_overrides=overrides, num_steps=1,
                   batch_size=batch["inputs"].shape[0], micro_batches=micro_batches,
                   mesh_shape=mesh_shape, rules=sharding.DEFAULT_RULES, optimizer=optim.muonclip,
                   schedule=lambda total_steps: lambda step: 1e-4, grad_clip_norm=GRAD_CLIP_NORM,
                   z_loss_weight=0.0, devices=devices)
  with jax.set_mesh(plan.mesh):
    state = plan.initial_state(0)
    batch = jax.device_put(batch, plan.batch_sharding)
    start = time.perf_counter()
    compiled = plan.step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
  return dict(compiled=compiled, compile_seconds=compile_seconds, state=state, batch=batch,
              memory=compiled.memory_analysis(), plan=plan)


def peak_bytes(memory) -> int:
  """Peak device bytes of a compiled memory analysis (or the sum of its parts when not reported)."""
  peak = getattr(memory, "peak_memory_in_bytes", None) or (
      memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)
  return int(peak)


def time_train_step(cfg: configs.ModelConfig, batch: dict, steps: int, *, devices=None,
                    mesh_shape=(1, -1, 1), micro_batches: int = 1,
                    time_optimizer: bool = False) -> dict:
  """Times the step `build_train_step` compiles: one warm-up step, then `steps` timed ones.

  Returns step seconds, peak device bytes (compiled memory analysis), the losses of the warm-up step
  and the timed steps, and with `time_optimizer` the seconds of the optimizer update alone (MuonClip
  with Parallel Muon, on the same layout).
  """
  built = build_train_step(cfg, batch, devices=devices, mesh_shape=mesh_shape,
                           micro_batches=micro_batches)
  compiled, state, batch = built["compiled"], built["state"], built["batch"]
  with jax.set_mesh(built["plan"].mesh):
    losses = []
    state, metrics_ = compiled(state, batch)  # warm-up
    losses.append(metrics_["loss"])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics_ = compiled(state, batch)
      losses.append(metrics_["loss"])
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / steps
    result = {"step_seconds": seconds, "losses": [float(x) for x in losses]}
    if time_optimizer:
      plan = built["plan"]
      tx, param_shardings = plan.tx, plan.shardings.params
      max_logits = jnp.zeros((cfg.num_layers, cfg.num_kv_groups, cfg.signal_heads_per_group + 1))
      update = jax.jit(lambda g, o, p: tx.update(g, o, p, max_logits=max_logits)[0],
                       in_shardings=(param_shardings, plan.shardings.opt_state, param_shardings),
                       out_shardings=param_shardings)
      result["optimizer_seconds"] = median_seconds(update, state.params, state.opt_state,
                                                   state.params, warmup=2, iters=5)
  result["peak_bytes"] = peak_bytes(built["memory"])
  result["compile_seconds"] = built["compile_seconds"]
  return result


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/train_step.py")
  parser.add_argument("--model", default="motif-2.6b")
  parser.add_argument("--layers", type=int, default=None, help="override num_layers")
  parser.add_argument("--batch", type=int, default=2, help="rows per optimizer step")
  parser.add_argument("--micro_batches", type=int, default=1,
                      help="accumulated micro-batches the rows split into (tokens per update unchanged)")
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", default="reference/reference/full")
  args = parser.parse_args(argv)

  ceiling = matmul_tflops() * 1e12
  batch = None
  results = []
  for variant in args.variants.split(","):
    cfg = variant_config(args.model, variant, args.layers)
    batch = batch or synthetic_batch(args.batch, args.seq_len, cfg.vocab_size)
    try:
      timing = time_train_step(cfg, batch, args.steps, micro_batches=args.micro_batches)
    except Exception as error:  # a variant that does not compile or fit is reported, not fatal
      results.append({"variant": variant, "error": f"{type(error).__name__}: {str(error)[:300]}"})
      continue
    tokens = args.batch * args.seq_len
    flops = metrics.train_flops_per_token(cfg, args.seq_len) * tokens
    seconds = timing["step_seconds"]
    results.append({
        "variant": variant, "model": args.model, "layers": cfg.num_layers,
        "batch": args.batch, "micro_batches": args.micro_batches, "seq_len": args.seq_len,
        "tokens_per_s": tokens / seconds,
        "step_ms": seconds * 1e3, "mfu_datasheet": flops / seconds / DATASHEET_PEAK,
        "mfu_measured_ceiling": flops / seconds / ceiling, "peak_gib": timing["peak_bytes"] / 2**30,
        "compile_s": timing["compile_seconds"],
        "flops_per_step": flops})

  print(f"\nbf16 matmul ceiling measured: {ceiling / 1e12:.0f} TFLOP/s; datasheet 989; "
        f"FLOPs: {metrics.FLOP_CONVENTION}, both GDA maps, training = 3 x forward")
  print(f"{'variant':34s} {'tokens/s':>10s} {'step ms':>9s} {'MFU(989)':>9s} {'MFU(ceil)':>9s} "
        f"{'peak GiB':>9s} {'compile s':>9s}")
  for r in results:
    if "error" in r:
      print(f"{r['variant']:34s} {r['error']}")
    else:
      print(f"{r['variant']:34s} {r['tokens_per_s']:10,.0f} {r['step_ms']:9.1f} "
            f"{100 * r['mfu_datasheet']:8.1f}% {100 * r['mfu_measured_ceiling']:8.1f}% "
            f"{r['peak_gib']:9.1f} {r['compile_s']:9.1f}")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
      json.dump({"matmul_ceiling_tflops": ceiling / 1e12, "results": results}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
