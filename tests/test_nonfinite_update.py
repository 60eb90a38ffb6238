"""An optimizer that turns finite gradients into NaN or inf: the step is skipped and the leaves named.

The optimizer here is MuonClip with `blocks/mlp/w_up` spoilt after the real update: its update (so
the new params) or its optimizer state (the Muon momentum) set to inf, on chosen calls of the step.
"""

import functools
import itertools
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import io_callback

from motif_jax import sharding, step_plan, trainer
from motif_jax.train_step import BATCH_KEYS, NONFINITE_REASONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPOILT = "blocks/mlp/w_up"


def _spoil(tree, hit: jax.Array):
  """`tree` with every leaf whose path ends in SPOILT set to inf where `hit`."""

  def spoil(path, leaf):
    if not jax.tree_util.keystr(path, simple=True, separator="/").endswith(SPOILT):
      return leaf
    return jnp.where(hit, jnp.inf, leaf).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(spoil, tree)


def _host_call_counter():
  """A function to call inside the step: int32 [], how many times the step has run, this run
  included (counted on the host)."""
  calls = itertools.count(1)
  return lambda: io_callback(lambda: np.int32(next(calls)), jax.ShapeDtypeStruct((), jnp.int32))


@gin.configurable
def spoilt_muonclip(learning_rate, *, spoil: str = "update", on_calls=None, **model_layout):
  """MuonClip whose `blocks/mlp/w_up` update (spoil="update") or optimizer state (spoil="state")
  turns inf: on every call of the step, or on the `on_calls`-th calls (counting from 1) only.

  The call count lives on the host, as a skipped step leaves the optimizer state (its own step
  count included) as it was.
  """
  if spoil not in ("update", "state"):
    raise ValueError(f"spoilt_muonclip.spoil={spoil!r} must be 'update' or 'state'.")
  inner = trainer.muonclip(learning_rate, **model_layout)
  call_number = _host_call_counter()

  def update(updates, state, params=None, **extra_args):
    updates, state = inner.update(updates, state, params, **extra_args)
    hit = jnp.bool_(True) if on_calls is None else jnp.isin(call_number(), jnp.asarray(on_calls))
    if spoil == "update":
      return _spoil(updates, hit), state
    return updates, _spoil(state, hit)

  return optax.GradientTransformationExtraArgs(inner.init, update)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _plan(spoil: str, on_calls):
  return step_plan.plan_step(
      model="tiny", model_overrides=None, num_steps=10, batch_size=8, micro_batches=1,
      mesh_shape=(1, -1, 1), rules=sharding.DEFAULT_RULES,
      optimizer=functools.partial(spoilt_muonclip, spoil=spoil, on_calls=on_calls),
      schedule=lambda total_steps: lambda step: 3e-3, grad_clip_norm=1.0, z_loss_weight=0.0)


def _batch(plan, seed: int) -> dict:
  tokens = jax.random.randint(jax.random.key(seed), (8, 65), 1, 259)
  weights = (jax.random.uniform(jax.random.key(seed + 1), (8, 64)) > 0.2).astype(jnp.float32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_weights=weights,
               segment_ids=jnp.ones((8, 64), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(64), (8, 64)))
  return {k: jax.device_put(batch[k], plan.batch_sharding) for k in BATCH_KEYS}


def _assert_trees_equal(actual, expected):
  """Bit for bit, leaf by leaf (NaN equal to NaN, so a spoilt copy would still fail on inf)."""
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert len(jax.tree.leaves(actual)) == len(paths)
  for (path, want), got in zip(paths, jax.tree.leaves(actual)):
    assert np.array_equal(np.asarray(got), want, equal_nan=True), jax.tree_util.keystr(path)


def _flagged(plan, step_metrics) -> list[str]:
  return [name for name, bad in zip(plan.checked_leaf_names(),
                                    np.asarray(step_metrics["nonfinite_leaves"])) if bad]


