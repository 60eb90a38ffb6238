"""Launchers: what --dry-run prints for a v5p slice, xpk and GPU hosts; clear failures; valid flags."""

import os
import shlex
import subprocess
import sys

import pytest

from launch import common, gpu, tpu_vm, xpk

EXPERIMENT = ["--gin_file=gin_configs/experiments/motif_2_12_7b.gin",
              "--gin_param=train.checkpoint_every=500", "--workdir=gs://bucket/motif-12b"]


def _printed_commands(capsys):
  """Commands a launcher printed ('+ ...' lines), split into words."""
  return [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines()
          if line.startswith("+ ")]


def _remote(command):
  """What a `gcloud ... ssh --command=...` runs on the workers."""
  (remote,) = [w.removeprefix("--command=") for w in command if w.startswith("--command=")]
  return remote


def test_tpu_vm_dry_run_for_a_v5p_slice(capsys):
  tpu_vm.main(["--name=motif-v5p", "--zone=us-east5-a", "--project=proj", "--topology=v5p-64",
               "--queued", "--spot", "--env=LIBTPU_INIT_ARGS=--xla_tpu_spmd_rng_bit_generator",
               "--dry-run", *EXPERIMENT])
  output = capsys.readouterr().out
  assert "v5p-64: 32 chips on 8 worker(s), image v2-alpha-tpuv5" in output
  commands = [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]
  create, describe, archive, copy, setup, train = commands
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "motif-v5p"]
  for word in ("--node-id=motif-v5p", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
               "--spot", "--zone=us-east5-a", "--project=proj"):
    assert word in create
  assert describe[3:5] == ["queued-resources", "describe"]
  assert archive[:2] == ["git", "archive"]
  for command in (copy, setup, train):  # the package and the run reach every worker
    assert "--worker=all" in command and "--zone=us-east5-a" in command
  assert "[tpu]" in _remote(setup) and "--python 3.12" in _remote(setup)
  remote = _remote(train)
  assert "LIBTPU_INIT_ARGS=--xla_tpu_spmd_rng_bit_generator" in remote
  assert "-m motif_jax.train --gin_file=gin_configs/experiments/motif_2_12_7b.gin" in remote
  assert "--gin_param=train.checkpoint_every=500 --workdir=gs://bucket/motif-12b" in remote
  assert "--process_id" not in remote  # jax finds each TPU worker's place by itself


def test_tpu_vm_refuses_a_local_workdir_and_an_unknown_type():
  with pytest.raises(SystemExit, match="8 workers .* use a gs:// bucket"):
    tpu_vm.main(["--name=n", "--zone=z", "--topology=v5p-64", "--dry-run",
                 "--gin_file=g.gin", "--workdir=/tmp/run"])
  with pytest.raises(SystemExit, match="'v5p-63' is not a TPU accelerator type|does not describe"):
    tpu_vm.main(["--name=n", "--zone=z", "--topology=v5p-63", "--dry-run",
                 "--gin_file=g.gin", "--workdir=gs://b/r"])


def test_tpu_slices():
  assert common.tpu_slice("v5p-8") == common.TpuSlice("v5p-8", 4, 1, "v2-alpha-tpuv5")
  assert common.tpu_slice("v5litepod-16").workers == 4
  assert common.tpu_slice("v6e-256") == common.TpuSlice("v6e-256", 256, 64, "v2-alpha-tpuv6e")
  assert common.tpu_slice("v4-32").chips == 16


def test_launchers_name_a_missing_tool_before_running_anything(monkeypatch):
  monkeypatch.setenv("PATH", "")
  with pytest.raises(SystemExit, match="`gcloud` is not on PATH; install the Google Cloud CLI"):
    tpu_vm.main(["--name=n", "--zone=z", "--topology=v5p-8", "--gin_file=g.gin",
                 "--workdir=gs://b/r"])
  with pytest.raises(SystemExit, match="`xpk` is not on PATH; install it with `pip install xpk`"):
    xpk.main(["--cluster=c", "--workload=w", "--topology=v5p-8", "--docker_image=i",
              "--gin_file=g.gin", "--workdir=gs://b/r"])
  with pytest.raises(SystemExit, match="`ssh` is not on PATH"):
    gpu.main(["--hosts=a,b", "--gin_file=g.gin", "--workdir=/shared/r"])


def test_a_missing_argument_is_named(capsys):
  with pytest.raises(SystemExit):
    gpu.main(["--gin_file=g.gin"])
  assert "the following arguments are required: --workdir" in capsys.readouterr().err


def test_xpk_dry_run(capsys):
  xpk.main(["--cluster=motif-cluster", "--workload=motif-12b", "--topology=v5p-128",
            "--num_slices=2", "--base_docker_image=python:3.12-slim", "--zone=us-east5-a",
            "--dry-run", *EXPERIMENT])
  (command,) = _printed_commands(capsys)
  assert command[:3] == ["xpk", "workload", "create"]
  for word in ("--cluster=motif-cluster", "--workload=motif-12b", "--tpu-type=v5p-128",
               "--num-slices=2", "--base-docker-image=python:3.12-slim", "--zone=us-east5-a"):
    assert word in command
  (train,) = [w for w in command if w.startswith("--command=")]
  assert "pip install -q -e '.[tpu]' && python3 -m motif_jax.train" in train
  assert "--workdir=gs://bucket/motif-12b" in train


def test_gpu_dry_run_for_two_hosts(capsys):
  gpu.main(["--hosts=gpu-a,gpu-b", "--port=9999", "--repo_dir=/opt/motif-jax",
            "--python=/opt/venv/bin/python", "--env=NCCL_DEBUG=WARN", "--dry-run",
            "--gin_file=gin_configs/experiments/motif_2_6b.gin", "--workdir=/shared/motif-2.6b"])
  commands = _printed_commands(capsys)
  assert [c[:4] for c in commands] == [["ssh", "-o", "BatchMode=yes", "gpu-a"],
                                       ["ssh", "-o", "BatchMode=yes", "gpu-b"]]
  for process_id, command in enumerate(commands):
    remote = shlex.split(command[-1])
    assert remote[:3] == ["cd", "/opt/motif-jax", "&&"]
    for word in ("NCCL_NVLS_ENABLE=0", "NVSHMEM_DISABLE_NVLS=1", "NCCL_DEBUG=WARN",
                 "--gin_file=gin_configs/experiments/motif_2_6b.gin",
                 "--workdir=/shared/motif-2.6b", "--coordinator_address=gpu-a:9999",
                 "--num_processes=2", f"--process_id={process_id}", "--hosts=gpu-a,gpu-b"):
      assert word in remote, (word, remote)
    (xla_flags,) = [w for w in remote if w.startswith("XLA_FLAGS=")]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags
    assert remote[remote.index("/opt/venv/bin/python") + 1:][:2] == ["-m", "motif_jax.train"]


def test_gpu_dry_run_on_one_host(capsys):
  gpu.main(["--dry-run", "--gin_file=gin_configs/experiments/smoke.gin", "--workdir=/tmp/run"])
  (command,) = _printed_commands(capsys)
  assert command[0] == "env" and "NCCL_NVLS_ENABLE=0" in command
  assert "--coordinator_address" not in " ".join(command)  # one process: nothing to coordinate


def test_the_installed_xla_accepts_the_gpu_flags():
  """XLA stops at start-up on a flag it does not know; the launcher's flags must all parse."""
  env = dict(os.environ, XLA_FLAGS=gpu.GPU_ENV["XLA_FLAGS"], JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
