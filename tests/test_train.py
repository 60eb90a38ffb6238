"""The training loop: accumulation, schedules, exact resume after a kill, SIGTERM, checkpoints."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from motif_jax import checkpoint, configs, sharding
from motif_jax.model import init_params, param_logical_axes
from motif_jax.optim import schedules
from motif_jax.train_step import TrainState, cast_block_matrices, cross_entropy, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["MODEL='tiny'", "BATCH_SIZE=8", "SEQ_LEN=64", "PEAK_LR=3e-3", "WARMUP_STEPS=2",
            "train.log_every=1", "train.checkpoint_every=5"]


def _batch(rows, seq, seed):
  tokens = jax.random.randint(jax.random.key(seed), (rows, seq + 1), 1, 259)
  weights = (jax.random.uniform(jax.random.key(seed + 1), (rows, seq)) > 0.2).astype(jnp.float32)
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_weights=weights,
              segment_ids=jnp.ones((rows, seq), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(seq), (rows, seq)))


def _sgd_keeping_grads() -> optax.GradientTransformationExtraArgs:
  """SGD with rate 1 whose state is the gradients it was last given: the step's accumulated mean."""
  keep = optax.GradientTransformation(
      init=lambda params: jax.tree.map(jnp.zeros_like, params),
      update=lambda grads, state, params=None: (jax.tree.map(jnp.negative, grads), grads))
  return optax.with_extra_args_support(keep)


def _gradient_mismatch(got, want) -> float:
  """The largest |got - want| over all gradient leaves, in units of the tolerance (> 1 fails).

  The tolerance is 4e-6 of each value plus 4e-6 of the largest gradient in the model. float32's eps
  is 1.2e-7, and one large batch and 4 micro-batches sum the 256 tokens' terms in a different order,
  which moves a gradient by a few eps of the terms summed. Those terms are bounded by the model's
  largest gradients, not by each element's own value: an element can be a small difference of large
  terms (the attention lambdas' gradients here are 1e-3 of the largest and move by 1e-5 of their own
  size). Measured on CPU: at most 3e-7 of the largest gradient. A missing micro-batch or a wrong
  denominator moves gradients by tens of percent, about 1e5 tolerances.
  """
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    worst = max(worst, float(np.max(np.abs(a - b) / (4e-6 * np.abs(b) + 4e-6 * largest))))
  return worst


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gradient_accumulation_equals_one_large_batch(scan_layers):
  """The gradients the optimizer gets from 4 micro-batches equal those of one batch of 8 rows.

  With unrolled layers, the micro-batch loop also keeps the gradients per layer (its own path).
  """
  cfg = configs.get_model_config("tiny", scan_layers=scan_layers)
  graphdef, params = init_params(cfg, 0)
  # Compares the gradients themselves (kept in the optimizer state), not new minus old parameters:
  # at a weight of size ~0.1, float32 rounding of the update alone is 1.5e-8, as large as a
  # gradient's whole difference between the two orders of summation.
  tx = _sgd_keeping_grads()
  lr = lambda step: 1.0
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  batch = _batch(8, 32, 3)
  steps = {k: jax.jit(make_train_step(cfg, graphdef, tx, lr, micro_batches=k)) for k in (1, 4)}
  (state_1, metrics_1), (state_4, metrics_4) = (steps[k](state, batch) for k in (1, 4))
  np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-5)
  np.testing.assert_array_equal(metrics_4["max_logit_per_layer"], metrics_1["max_logit_per_layer"])
  assert _gradient_mismatch(state_4.opt_state, state_1.opt_state) <= 1
  jax.tree.map(lambda new, p, g: np.testing.assert_array_equal(new, p - g), state_4.params, params,
               state_4.opt_state)  # the update applied is those gradients

  # The tolerance still catches a lost micro-batch: the last 2 rows weighted 0 (out of the loss and
  # its denominator alike) give the gradients of the first 3 micro-batches alone.
  dropped = dict(batch, loss_weights=batch["loss_weights"].at[6:].set(0.0))
  assert _gradient_mismatch(steps[1](state, dropped)[0].opt_state, state_1.opt_state) > 1e3
  halved = jax.tree.map(lambda g: g / 2, state_1.opt_state)  # a denominator off by 2
  assert _gradient_mismatch(halved, state_1.opt_state) > 1e3


