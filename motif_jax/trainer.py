"""The training loop, configured by gin: `train(workdir)` (run it through `python -m motif_jax.train`).

Builds the mesh, the model's sharded parameters, the optimizer and the data, then runs jitted steps
with explicit shardings, a log line and TensorBoard scalars every `log_every` steps, async
checkpoints every `checkpoint_every` steps and automatic resume from `workdir/checkpoints` (skipping
a newest checkpoint that cannot be read back). On a preemption notice (SIGTERM; with several hosts,
at a step they all agree on) it checkpoints the current step and returns normally. A step with a
non-finite loss, gradients or update (new params or optimizer state) changes nothing and is counted,
its cause logged; `max_nonfinite_steps` of them in a row stop the run.
`motif_jax.step_plan.plan_step` builds the jitted step alone (for `motif_jax.aot` and the
benchmarks).
"""


from __future__ import annotations

import math
import os
import signal
import time
from typing import Callable, Sequence

import gin
import jax
import numpy as np
import optax
from absl import logging

from motif_jax import checkpoint, distributed, metrics, sharding
# Light (gin and numpy; TF and seqio load in make_train_data); registers the data's gin configurables.
from motif_jax.data import Curriculum, DataConfig, make_train_data
from motif_jax.model import abstract_params, param_logical_axes
from motif_jax import optim
from motif_jax.optim import schedules
from motif_jax.step_plan import plan_step
from motif_jax.train_step import BATCH_KEYS, NONFINITE_REASONS

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
          data_shards: int | None = None,
          log_every: int = 10,
          checkpoint_every: int = 100,
          keep_checkpoints: int = 3,
          peak_tflops_per_device: float | None = None,
          max_nonfinite_steps: int = 10,
          inject_nonfinite_steps: Sequence[int] = (),
          crash_after_step: int | None = None) -> list[dict]:
  """Trains `model` for `num_steps` steps; returns the logged metrics (one dict per log step).

  `optimizer(schedule, **model_layout)` builds an optax transformation; `schedule(total_steps=...)`
  builds the learning rate (its peak is bound in gin). Steps 1 and every `log_every`-th are logged.
  `data_shards` fixes how many shards the data is cut into (default: one per process), so that the
  global batch stays the same when the number of hosts changes. `max_nonfinite_steps` non-finite
  steps in a row raise `NonFiniteError`.
  Fault injection for tests: `crash_after_step` makes the process SIGKILL itself after that step,
  with no cleanup, as a lost machine would; the steps in `inject_nonfinite_steps` get NaN loss
  weights, hence a NaN loss and NaN gradients.
  """
  _check_settings(num_steps=num_steps, batch_size=batch_size, micro_batches=micro_batches,
                  log_every=log_every, checkpoint_every=checkpoint_every,
                  max_nonfinite_steps=max_nonfinite_steps)
  plan = plan_step(model=model, model_overrides=model_overrides, num_steps=num_steps,
                   batch_size=batch_size, micro_batches=micro_batches, mesh_shape=mesh_shape,
                   rules=rules, optimizer=optimizer, schedule=schedule,
                   grad_clip_norm=grad_clip_norm, z_loss_weight=z_loss_weight)
  cfg, mesh = plan.cfg, plan.mesh

  shards, shard_count = distributed.local_data_shards(data_shards)
  data_config = DataConfig(batch_size=batch_size, seq_len=seq_len, seed=seed, mixture=data_mixture)
  data_streams = [make_train_data(data_config, process_index=shard, process_count=shard_count)
                  for shard in shards]
  data = data_streams[0]
  data.check_model_vocab(cfg.vocab_size,
                         shards=math.prod(mesh.shape[a] for a in sharding.mesh_axes("vocab", rules)))

  if jax.process_index() == 0:
    print(f"optimizer {getattr(optimizer, '__name__', optimizer)}; parameter routing:\n"
          f"{optim.describe_routing(abstract_params(cfg), param_logical_axes(cfg))}", flush=True)

  with jax.set_mesh(mesh):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep_checkpoints)
    data_position, skipped_before = 0, 0
    restored = ckpt.restore_latest(plan.abstract_state())
    if restored is None:
      state = plan.initial_state(seed)
    else:
      latest, state, meta = restored
      data_position = int(meta["data_position"])
      skipped_before = int(meta.get("skipped_steps", 0))
      if jax.process_index() == 0:
        print(f"resumed from step {latest} of {ckpt.directory} (data position {data_position})", flush=True)

    writer = metrics.MetricWriter(os.path.join(workdir, "logs")) if jax.process_index() == 0 else None
    reporter = _Reporter(cfg, seq_len, batch_size, num_steps, peak_tflops_per_device, writer)
    guard = _NonFiniteGuard(max_nonfinite_steps, skipped_before, plan.checked_leaf_names())
    preemption = checkpoint.PreemptionWatch()
    batches = _stacked([stream.batches(start=data_position) for stream in data_streams])
    step = start_step = int(state.step)
    if step >= num_steps and jax.process_index() == 0:
      print(f"nothing to train: the checkpoint is at step {step} and train.num_steps = {num_steps}; raise "
            "train.num_steps to train on, or pass a new --workdir to start over", flush=True)
    try:
      while step < num_steps:
        local_rows = next(batches)
        if step + 1 in inject_nonfinite_steps:
          local_rows = dict(local_rows, loss_weights=np.full_like(local_rows["loss_weights"], np.nan))
        state, step_metrics = plan.step_fn(state, _global_batch(local_rows, plan.batch_sharding))
        step += 1
        data_position += 1
        guard.push(step, step_metrics)
        log = step == 1 or step % log_every == 0 or step == num_steps
        if log:
          guard.flush()
        reporter.after_step(step, step_metrics, log=log, skipped_steps=guard.total,
                            data_metrics=data.log_metrics(data_position) if log else None)
        preempted = preemption.reached(step)
        if preempted or step % checkpoint_every == 0 or step == num_steps:
          guard.flush()  # raises before saving after too many non-finite steps
          ckpt.save(step, state, {"step": step, "data_position": data_position,
                                  "skipped_steps": guard.total})
        if preempted:
          ckpt.wait()
          logging.warning("Saved step %d after a preemption notice; exiting.", step)
          break
        if step == crash_after_step:
          os.kill(os.getpid(), signal.SIGKILL)
      guard.flush()
    finally:
      ckpt.close()
      preemption.close()
      if writer:
        writer.close()
  if jax.process_index() == 0 and reporter.history:
    print(reporter.summary(start_step, step, ckpt.directory, guard.total), flush=True)
  return reporter.history


