"""Faults a long run meets: bad checkpoints, non-finite steps, a restore onto another mesh.

(Preemption and a killed host are in test_multihost.py; a killed single process in test_train.py.)
"""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from motif_jax import checkpoint, sharding, step_plan, trainer
from motif_jax.configs import get_model_config
from motif_jax.model import init_params
from motif_jax.train_step import BATCH_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model="tiny", model_overrides=None, num_steps=10, batch_size=8, micro_batches=1,
            rules=sharding.DEFAULT_RULES, optimizer=trainer.muonclip,
            schedule=lambda total_steps: lambda step: 3e-3, grad_clip_norm=1.0, z_loss_weight=0.0)


def _tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_a_corrupted_truncated_or_non_finite_latest_checkpoint_is_skipped(tmp_path, caplog):
  _, params = init_params(get_model_config("tiny"), 0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=10)
  for step in (5, 10, 15, 20):
    shifted = jax.tree.map(lambda x, s=step: x + s, params)
    if step == 20:  # as a bug that let a NaN through would have saved it
      shifted["embedding"] = shifted["embedding"].at[0, 0].set(jnp.nan)
    ckpt.save(step, shifted, {"step": step, "data_position": step})
  ckpt.wait()
  for data_file in (tmp_path / "15" / "state" / "d").iterdir():  # a copy cut short
    with open(data_file, "r+b") as f:
      f.truncate(8)
  (tmp_path / "10" / "meta" / "metadata").write_text('{"step": 10, "data_posi')  # half-written JSON
  (tmp_path / "25" / "state").mkdir(parents=True)  # stopped half-way, on a non-atomic file system

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(abstract)
  ckpt.save(25, params, {"step": 25, "data_position": 25})  # no longer taken for an existing step
  ckpt.close()
  assert (step, meta["data_position"]) == (5, 5)
  _tree_equal(state, jax.tree.map(lambda x: x + 5, params))
  skipped = [r.getMessage() for r in caplog.records if "Skipping checkpoint" in r.getMessage()]
  assert len(skipped) == 4, skipped
  assert str(tmp_path / "25") in skipped[0] and "incomplete" in skipped[0]
  assert str(tmp_path / "20") in skipped[1] and "non-finite" in skipped[1]
  assert str(tmp_path / "15") in skipped[2] and "restoring it failed" in skipped[2]
  assert str(tmp_path / "10") in skipped[3] and "JSONDecodeError" in skipped[3]
  for bad, message in zip((25, 20, 15, 10), skipped):  # moved aside, whole, to where the warning says
    (aside,) = tmp_path.glob(f"{bad}.corrupt-*")
    assert f"moved it aside to {aside}" in message, message
    assert (aside / "state").is_dir() and (bad == 25 or (aside / "meta").is_dir())
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [5, 25]


def _run_training(workdir, cache, *bindings):
  """(exit code, output) of the training command on the tiny model, a checkpoint every 5 steps."""
  bindings = ["MODEL='tiny'", "BATCH_SIZE=8", "SEQ_LEN=64", "PEAK_LR=3e-3", "WARMUP_STEPS=2",
              "train.log_every=5", "train.checkpoint_every=5", *bindings]
  command = [sys.executable, "-m", "motif_jax.train", "--gin_file=gin_configs/base.gin",
             f"--workdir={workdir}"] + [f"--gin_param={b}" for b in bindings]
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache)),
                          capture_output=True, text=True, timeout=600)
  return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_a_run_resumed_past_a_truncated_checkpoint_moves_it_aside_and_trains_through_it(
    tmp_path, tmp_path_factory):
  """The whole loop: left in place, the bad step stopped every resumed run when it reached that step
  (orbax: the step already exists)."""
  cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"  # shared with other run tests
  cache.mkdir(exist_ok=True)
  workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
  code, output = _run_training(workdir, cache, "NUM_STEPS=10")
  assert code == 0, output[-3000:]
  cut = sorted((checkpoints / "10" / "state" / "d").iterdir())
  for data_file in cut:  # a copy cut short
    with open(data_file, "r+b") as f:
      f.truncate(8)

  code, output = _run_training(workdir, cache, "NUM_STEPS=15")
  assert code == 0, output[-3000:]
  assert "resumed from step 5 of " in output, output[-3000:]
  (aside,) = checkpoints.glob("10.corrupt-*")
  assert f"Skipping checkpoint {checkpoints / '10'}: restoring it failed" in output, output[-3000:]
  assert f"moved it aside to {aside}" in output
  assert [(aside / "state" / "d" / f.name).stat().st_size for f in cut] == [8] * len(cut)
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [5, 10, 15]
  assert json.loads((checkpoints / "10" / "meta" / "metadata").read_text())["step"] == 10
  with open(workdir / "logs" / "metrics.jsonl") as f:
    logged = [record["step"] for record in map(json.loads, f)]
  assert logged == [1, 5, 10, 10, 15], logged  # the first run's 1, 5, 10; the second's 10 and 15

  code, output = _run_training(workdir, cache, "NUM_STEPS=15")  # the same command again: done
  assert code == 0, output[-3000:]
  assert "nothing to train: the checkpoint is at step 15" in output, output[-3000:]
  assert "Skipping" not in output and list(checkpoints.glob("*.corrupt-*")) == [aside], output


