"""Learning-rate schedules: warmup-stable-decay (as Motif-2.6B used) and warmup-cosine.

Both are joins of optax schedules, as functions of the 0-based step: a linear warmup that reaches
`peak_lr` on step `warmup_steps - 1` (step s gives `peak_lr * (s + 1) / warmup_steps`), then a decay
that starts at `peak_lr` and ends at `final_lr_fraction * peak_lr` on step `total_steps - 1`.
"""

from __future__ import annotations

import gin
import jax.numpy as jnp
import optax


def _check(peak_lr, total_steps, warmup_steps):
  if peak_lr <= 0:
    raise ValueError(f"schedule peak_lr={peak_lr} must be positive.")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"schedule warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}).")


def _warmup_then_constant(peak_lr: float, warmup_steps: int) -> optax.Schedule:
  """peak_lr * (step + 1) / warmup_steps up to step warmup_steps - 1, then peak_lr."""
  if warmup_steps == 0:
    return optax.constant_schedule(peak_lr)
  return optax.warmup_constant_schedule(peak_lr / warmup_steps, peak_lr, warmup_steps - 1)


def _sqrt_decay(peak_lr: float, final_lr: float, decay_steps: int) -> optax.Schedule:
  """final + (peak - final) (1 - sqrt(progress)), progress = optax's linear ramp 0 -> 1 over
  `decay_steps` (optax has no 1 - sqrt shape; its polynomial read backwards loses the exact peak)."""
  progress = optax.linear_schedule(0.0, 1.0, decay_steps)
  return lambda step: final_lr + (peak_lr - final_lr) * (1.0 - jnp.sqrt(progress(step)))


# decay_shape -> (peak, final, steps) -> a schedule from peak at 0 to final at `steps` and after.
_DECAYS = {
    "linear": lambda peak, final, steps: optax.linear_schedule(peak, final, steps),
    "cosine": lambda peak, final, steps: optax.cosine_decay_schedule(peak, steps, alpha=final / peak),
    "sqrt": _sqrt_decay,
}


@gin.configurable
def warmup_stable_decay(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                        decay_fraction: float = 0.2, final_lr_fraction: float = 0.0,
                        decay_shape: str = "linear") -> optax.Schedule:
  """Linear warmup to `peak_lr`, constant, then a decay over the last `decay_fraction` of the steps.

  `decay_shape` is "linear", "cosine" or "sqrt" (1 - sqrt(progress)); the decay ends at
  `final_lr_fraction * peak_lr` on the last step. Returns step (int []) -> float32 [].
  """
  _check(peak_lr, total_steps, warmup_steps)
  if not 0.0 < decay_fraction <= 1.0:
    raise ValueError(f"warmup_stable_decay decay_fraction={decay_fraction} must lie in (0, 1].")
  if decay_shape not in _DECAYS:
    raise ValueError(f"warmup_stable_decay decay_shape={decay_shape!r}: choose one of {sorted(_DECAYS)}.")
  decay_steps = max(1, int(round(decay_fraction * total_steps)))
  decay_start = max(warmup_steps, total_steps - decay_steps)
  decay = _DECAYS[decay_shape](peak_lr, final_lr_fraction * peak_lr,
                               max(1, total_steps - 1 - decay_start))
  return optax.join_schedules([_warmup_then_constant(peak_lr, warmup_steps), decay], [decay_start])


@gin.configurable
def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  final_lr_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup to `peak_lr`, then cosine decay to `final_lr_fraction * peak_lr` at the last step.

  Returns step (int []) -> float32 [].
  """
  _check(peak_lr, total_steps, warmup_steps)
  cosine = optax.cosine_decay_schedule(peak_lr, max(1, total_steps - 1 - warmup_steps),
                                       alpha=final_lr_fraction)
  return optax.join_schedules([_warmup_then_constant(peak_lr, warmup_steps), cosine], [warmup_steps])
