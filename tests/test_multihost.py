"""Multi-host runs on one machine: 2 processes x 4 simulated CPU devices against 1 process x 8.

Every run trains the tiny config with the same global batch (`train.data_shards=2`, so one process
reads both shards that two processes read one each) on the same (2, 4, 1) mesh. Across processes the
CPU all-reduces go through gloo and add up in another order than inside one process, so losses agree
to float32 rounding (about 1e-5 relative), not bit for bit. Runs share a compilation cache.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from motif_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["MODEL='tiny'", "BATCH_SIZE=8", "SEQ_LEN=64", "PEAK_LR=3e-3", "WARMUP_STEPS=2",
       "NUM_STEPS=10", "train.log_every=1", "train.mesh_shape=(2, 4, 1)", "train.data_shards=2"]
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"  # shared with other run tests
  cache.mkdir(exist_ok=True)
  return str(cache)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, cache, *bindings, processes=1, flags=()):
  """Starts the training CLI as `processes` local processes sharing 8 CPU devices; returns them."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
  command = [sys.executable, "-m", "motif_jax.train", "--gin_file=gin_configs/base.gin",
             f"--workdir={workdir}"] + [f"--gin_param={b}" for b in RUN + list(bindings)]
  if processes > 1:
    command += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
  started = []
  for index in range(processes):
    process_flags = [f"--process_id={index}"] if processes > 1 else []
    started.append(subprocess.Popen(command + process_flags + list(flags), cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return started


def _finish(processes, timeout=600):
  """(return codes, outputs) once every process has ended; kills stragglers after `timeout`."""
  outputs = []
  for process in processes:
    try:
      outputs.append(process.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      process.kill()
      outputs.append(process.communicate()[0])
  return [p.returncode for p in processes], outputs


def _losses(workdir):
  """[(step, loss)] in the order logged (a resumed run appends to the same file)."""
  path = os.path.join(workdir, "logs", "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [(r["step"], r["train/loss"]) for r in map(json.loads, f.read().splitlines())]


def _wait_for_step(workdir, step, processes, timeout=540):
  """Waits until these processes have logged `step` (lines an earlier run logged do not count)."""
  earlier = len(_losses(workdir))
  deadline = time.time() + timeout
  while time.time() < deadline and max([s for s, _ in _losses(workdir)[earlier:]], default=0) < step:
    if any(p.poll() is not None for p in processes):
      for process in processes:
        process.kill()
      raise AssertionError(f"a process ended before step {step}: {_finish(processes)}")
    time.sleep(0.2)


def _assert_close_to(reference, logged):
  for step, loss in logged:
    assert loss == pytest.approx(reference[step], rel=LOSS_RTOL), (step, loss, reference[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
  """Losses of steps 1-10 of one process on 8 devices."""
  workdir = tmp_path_factory.mktemp("one_process")
  codes, outputs = _finish(_start(workdir, compile_cache))
  assert codes == [0], outputs
  losses = dict(_losses(workdir))
  assert sorted(losses) == list(range(1, 11))
  return losses


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, compile_cache, reference):
  codes, outputs = _finish(_start(tmp_path, compile_cache, processes=2))
  assert codes == [0, 0], outputs
  logged = _losses(tmp_path)
  assert [step for step, _ in logged] == list(range(1, 11))  # one writer: process 0
  _assert_close_to(reference, logged)
  assert "step     10 | loss" in outputs[0] and "parameter routing" in outputs[0]
  assert "step " not in outputs[1] and "parameter routing" not in outputs[1], outputs[1][-3000:]
  print("max relative loss difference, 2 processes vs 1:",
        max(abs(loss - reference[s]) / reference[s] for s, loss in logged))


@pytest.mark.slow
def test_a_killed_host_ends_the_run_and_a_preemption_notice_saves_on_every_host(tmp_path,
                                                                                compile_cache,
                                                                                reference):
  """Host 1 is SIGKILLed after step 7: host 0 ends by itself (heartbeat timeout) and the next start
  resumes from the last complete checkpoint, step 5. Then SIGTERM reaches host 1 only: both hosts
  save the same step, the last one they finished, and exit 0. Every loss logged matches one process."""
  flags = ["--distributed_heartbeat_s=10"]
  run = _start(tmp_path, compile_cache, "train.checkpoint_every=5", processes=2, flags=flags)
  _wait_for_step(tmp_path, 7, run)
  run[1].kill()
  killed = time.time()
  codes, outputs = _finish(run, timeout=120)
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, outputs
  assert time.time() - killed < 60, "host 0 should end within the heartbeat timeout"
  killed_at = max(step for step, _ in _losses(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]

  run = _start(tmp_path, compile_cache, "train.checkpoint_every=5", processes=2, flags=flags)
  _wait_for_step(tmp_path, 6, run)
  run[1].send_signal(signal.SIGTERM)
  codes, outputs = _finish(run)
  assert codes == [0, 0], outputs
  steps = [step for step, _ in _losses(tmp_path)]
  saved = steps[-1]
  assert steps == list(range(1, killed_at + 1)) + list(range(6, saved + 1))  # resumed after step 5
  assert saved < 10, "the notice came too late to be tested"
  assert f"Saved step {saved} after a preemption notice" in outputs[0]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5", str(saved)]
  with open(tmp_path / "checkpoints" / str(saved) / "meta" / "metadata") as f:
    assert json.load(f)["data_position"] == saved  # the next start continues at step saved + 1
  _assert_close_to(reference, _losses(tmp_path))


def _rendezvous_all(cluster, process_ids, timeout_s):
  """Runs `rendezvous` for each of `process_ids` in its own thread; returns {id: error or None}."""
  results = {}

  def join(process_id):
    try:
      distributed.rendezvous(dataclasses.replace(cluster, process_id=process_id),
                             timeout_s=timeout_s)
      results[process_id] = None
    except distributed.StartupError as error:
      results[process_id] = str(error)

  threads = [threading.Thread(target=join, args=(p,)) for p in process_ids]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=60)
  return results


def test_rendezvous_releases_every_process_once_all_have_joined():
  cluster = distributed.Cluster(f"localhost:{_free_port()}", 3, 0)
  assert _rendezvous_all(cluster, [2, 0, 1], timeout_s=30) == {0: None, 1: None, 2: None}


def test_rendezvous_names_the_hosts_that_did_not_join():
  cluster = distributed.Cluster(f"localhost:{_free_port()}", 4, 0,
                                host_names=("gpu-a", "gpu-b", "gpu-c", "gpu-d"))
  results = _rendezvous_all(cluster, [0, 1, 3], timeout_s=2)
  for process_id in (0, 1, 3):  # the coordinator and every process that did join
    assert "1 of 4 processes did not join" in results[process_id], results
    assert "process 2 (host gpu-c)" in results[process_id]
    assert "--distributed_timeout_s" in results[process_id]


def test_rendezvous_names_an_unreachable_coordinator():
  cluster = distributed.Cluster(f"localhost:{_free_port()}", 2, 1, host_names=("head", "worker"))
  message = _rendezvous_all(cluster, [1], timeout_s=1)[1]
  assert "could not reach the coordinator, process 0 (host head)" in message, message


def test_rendezvous_rejects_two_processes_with_the_same_id():
  cluster = distributed.Cluster(f"localhost:{_free_port()}", 3, 0)
  results = _rendezvous_all(cluster, [0, 1, 1], timeout_s=5)
  assert "Two processes claim --process_id=1" in results[0], results


def test_the_training_command_fails_naming_the_missing_host(tmp_path):
  port = _free_port()
  result = subprocess.run(
      [sys.executable, "-m", "motif_jax.train", "--gin_file=gin_configs/experiments/smoke.gin",
       f"--workdir={tmp_path}", f"--coordinator_address=localhost:{port}", "--num_processes=2",
       "--process_id=0", "--hosts=tpu-w0,tpu-w1", "--distributed_timeout_s=2"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "1 of 2 processes did not join" in result.stderr, result.stderr[-3000:]
  assert "process 1 (host tpu-w1)" in result.stderr


def test_explicit_multi_host_settings_must_come_together():
  with pytest.raises(ValueError, match="missing: --num_processes, --process_id"):
    distributed.initialize("localhost:1234")
  with pytest.raises(ValueError, match="must be host:port"):
    distributed.initialize("localhost", 2, 0)