def test_unrolled_accumulation_on_a_mesh_equals_the_scanned_step_on_one_device(devices):
  """scan_layers=False, 2 micro-batches, params laid out over a (2, 2, 2) mesh: the same update."""
  # SGD with a rate large enough that the updates are not lost to rounding in `new - old`.
  tx = optax.with_extra_args_support(optax.sgd(1e3))
  lr = lambda step: 1e3
  batch = _batch(8, 32, 5)

  def update(scan_layers, mesh):
    cfg = configs.get_model_config("tiny", scan_layers=scan_layers, compute_dtype="float32")
    shardings = rules = None
    if mesh is not None:
      rules = sharding.DEFAULT_RULES
      shardings = sharding.tree_shardings(param_logical_axes(cfg), mesh, rules)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      graphdef, params = init_params(cfg, 0, shardings, rules)
      state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
      step = jax.jit(make_train_step(cfg, graphdef, tx, lr, micro_batches=2))
      new_state, metrics = step(state, batch)
      if mesh is not None:
        assert new_state.params["blocks"]["mlp"]["w_up"].sharding.is_equivalent_to(
            shardings["blocks"]["mlp"]["w_up"], 3)
    return jax.device_get((params, new_state.params, metrics["loss"]))

  params, scanned, loss_scanned = update(True, None)
  _, unrolled, loss_unrolled = update(False, sharding.make_mesh((2, 2, 2), devices))
  np.testing.assert_allclose(loss_unrolled, loss_scanned, rtol=1e-5)
  jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - p, b - p, rtol=1e-4,
                                                          atol=1e-5 * np.abs(b - p).max()),
               unrolled, scanned, params)


def test_schedules_warm_up_hold_and_decay():
  wsd = schedules.warmup_stable_decay(1.0, total_steps=100, warmup_steps=10, decay_fraction=0.2)
  assert float(wsd(0)) == pytest.approx(0.1)
  assert float(wsd(9)) == pytest.approx(1.0)
  assert float(wsd(50)) == pytest.approx(1.0)
  assert float(wsd(79)) == pytest.approx(1.0)
  assert float(wsd(99)) == pytest.approx(0.0, abs=1e-6)
  assert 0.0 < float(wsd(90)) < 1.0
  cosine = schedules.warmup_cosine(1.0, total_steps=100, warmup_steps=10, final_lr_fraction=0.1)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(99)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="warmup_steps=100"):
    schedules.warmup_cosine(1.0, total_steps=100, warmup_steps=100)


def _run(workdir, *bindings, wait=True):
  command = [sys.executable, "-m", "motif_jax.train", "--gin_file=gin_configs/base.gin",
             f"--workdir={workdir}"] + [f"--gin_param={b}" for b in TINY_RUN + list(bindings)]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  if wait:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output
  return process


def _losses(workdir):
  with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
    return [(record["step"], record["train/loss"]) for record in map(json.loads, f)]