@pytest.mark.parametrize("spoil", ["update", "state"])
def test_a_non_finite_update_is_skipped_and_its_leaves_named(spoil, devices):
  """Step 1 applies, step 2 spoils w_up (its new params, or its Muon momentum) and changes nothing,
  step 3 applies again."""
  plan = _plan(spoil, on_calls=(2,))
  with jax.set_mesh(plan.mesh):
    state, first = plan.step_fn(plan.initial_state(0), _batch(plan, 1))
    assert bool(first["finite"]) and NONFINITE_REASONS[int(first["nonfinite_reason"])] == "none"
    assert not np.any(first["nonfinite_leaves"])
    before = jax.device_get(state)  # the state is donated to the next call
    state, second = plan.step_fn(state, _batch(plan, 3))
    after = jax.device_get(state)
    state, third = plan.step_fn(state, _batch(plan, 5))

  assert not bool(second["finite"])
  assert NONFINITE_REASONS[int(second["nonfinite_reason"])] == "update"
  assert np.isfinite(second["loss"]) and np.isfinite(second["grad_norm"])  # the update, not the grads
  _assert_trees_equal(after.params, before.params)
  _assert_trees_equal(after.opt_state, before.opt_state)
  assert int(after.step) == 2
  flagged = _flagged(plan, second)
  if spoil == "update":
    assert flagged == [f"params/{SPOILT}"]
  else:
    assert len(flagged) == 1 and flagged[0].startswith("opt_state/"), flagged
    assert flagged[0].endswith(f"/trace/{SPOILT}"), flagged

  assert bool(third["finite"])
  assert not np.array_equal(np.asarray(state.params["blocks"]["mlp"]["w_up"]),
                            after.params["blocks"]["mlp"]["w_up"])


def test_leaf_names_cover_every_float_leaf_of_params_and_optimizer_state():
  plan = _plan("update", on_calls=None)
  names = plan.checked_leaf_names()
  abstract = plan.abstract_state()
  floats = [x for x in jax.tree.leaves((abstract.params, abstract.opt_state))
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  assert len(names) == len(set(names)) == len(floats)
  assert names[0].startswith("params/") and names[-1].startswith("opt_state/")
  assert f"params/{SPOILT}" in names


def _train(workdir, *bindings):
  """`trainer.train` configured as an experiment is: base.gin, the tiny model, then `bindings`."""
  gin.parse_config_files_and_bindings(
      [os.path.join(REPO, "gin_configs", "base.gin")],
      ["MODEL='tiny'", "NUM_STEPS=4", "BATCH_SIZE=8", "SEQ_LEN=64", "PEAK_LR=3e-3",
       "WARMUP_STEPS=2", "train.log_every=1", "train.checkpoint_every=100",
       "train.optimizer=@spoilt_muonclip", *bindings])
  return trainer.train(str(workdir))


@pytest.mark.slow
def test_a_run_whose_updates_stay_non_finite_stops_naming_the_leaf(tmp_path, devices):
  with pytest.raises(trainer.NonFiniteError) as raised:
    _train(tmp_path, "train.max_nonfinite_steps=2")
  message = str(raised.value)
  assert "Stopped at step 2: 2 steps in a row" in message, message
  assert "train.max_nonfinite_steps=2" in message, message
  assert f"non-finite update in params/{SPOILT}." in message, message
  assert "muonclip.ns_dtype" in message, message
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_a_run_with_one_non_finite_update_skips_it_and_goes_on(tmp_path, devices, caplog):
  with caplog.at_level(logging.WARNING):
    history = _train(tmp_path, "train.max_nonfinite_steps=2", "spoilt_muonclip.on_calls=(2,)")
  assert [record["step"] for record in history] == [1, 2, 3, 4]
  assert [record["train/skipped_steps"] for record in history] == [0, 1, 1, 1]
  assert all(np.isfinite(record["train/loss"]) for record in history)
  skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(skipped) == 1, skipped
  assert skipped[0].startswith(f"Step 2 skipped: non-finite update in params/{SPOILT} (1 in a row"), \
      skipped