def _check_settings(*, num_steps, batch_size, micro_batches, log_every, checkpoint_every,
                    max_nonfinite_steps):
  for name, value in (("train.num_steps", num_steps), ("train.batch_size", batch_size),
                      ("train.micro_batches", micro_batches), ("train.log_every", log_every),
                      ("train.checkpoint_every", checkpoint_every),
                      ("train.max_nonfinite_steps", max_nonfinite_steps)):
    if value <= 0:
      raise ValueError(f"{name}={value} must be positive.")
  if batch_size % micro_batches:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by train.micro_batches="
                     f"{micro_batches}.")


def _stacked(streams):
  """Batches of several data shards, their rows stacked in shard order."""
  if len(streams) == 1:
    return streams[0]
  return ({k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
          for parts in zip(*streams))


def _global_batch(local_rows: dict, batch_sharding) -> dict:
  """Assembles each process's rows into global arrays laid out by `batch_sharding`."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_rows[k]))
          for k in BATCH_KEYS}


class NonFiniteError(RuntimeError):
  """Too many training steps in a row had a non-finite loss, gradients or update."""


_DIVERGENCE_FIX = ("Lower PEAK_LR or train.grad_clip_norm, add train.z_loss_weight, or check the "
                   "data of steps {first}-{last}.")
# The fix each cause of a skipped step calls for, in the NonFiniteError message.
_NONFINITE_FIXES = {
    "loss": _DIVERGENCE_FIX,
    "gradients": _DIVERGENCE_FIX,
    "update": "The optimizer turned finite gradients into NaN or inf in the leaves named: check its "
              "settings (for MuonClip, its Newton-Schulz dtype and coefficients, muonclip.ns_dtype "
              "and muonclip.ns_coeffs) or lower PEAK_LR.",
}


def _name_some(names: Sequence[str], at_most: int = 10) -> str:
  """`names` joined by commas, the first `at_most` of them, then "and N more"."""
  shown = ", ".join(names[:at_most])
  return shown if len(names) <= at_most else f"{shown} and {len(names) - at_most} more"


class _NonFiniteGuard:
  """Counts skipped (non-finite) steps, says why each was skipped, and stops the run after `limit`
  in a row.

  It reads each step's `finite` flag one step late, so the host never waits for the step it just
  launched; `flush` reads the pending one (log and checkpoint steps wait for the device anyway).
  `leaf_names` names the step's `nonfinite_leaves` flags (`StepPlan.checked_leaf_names`).
  """

  def __init__(self, limit: int, skipped_before: int, leaf_names: Sequence[str]):
    self.limit, self.total, self.in_a_row = limit, skipped_before, 0
    self.leaf_names = tuple(leaf_names)
    self._pending = None
    self._streak_reasons: set[str] = set()

  def push(self, step: int, step_metrics: dict) -> None:
    """Checks the previous step, then holds this one's flags (device arrays, not yet read)."""
    self.flush()
    self._pending = (step, {key: step_metrics[key] for key in
                            ("finite", "nonfinite_reason", "nonfinite_leaves")})

  def flush(self) -> None:
    if self._pending is None:
      return
    (step, flags), self._pending = self._pending, None
    if bool(flags["finite"]):
      self.in_a_row = 0
      self._streak_reasons.clear()
      return
    reason = NONFINITE_REASONS[int(flags["nonfinite_reason"])]
    cause = self._describe(reason, np.asarray(jax.device_get(flags["nonfinite_leaves"])))
    self.total += 1
    self.in_a_row += 1
    self._streak_reasons.add(reason)
    logging.warning("Step %d skipped: %s (%d in a row, %d in all); parameters and optimizer state "
                    "left as they were.", step, cause, self.in_a_row, self.total)
    if self.in_a_row >= self.limit:
      raise NonFiniteError(self._message(step, cause))

  def _describe(self, reason: str, nonfinite_leaves: np.ndarray) -> str:
    """The cause of a skipped step, naming the leaves a non-finite update would have spoilt."""
    if reason != "update":  # a NaN loss or gradient spoils every leaf: the names say nothing
      return f"non-finite {reason}"
    names = [name for name, bad in zip(self.leaf_names, nonfinite_leaves) if bad]
    return f"non-finite update in {_name_some(names)}"

  def _message(self, step: int, cause: str) -> str:
    first = step - self.in_a_row + 1
    fixes = dict.fromkeys(_NONFINITE_FIXES[reason].format(first=first, last=step)
                          for reason in NONFINITE_REASONS if reason in self._streak_reasons)
    return (f"Stopped at step {step}: {self.in_a_row} steps in a row had a non-finite loss, "
            f"gradients or update (train.max_nonfinite_steps={self.limit}); step {step}: {cause}. "
            f"Nothing non-finite was applied or saved; the run resumes from its last checkpoint. "
            + " ".join(fixes))


class _Reporter:
  """Turns step metrics into the log line, TensorBoard scalars, the returned history and the summary
  printed at the end."""

  def __init__(self, cfg, seq_len, batch_size, num_steps, peak_tflops_per_device, writer):
    self.flops_per_step = metrics.train_flops_per_token(cfg, seq_len) * batch_size * seq_len
    peak = (peak_tflops_per_device * 1e12 if peak_tflops_per_device
            else metrics.peak_flops_per_device(jax.devices()[0].device_kind))
    self.peak_total = peak * jax.device_count() if peak else None
    self.tokens_per_step = batch_size * seq_len
    self.num_steps, self.writer, self.history = num_steps, writer, []
    self._started = time.perf_counter()
    self._last_time, self._last_step, self._step_times = self._started, None, []

  def after_step(self, step: int, step_metrics, *, log: bool, skipped_steps: int = 0,
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
        "train/skipped_steps": skipped_steps,
    }
    for layer, value in enumerate(np.asarray(values["max_logit_per_layer"])):
      record[f"attention/max_logit_layer_{layer:02d}"] = float(value)
    line = (f"step {step:6d} | loss {record['train/loss']:.4f} | grad_norm "
            f"{record['train/grad_norm']:.3f} | lr {record['train/learning_rate']:.2e} | "
            f"max_logit {record['train/max_attention_logit']:.2f}")
    if skipped_steps:
      line += f" | skipped {skipped_steps} non-finite"
    if step_time is None:
      line += " | timing from the next log step (this interval includes compilation)"
    else:
      record["throughput/step_time_s"] = step_time
      record["throughput/tokens_per_s"] = self.tokens_per_step / step_time
      line += (f" | tokens/s {record['throughput/tokens_per_s']:,.0f} | step {step_time * 1e3:.1f} ms")
      if self.peak_total:
        record["throughput/mfu"] = self.flops_per_step / step_time / self.peak_total
        line += f" | mfu {100 * record['throughput/mfu']:.1f}% (flops={metrics.FLOP_CONVENTION})"
      elif len(self._step_times) == 1:  # said once, on the first timed line: no known peak
        line += " | mfu n/a (no known peak for this device; set train.peak_tflops_per_device)"
      line += f" | eta {metrics.format_duration((self.num_steps - step) * step_time)}"
    if data_metrics:  # mixture/target/<task>, mixture/realised/<task>; the console shows the realised
      record.update(data_metrics)
      line += " | mixture " + " ".join(f"{key.rsplit('/', 1)[1]} {value:.2f}" for key, value in
                                       data_metrics.items() if key.startswith("mixture/realised/"))
    self.history.append({"step": step, **record})
    if self.writer:
      self.writer.write(step, record, console=line)

  def summary(self, start_step: int, end_step: int, checkpoint_dir: str, skipped_steps: int) -> str:
    """One line for the end of a run that trained steps `start_step` + 1 .. `end_step`: steps,
    tokens, time, last and best logged loss, where the checkpoints are."""
    steps, last = end_step - start_step, self.history[-1]
    best = min(self.history, key=lambda record: record["train/loss"])
    return (f"trained steps {start_step + 1}-{end_step} ({steps} steps, "
            f"{steps * self.tokens_per_step:,} tokens) in "
            f"{metrics.format_duration(time.perf_counter() - self._started)}; loss "
            f"{last['train/loss']:.4f} at the last logged step ({last['step']}), best logged "
            f"{best['train/loss']:.4f} (step {best['step']}); {skipped_steps} non-finite steps "
            f"skipped; checkpoints in {checkpoint_dir}")