def _one_step_state(plan):
  """The train state after one real step on a synthetic batch (so optimizer moments are not zero)."""
  with jax.set_mesh(plan.mesh):
    state = plan.initial_state(0)
    tokens = jax.random.randint(jax.random.key(1), (8, 65), 1, 259)
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_weights=jnp.ones((8, 64)),
                 segment_ids=jnp.ones((8, 64), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(64), (8, 64)))
    batch = {k: jax.device_put(batch[k], plan.batch_sharding) for k in BATCH_KEYS}
    state, metrics = plan.step_fn(state, batch)
  assert bool(metrics["finite"])
  return state


@pytest.mark.slow
def test_restore_onto_another_mesh_shape_and_fewer_devices_gives_the_same_state(tmp_path, devices):
  saved_plan = step_plan.plan_step(mesh_shape=(2, 4, 1), **TINY)
  state = _one_step_state(saved_plan)
  expected = jax.device_get(state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, state, {"step": 1, "data_position": 1})
  ckpt.close()

  for mesh_shape, on in (((4, 1, 2), devices), ((2, 2, 1), devices[:4])):
    plan = step_plan.plan_step(mesh_shape=mesh_shape, devices=on, **TINY)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    step, restored, _ = ckpt.restore_latest(plan.abstract_state())  # what a resuming run calls
    ckpt.close()
    assert step == 1
    _tree_equal(jax.device_get(restored), expected)
    jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail(f"{x.sharding} != {s}"),
                 restored, plan.shardings)
    assert {d for x in jax.tree.leaves(restored) for d in x.devices()} == set(on)


def _checkpointed_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tmp_path_factory):
  bindings = ["MODEL='tiny'", "BATCH_SIZE=8", "SEQ_LEN=64", "PEAK_LR=3e-3", "WARMUP_STEPS=2",
              "NUM_STEPS=12", "train.log_every=1", "train.checkpoint_every=1",
              "train.keep_checkpoints=20", "train.mesh_shape=(2, 4, 1)",
              "train.inject_nonfinite_steps=(3, 6, 7, 8)", "train.max_nonfinite_steps=3"]
  cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"  # shared with other run tests
  cache.mkdir(exist_ok=True)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache))
  result = subprocess.run(
      [sys.executable, "-m", "motif_jax.train", "--gin_file=gin_configs/base.gin",
       f"--workdir={tmp_path}"] + [f"--gin_param={b}" for b in bindings],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode != 0, output
  assert "NonFiniteError: Stopped at step 8: 3 steps in a row" in output, output[-3000:]
  assert "train.max_nonfinite_steps=3" in output

  with open(tmp_path / "logs" / "metrics.jsonl") as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert [records[s]["train/skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 1, 2, 3]
  assert np.isnan(records[3]["train/loss"]) and np.isfinite(records[4]["train/loss"])

  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints"))
  assert saved == list(range(1, 8))  # the run stopped before saving step 8
  states = {step: _checkpointed_state(tmp_path, step) for step in saved}
  for state in states.values():
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))
  for skipped, before in ((3, 2), (6, 5), (7, 5)):  # params and optimizer state unchanged
    _tree_equal(states[skipped]["params"], states[before]["params"])
    _tree_equal(states[skipped]["opt_state"], states[before]["opt_state"])
    assert int(states[skipped]["step"]) == skipped
  assert not np.array_equal(states[4]["params"]["embedding"], states[3]["params"]["embedding"])
