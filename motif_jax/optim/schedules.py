"""Learning-rate schedules: warmup-stable-decay (as Motif-2.6B used) and warmup-cosine."""

from __future__ import annotations

import gin
import jax.numpy as jnp
import optax


def _check(peak_lr, total_steps, warmup_steps):
  if peak_lr <= 0:
    raise ValueError(f"schedule peak_lr={peak_lr} must be positive.")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"schedule warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}).")


@gin.configurable
def warmup_stable_decay(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                        decay_fraction: float = 0.2, final_lr_fraction: float = 0.0,
                        decay_shape: str = "linear") -> optax.Schedule:
  """Linear warmup to `peak_lr`, constant, then a decay over the last `decay_fraction` of the steps.

  `decay_shape` is "linear", "cosine" or "sqrt" (1 - sqrt(progress)); the decay ends at
  `final_lr_fraction * peak_lr` on the last step.
  """
  _check(peak_lr, total_steps, warmup_steps)
  if not 0.0 < decay_fraction <= 1.0:
    raise ValueError(f"warmup_stable_decay decay_fraction={decay_fraction} must lie in (0, 1].")
  shapes = {
      "linear": lambda p: 1.0 - p,
      "cosine": lambda p: 0.5 * (1.0 + jnp.cos(jnp.pi * p)),
      "sqrt": lambda p: 1.0 - jnp.sqrt(p),
  }
  if decay_shape not in shapes:
    raise ValueError(f"warmup_stable_decay decay_shape={decay_shape!r}: choose one of {sorted(shapes)}.")
  decay_steps = max(1, int(round(decay_fraction * total_steps)))
  decay_start = max(warmup_steps, total_steps - decay_steps)
  final = final_lr_fraction * peak_lr

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * jnp.minimum(1.0, (step + 1) / max(1, warmup_steps)) if warmup_steps else peak_lr
    progress = jnp.clip((step - decay_start) / max(1, total_steps - 1 - decay_start), 0.0, 1.0)
    decayed = final + (peak_lr - final) * shapes[decay_shape](progress)
    return jnp.where(step < decay_start, warm, decayed)

  return schedule


@gin.configurable
def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  final_lr_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup to `peak_lr`, then cosine decay to `final_lr_fraction * peak_lr` at the last step."""
  _check(peak_lr, total_steps, warmup_steps)
  final = final_lr_fraction * peak_lr

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * (step + 1) / max(1, warmup_steps)
    progress = jnp.clip((step - warmup_steps) / max(1, total_steps - 1 - warmup_steps), 0.0, 1.0)
    cosine = final + (peak_lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule
