"""Learning-rate schedules: values at chosen steps (as the former hand-written schedules gave them),
and the rate the train step logs: the one its optimizer used."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from motif_jax import sharding, step_plan
from motif_jax.optim import schedules

PEAK = 3e-3

# Written down from the former hand-written implementation (peak_lr=3e-3), divided by the peak.
# WSD: (total_steps, warmup_steps, decay_fraction, final_lr_fraction, decay_shape, {step: lr/peak})
WSD = [
    (1, 0, 0.2, 0.0, "cosine", {0: 1, 1: 0, 2: 0}),
    (7, 5, 1.0, 0.1, "sqrt", {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8, 4: 1, 5: 1, 6: 0.1, 7: 0.1, 8: 0.1}),
    (100, 0, 0.05, 0.0, "linear", {
        0: 1, 4: 1, 9: 1, 10: 1, 50: 1, 79: 1, 80: 1, 81: 1, 90: 1, 95: 1, 98: 0.25, 99: 0, 102: 0
    }),
    (100, 1, 1.0, 0.0, "cosine", {
        0: 1, 4: 0.9976896, 9: 0.9836475, 10: 0.979334, 50: 0.5, 79: 0.09929317, 80: 0.08991388,
        81: 0.08095589, 90: 0.02066606, 95: 0.004104972, 98: 0.000256896, 99: 0, 102: 0
    }),
    (100, 10, 0.2, 0.0, "linear", {
        0: 0.1, 4: 0.5, 9: 1, 10: 1, 50: 1, 79: 1, 80: 1, 81: 0.9473685, 90: 0.4736842,
        95: 0.2105263, 98: 0.05263156, 99: 0, 102: 0
    }),
    (100, 10, 0.2, 0.1, "cosine", {
        0: 0.1, 4: 0.5, 9: 1, 10: 1, 50: 1, 79: 1, 80: 1, 81: 0.9938626, 90: 0.5128393,
        95: 0.1948867, 98: 0.1061374, 99: 0.1, 102: 0.1
    }),
    (100, 10, 0.2, 0.1, "sqrt", {
        0: 0.1, 4: 0.5, 9: 1, 10: 1, 50: 1, 79: 1, 80: 1, 81: 0.7935259, 90: 0.3470714,
        95: 0.200329, 98: 0.1240043, 99: 0.1, 102: 0.1
    }),
]

# COSINE: (total_steps, warmup_steps, final_lr_fraction, {step: lr / peak})
COSINE = [
    (2, 1, 0.0, {0: 1, 1: 1, 2: 0, 3: 0}),
    (7, 5, 0.1, {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8, 4: 1, 5: 1, 6: 0.1, 7: 0.1, 8: 0.1}),
    (100, 0, 0.0, {
        0: 1, 4: 0.9959774, 9: 0.9797465, 10: 0.9750355, 50: 0.492067, 79: 0.09736488,
        80: 0.08816171, 81: 0.07937321, 90: 0.02025348, 95: 0.004022598, 98: 0.0002517402, 99: 0,
        102: 0
    }),
    (100, 10, 0.1, {
        0: 0.1, 4: 0.5, 9: 1, 10: 1, 50: 0.6211798, 79: 0.2075596, 80: 0.1974695, 81: 0.1878187,
        90: 0.1225181, 95: 0.1044782, 98: 0.1002803, 99: 0.1, 102: 0.1
    }),
]


def _assert_values(schedule, expected):
  steps = np.array(sorted(expected))
  want = np.array([expected[s] for s in steps])
  jitted = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))
  eager = np.array([float(schedule(int(s))) for s in steps])
  assert jitted.dtype == np.float32
  np.testing.assert_allclose(jitted / PEAK, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(eager / PEAK, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("total, warmup, fraction, final, shape, expected", WSD)
def test_warmup_stable_decay_values(total, warmup, fraction, final, shape, expected):
  schedule = schedules.warmup_stable_decay(PEAK, total, warmup, fraction, final, shape)
  _assert_values(schedule, expected)


@pytest.mark.parametrize("total, warmup, final, expected", COSINE)
def test_warmup_cosine_values(total, warmup, final, expected):
  _assert_values(schedules.warmup_cosine(PEAK, total, warmup, final), expected)


@pytest.mark.parametrize("call, message", [
    (lambda: schedules.warmup_cosine(0.0, 100), "peak_lr=0.0 must be positive"),
    (lambda: schedules.warmup_cosine(1.0, 100, warmup_steps=100), r"warmup_steps=100 must lie in"),
    (lambda: schedules.warmup_stable_decay(1.0, 100, warmup_steps=-1), r"warmup_steps=-1 must lie"),
    (lambda: schedules.warmup_stable_decay(1.0, 100, decay_fraction=0.0), "decay_fraction=0.0"),
    (lambda: schedules.warmup_stable_decay(1.0, 100, decay_shape="step"), "decay_shape='step'"),
])
def test_invalid_settings_name_the_setting(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_logged_learning_rate_is_the_one_the_optimizer_used():
  """plan_step's optimizer runs the schedule on its own count of applied updates: a skipped step
  (NaN loss) logs the rate it tried and leaves it for the next step, while `state.step` advances."""
  schedule = lambda total_steps: lambda step: 1e-3 * (step + 1.0)
  plan = step_plan.plan_step(
      model="tiny", model_overrides=None, num_steps=10, batch_size=8, micro_batches=1,
      mesh_shape=(1, -1, 1), rules=sharding.DEFAULT_RULES,
      optimizer=lambda lr, **layout: optax.with_extra_args_support(optax.sgd(lr)),
      schedule=schedule, grad_clip_norm=None, z_loss_weight=0.0)
  tokens = jax.random.randint(jax.random.key(0), (8, 33), 1, 259)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_weights=jnp.ones((8, 32)),
               segment_ids=jnp.ones((8, 32), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(32), (8, 32)))
  nan_batch = dict(batch, loss_weights=jnp.full((8, 32), jnp.nan))
  state, logged = plan.initial_state(0), []
  with jax.set_mesh(plan.mesh):
    for b in (batch, nan_batch, batch, batch):
      state, metrics = plan.step_fn(state, {k: jax.device_put(v, plan.batch_sharding)
                                            for k, v in b.items()})
      logged.append((bool(metrics["finite"]), float(metrics["learning_rate"])))
  assert [finite for finite, _ in logged] == [True, False, True, True]
  np.testing.assert_allclose([lr for _, lr in logged], [1e-3, 2e-3, 2e-3, 3e-3], rtol=1e-6)
  assert int(state.step) == 4 and state._fields == ("step", "params", "opt_state")
