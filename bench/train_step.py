"""Training-step throughput on one accelerator: `python bench/train_step.py [options]`.

    python bench/train_step.py [--model motif-2.6b] [--batch 2] [--seq_len 4096] [--steps 5]
                               [--variants reference/reference/full,...] [--layers N]

Builds the preset (optionally with fewer layers), synthetic random tokens, and the real jitted train
step with MuonClip (`motif_jax.train_step.make_train_step`), then for each variant
`attention_impl/mlp_impl/remat_policy` prints tokens/s, step time, MFU against the 989 TFLOP/s
datasheet peak and against a bf16 matmul ceiling measured in this run, and peak device memory.
FLOPs follow `motif_jax.metrics` (both GDA maps, causal attention at half, training = 3 x forward).
Writes JSON to $OUT/train_step.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the path set-up above)
import jax.numpy as jnp  # noqa: E402

from bench.timing import matmul_tflops, median_seconds  # noqa: E402
from motif_jax import configs, metrics, optim, sharding  # noqa: E402
from motif_jax.model import abstract_params, init_params, param_logical_axes  # noqa: E402
from motif_jax.train_step import TrainState, make_train_step, state_shardings  # noqa: E402

DATASHEET_PEAK = 989e12


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  tokens = jax.random.randint(jax.random.key(seed), (rows, seq_len + 1), 0, vocab, jnp.int32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              loss_weights=jnp.ones((rows, seq_len), jnp.float32),
              segment_ids=jnp.ones((rows, seq_len), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len)))


def time_train_step(cfg: configs.ModelConfig, batch: dict, steps: int, *, devices=None,
                    mesh_shape=(1, -1, 1), micro_batches: int = 1,
                    time_optimizer: bool = False) -> dict:
  """Times the jitted MuonClip train step of `cfg` on `batch` over `devices` (default: the first).

  Parameters, optimizer state and batch are laid out by the default logical-axis rules on a mesh of
  `mesh_shape`; the batch's rows split into `micro_batches` accumulated micro-batches. Returns step seconds, peak device bytes (compiled memory analysis), the losses of
  the warm-up step and the timed steps, and with `time_optimizer` the seconds of the optimizer
  update alone (MuonClip with Parallel Muon, on the same layout).
  """
  devices = jax.devices()[:1] if devices is None else devices
  mesh = sharding.make_mesh(mesh_shape, devices)
  rules = sharding.DEFAULT_RULES
  logical_axes = param_logical_axes(cfg)
  lr = lambda step: 1e-4
  tx = optim.muonclip(lr, logical_axes=logical_axes, num_kv_groups=cfg.num_kv_groups,
                      signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim,
                      mesh=mesh, rules=rules)
  param_shardings = sharding.tree_shardings(logical_axes, mesh, rules)
  shardings = state_shardings(tx, abstract_params(cfg), param_shardings, mesh)
  with jax.set_mesh(mesh):
    graphdef, params = init_params(cfg, 0, param_shardings, rules)
    state = TrainState(jnp.zeros((), jnp.int32), params,
                       jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                       jax.random.key_data(jax.random.key(0)))
    state = jax.device_put(state, shardings)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    step = jax.jit(make_train_step(cfg, graphdef, tx, lr, micro_batches=micro_batches),
                   in_shardings=(shardings, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()

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
      max_logits = jnp.zeros((cfg.num_layers, cfg.num_kv_groups, cfg.signal_heads_per_group + 1))
      update = jax.jit(lambda g, o, p: tx.update(g, o, p, max_logits=max_logits)[0],
                       in_shardings=(param_shardings, shardings.opt_state, param_shardings),
                       out_shardings=param_shardings)
      result["optimizer_seconds"] = median_seconds(update, state.params, state.opt_state,
                                                   state.params, warmup=2, iters=5)
  peak = getattr(memory, "peak_memory_in_bytes", None) or (
      memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes)
  result["peak_bytes"] = int(peak)
  return result


def main(argv):
  parser = argparse.ArgumentParser(prog="bench/train_step.py")
  parser.add_argument("--model", default="motif-2.6b")
  parser.add_argument("--layers", type=int, default=None, help="override num_layers")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--variants", default="reference/reference/full")
  args = parser.parse_args(argv)

  ceiling = matmul_tflops() * 1e12
  batch = None
  results = []
  for variant in args.variants.split(","):
    attention_impl, mlp_impl, remat = variant.split("/")
    overrides = dict(attention_impl=attention_impl, mlp_impl=mlp_impl, remat_policy=remat)
    if args.layers:
      overrides["num_layers"] = args.layers
    cfg = configs.get_model_config(args.model, **overrides)
    batch = batch or synthetic_batch(args.batch, args.seq_len, cfg.vocab_size)
    try:
      timing = time_train_step(cfg, batch, args.steps)
    except Exception as error:  # a variant that does not compile or fit is reported, not fatal
      results.append({"variant": variant, "error": f"{type(error).__name__}: {str(error)[:300]}"})
      continue
    tokens = args.batch * args.seq_len
    flops = metrics.train_flops_per_token(cfg, args.seq_len) * tokens
    seconds = timing["step_seconds"]
    results.append({
        "variant": variant, "model": args.model, "layers": cfg.num_layers,
        "batch": args.batch, "seq_len": args.seq_len, "tokens_per_s": tokens / seconds,
        "step_ms": seconds * 1e3, "mfu_datasheet": flops / seconds / DATASHEET_PEAK,
        "mfu_measured_ceiling": flops / seconds / ceiling, "peak_gib": timing["peak_bytes"] / 2**30,
        "flops_per_step": flops})

  print(f"\nbf16 matmul ceiling measured: {ceiling / 1e12:.0f} TFLOP/s; datasheet 989; "
        f"FLOPs: {metrics.FLOP_CONVENTION}, both GDA maps, training = 3 x forward")
  print(f"{'variant':34s} {'tokens/s':>10s} {'step ms':>9s} {'MFU(989)':>9s} {'MFU(ceil)':>9s} {'peak GiB':>9s}")
  for r in results:
    if "error" in r:
      print(f"{r['variant']:34s} {r['error']}")
    else:
      print(f"{r['variant']:34s} {r['tokens_per_s']:10,.0f} {r['step_ms']:9.1f} "
            f"{100 * r['mfu_datasheet']:8.1f}% {100 * r['mfu_measured_ceiling']:8.1f}% "
            f"{r['peak_gib']:9.1f}")
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "train_step.json"), "w") as f:
      json.dump({"matmul_ceiling_tflops": ceiling / 1e12, "results": results}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1:])
