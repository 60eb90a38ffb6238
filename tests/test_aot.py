"""Ahead-of-time compilation of the training step for a TPU slice (or its labelled CPU stand-in)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from motif_jax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_topologies():
  assert aot.parse_topology("v5p-64") == ("v5p:2x4x4", 32, 95)
  assert aot.parse_topology("v5litepod-16") == ("v5e:4x4", 16, 16)
  assert aot.parse_topology("v6e-256") == ("v6e:16x16", 256, 32)
  assert aot.parse_topology("v5p:4x4x8")[1] == 128
  with pytest.raises(ValueError, match="'v5p-63' is not a TPU slice"):
    aot.parse_topology("v5p-63")


@pytest.mark.slow
def test_aot_compiles_the_smoke_step_for_a_v5p_slice_or_says_why_not():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # aot sets the CPU device count
  result = subprocess.run(
      [sys.executable, "-m", "motif_jax.aot", "--gin_file=gin_configs/experiments/smoke.gin",
       "--topology=v5p-8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  if importlib.util.find_spec("libtpu") is not None:
    assert "for 4 TPU v5 devices" in output, output[-3000:]
    assert "HBM per chip" in output and "-> fits" in output
  else:
    assert "Cannot compile for TPU v5p:2x2x1 on this host" in output, output[-3000:]
    assert "TPU support not installed" in output and "pip install -e '.[tpu]'" in output
    assert "CPU STAND-IN: compiling the same step for 4 simulated CPU devices" in output
    assert "for 4 cpu devices, mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in output
  assert "peak estimate" in output