@pytest.mark.slow
def test_kill_and_resume_reproduce_an_uninterrupted_run_bit_for_bit(tmp_path):
  straight, broken = tmp_path / "straight", tmp_path / "broken"
  code, output = _run(straight, "NUM_STEPS=20")
  assert code == 0, output
  code, output = _run(broken, "NUM_STEPS=20", "train.crash_after_step=12")
  assert code == -signal.SIGKILL, output
  assert max(step for step, _ in _losses(broken)) == 12
  code, output = _run(broken, "NUM_STEPS=20")
  assert code == 0, output
  assert "resumed from step 10 of " in output, output
  expected = dict(_losses(straight))
  assert sorted(expected) == list(range(1, 21))
  resumed = _losses(broken)
  assert {step for step, _ in resumed} == set(range(1, 21))
  for step, loss in resumed:  # steps 11-12 ran twice (before the kill and after resuming from 10)
    assert loss == expected[step], (step, loss, expected[step])
  assert expected[20] < 0.75 * expected[1]
  code, output = _run(broken, "NUM_STEPS=20")  # already done: says so, trains nothing, loses nothing
  assert code == 0 and "nothing to train: the checkpoint is at step 20" in output, output
  assert _losses(broken) == resumed


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
  process = _run(tmp_path, "NUM_STEPS=100000", "train.checkpoint_every=1000", wait=False)
  metrics_file = tmp_path / "logs" / "metrics.jsonl"
  deadline = time.time() + 540
  while time.time() < deadline and not (metrics_file.exists() and len(_losses(tmp_path)) >= 3):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  last_logged = max(step for step, _ in _losses(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  saved = ckpt.latest_complete_step()
  assert saved is not None and saved >= last_logged
  ckpt.close()


def test_a_workdir_that_is_a_file_stops_the_command_with_one_line(tmp_path):
  """Before jax starts: one line naming --workdir and the fix, exit code 2, not a FileExistsError
  traceback; so do a --gin_file that does not exist and a setting that cannot work (whose traceback
  goes to WORKDIR/error.log)."""
  a_file, in_the_way = tmp_path / "notes.txt", tmp_path / "run"
  a_file.write_text("not a directory")
  in_the_way.mkdir()
  (in_the_way / "checkpoints").write_text("not a directory either")
  cases = [(a_file, f"--workdir={a_file} is a file, not a directory; pass a directory path"),
           (a_file / "run", f"--workdir={a_file / 'run'} cannot be created: {a_file} is a file"),
           (in_the_way, f"--workdir={in_the_way} holds a file named 'checkpoints' where the run "
                        "keeps its checkpoints directory; move that file away")]
  smoke = "--gin_file=gin_configs/experiments/smoke.gin"
  cases = [([smoke, f"--workdir={w}"], m) for w, m in cases] + [
      (["--gin_file=gin_configs/experiments/no_such.gin", f"--workdir={tmp_path / 'a'}"],
       "--gin_file=gin_configs/experiments/no_such.gin does not exist; experiments: "),
      ([smoke, "--gin_param=train.mesh_shape=(3, -1, 1)", f"--workdir={tmp_path / 'b'}"],
       "ValueError: mesh_shape=(3, -1, 1): the fixed axes (3 devices) do not divide")]
  for args, message in cases:
    command = [sys.executable, "-m", "motif_jax.train"] + args
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"motif_jax.train: {message}"), result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
  assert a_file.read_text() == "not a directory" and not (in_the_way / "logs").exists()
  assert "Traceback" in (tmp_path / "b" / "error.log").read_text()


def test_interrupted_checkpoints_are_never_taken_as_latest(tmp_path):
  cfg = configs.get_model_config("tiny")
  _, params = init_params(cfg, 0)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  ckpt.save(5, params, {"step": 5, "data_position": 5})
  ckpt.wait()
  # A save cut short before orbax renamed its temporary directory, and a step directory whose
  # writing stopped half-way (no metadata, as on a file system without atomic renames).
  (tmp_path / "10.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  (tmp_path / "15" / "state").mkdir(parents=True)
  assert ckpt.latest_complete_step() == 5
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  restored, meta = ckpt.restore(5, abstract)
  assert meta["data_position"] == 5
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  ckpt.close()


def test_casting_block_matrices_once_gives_the_same_gradients():
  """The train step differentiates at block matrices cast once per step: same values, bit for bit."""
  from flax import nnx

  cfg = configs.get_model_config("tiny", num_layers=2, param_dtype="float32", compute_dtype="bfloat16")
  graphdef, params = init_params(cfg, 0)
  batch = _batch(2, 32, seed=4)

  def loss(p):
    logits = nnx.merge(graphdef, p)(batch["inputs"])
    return cross_entropy(logits, batch["targets"], batch["loss_weights"])[0]

  def grads_at_cast(p):
    grads = jax.grad(loss)(cast_block_matrices(p, jnp.bfloat16))
    return jax.tree.map(lambda g, q: g.astype(q.dtype), grads, p)

  cast = cast_block_matrices(params, jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(cast["blocks"]) if x.ndim >= 3} == {jnp.dtype(jnp.bfloat16)}
  assert cast["embedding"].dtype == jnp.float32
  want, got = jax.jit(jax.grad(loss))(params), jax.jit(grads_at_cast)(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), want, got)
