"""The training loop, configured by gin: `train(workdir)` (run it through `python -m motif_jax.train`).

Builds the mesh, the model's sharded parameters, the optimizer and the data, then runs jitted steps
with explicit shardings, a log line and TensorBoard scalars every `log_every` steps, async
checkpoints every `checkpoint_every` steps, automatic resume from `workdir/checkpoints`, and a
checkpoint at the current step on SIGTERM (then a normal return).
"""


from __future__ import annotations

import math
import os
import signal
import time
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from motif_jax import checkpoint, configs, metrics, sharding
# Light (gin and numpy; TF and seqio load in make_train_data); registers the data's gin configurables.
from motif_jax.data import Curriculum, DataConfig, make_train_data
from motif_jax.model import abstract_params, init_params, param_logical_axes
from motif_jax import optim
from motif_jax.optim import schedules
from motif_jax.train_step import BATCH_KEYS, TrainState, make_train_step, state_shardings

muonclip = gin.external_configurable(optim.muonclip, "muonclip")


@gin.configurable
def adamw(learning_rate: optax.Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, **unused_model_layout) -> optax.GradientTransformationExtraArgs:
  """AdamW for every parameter; accepts (and ignores) the `max_logits` extra argument."""
  del unused_model_layout
  return optax.with_extra_args_support(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


@gin.configurable
def train(workdir: str, *,
          model: str = gin.REQUIRED,
          model_overrides: dict | None = None,
          num_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED,
          micro_batches: int = 1,
          mesh_shape: Sequence[int] = (1, -1, 1),
          rules: sharding.Rules = sharding.DEFAULT_RULES,
          optimizer: Callable = adamw,
          schedule: Callable = schedules.warmup_stable_decay,
          grad_clip_norm: float | None = 1.0,
          z_loss_weight: float = 0.0,
          seed: int = 0,
          data_mixture: str | Curriculum = "motif_embedded",
          log_every: int = 10,
          checkpoint_every: int = 100,
          keep_checkpoints: int = 3,
          peak_tflops_per_device: float | None = None,
          crash_after_step: int | None = None) -> list[dict]:
  """Trains `model` for `num_steps` steps; returns the logged metrics (one dict per log step).

  `optimizer(schedule, **model_layout)` builds an optax transformation; `schedule(total_steps=...)`
  builds the learning rate (its peak is bound in gin). Steps 1 and every `log_every`-th are logged.
  `crash_after_step` is fault injection for tests: the process SIGKILLs itself after that step,
  with no cleanup, as a lost machine would.
  """
  cfg = configs.get_model_config(model, **dict(model_overrides or {}))
  _check_settings(num_steps=num_steps, batch_size=batch_size, micro_batches=micro_batches,
                  log_every=log_every, checkpoint_every=checkpoint_every)
  mesh = sharding.make_mesh(mesh_shape)
  sharding.validate_layout(cfg, mesh, batch_size, rules)
  if (batch_size // micro_batches) % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"micro-batch rows = batch_size / micro_batches = {batch_size // micro_batches} "
                     f"is not divisible by data x fsdp = {mesh.shape['data'] * mesh.shape['fsdp']}; "
                     "change train.micro_batches or train.batch_size.")

  data = make_train_data(DataConfig(batch_size=batch_size, seq_len=seq_len, seed=seed,
                                    mixture=data_mixture),
                         process_index=jax.process_index(), process_count=jax.process_count())
  data.check_model_vocab(cfg.vocab_size,
                         shards=math.prod(mesh.shape[a] for a in sharding.mesh_axes("vocab", rules)))

  lr = schedule(total_steps=num_steps)
  logical_axes = param_logical_axes(cfg)
  tx = optimizer(lr, logical_axes=logical_axes, num_kv_groups=cfg.num_kv_groups,
                 signal_heads_per_group=cfg.signal_heads_per_group, head_dim=cfg.head_dim,
                 mesh=mesh, rules=rules)
  if jax.process_index() == 0:
    print(f"optimizer {getattr(optimizer, '__name__', optimizer)}; parameter routing:\n"
          f"{optim.describe_routing(abstract_params(cfg), logical_axes)}", flush=True)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)

  param_shardings = sharding.tree_shardings(logical_axes, mesh, rules)
  shardings = state_shardings(tx, abstract_params(cfg), param_shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh, rules)

  with jax.set_mesh(mesh):
    graphdef, params = init_params(cfg, seed, param_shardings, rules)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state,
                       jax.random.key_data(jax.random.key(seed)))
    state = jax.device_put(state, shardings)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep_checkpoints)
    data_position = 0
    latest = ckpt.latest_complete_step()
    if latest is not None:
      state, meta = ckpt.restore(latest, checkpoint.abstract_like(state, shardings))
      data_position = int(meta["data_position"])
      logging.info("Resumed from step %d (data position %d).", latest, data_position)

    step_fn = jax.jit(
        make_train_step(cfg, graphdef, tx, lr, micro_batches=micro_batches,
                        z_loss_weight=z_loss_weight),
        in_shardings=(shardings, {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(shardings, None), donate_argnums=(0,))

    writer = metrics.MetricWriter(os.path.join(workdir, "logs")) if jax.process_index() == 0 else None
    reporter = _Reporter(cfg, seq_len, batch_size, num_steps, peak_tflops_per_device, writer)
    preemption = checkpoint.PreemptionFlag()
    batches = data.batches(start=data_position)
    step = int(state.step)
    try:
      while step < num_steps:
        batch = _global_batch(next(batches), batch_sharding)
        state, step_metrics = step_fn(state, batch)
        step += 1
        data_position += 1
        log = step == 1 or step % log_every == 0 or step == num_steps
        reporter.after_step(step, step_metrics, log=log,
                            data_metrics=data.log_metrics(data_position) if log else None)
        meta = {"step": step, "data_position": data_position}
        if preemption.is_set():
          ckpt.save(step, state, meta)
          ckpt.wait()
          logging.warning("Saved step %d after SIGTERM; exiting.", step)
          break
        if step % checkpoint_every == 0 or step == num_steps:
          ckpt.save(step, state, meta)
        if step == crash_after_step:
          os.kill(os.getpid(), signal.SIGKILL)
    finally:
      ckpt.close()
      preemption.restore_handler()
      if writer:
        writer.close()
  return reporter.history


def _check_settings(*, num_steps, batch_size, micro_batches, log_every, checkpoint_every):
  for name, value in (("train.num_steps", num_steps), ("train.batch_size", batch_size),
                      ("train.micro_batches", micro_batches), ("train.log_every", log_every),
                      ("train.checkpoint_every", checkpoint_every)):
    if value <= 0:
      raise ValueError(f"{name}={value} must be positive.")
  if batch_size % micro_batches:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by train.micro_batches="
                     f"{micro_batches}.")


def _global_batch(local_rows: dict, batch_sharding) -> dict:
  """Assembles each process's rows into global arrays laid out by `batch_sharding`."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_rows[k]))
          for k in BATCH_KEYS}


class _Reporter:
  """Turns step metrics into the log line, TensorBoard scalars and the returned history."""

  def __init__(self, cfg, seq_len, batch_size, num_steps, peak_tflops_per_device, writer):
    self.flops_per_step = metrics.train_flops_per_token(cfg, seq_len) * batch_size * seq_len
    peak = (peak_tflops_per_device * 1e12 if peak_tflops_per_device
            else metrics.peak_flops_per_device(jax.devices()[0].device_kind))
    self.peak_total = peak * jax.device_count() if peak else None
    self.tokens_per_step = batch_size * seq_len
    self.num_steps, self.writer, self.history = num_steps, writer, []
    self._last_time, self._last_step, self._step_times = time.perf_counter(), None, []

  def after_step(self, step: int, step_metrics, *, log: bool,
                 data_metrics: dict[str, float] | None = None) -> None:
    if not log:
      return
    values = jax.device_get(step_metrics)
    now = time.perf_counter()
    if self._last_step is not None:  # the first logged interval includes compilation
      self._step_times.append((now - self._last_time) / (step - self._last_step))
    self._last_time, self._last_step = now, step
    step_time = float(np.median(self._step_times)) if self._step_times else None
    record = {
        "train/loss": float(values["loss"]),
        "train/grad_norm": float(values["grad_norm"]),
        "train/learning_rate": float(values["learning_rate"]),
        "train/max_attention_logit": float(values["max_logit"]),
    }
    for layer, value in enumerate(np.asarray(values["max_logit_per_layer"])):
      record[f"attention/max_logit_layer_{layer:02d}"] = float(value)
    line = (f"step {step:6d} | loss {record['train/loss']:.4f} | grad_norm "
            f"{record['train/grad_norm']:.3f} | lr {record['train/learning_rate']:.2e} | "
            f"max_logit {record['train/max_attention_logit']:.2f}")
    if step_time is None:
      line += " | timing from the next log step (this interval includes compilation)"
    else:
      record["throughput/step_time_s"] = step_time
      record["throughput/tokens_per_s"] = self.tokens_per_step / step_time
      line += (f" | tokens/s {record['throughput/tokens_per_s']:,.0f} | step {step_time * 1e3:.1f} ms")
      if self.peak_total:
        record["throughput/mfu"] = self.flops_per_step / step_time / self.peak_total
        line += f" | mfu {100 * record['throughput/mfu']:.1f}% (flops={metrics.FLOP_CONVENTION})"
      else:
        line += " | mfu n/a (no known peak for this device; set train.peak_tflops_per_device)"
      line += f" | eta {metrics.format_duration((self.num_steps - step) * step_time)}"
    if data_metrics:  # mixture/target/<task>, mixture/realised/<task>; the console shows the realised
      record.update(data_metrics)
      line += " | mixture " + " ".join(f"{key.rsplit('/', 1)[1]} {value:.2f}" for key, value in
                                       data_metrics.items() if key.startswith("mixture/realised/"))
    self.history.append({"step": step, **record})
    if self.writer:
      self.writer.write(step, record, console=line)
