"""What the launchers share: argument checks, the training command, and running or printing commands.

Every launcher prints each command before it runs it; with --dry-run it prints them and runs none.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from typing import NamedTuple, Sequence

PACKAGE_DIR = "motif-jax"  # where the launchers put the repository on every worker


class LaunchError(SystemExit):
  """A missing tool or a bad argument: the message says which and what to do."""

  def __init__(self, message: str):
    super().__init__(f"launch: {message}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
  """The arguments every launcher takes: what to train, where, and --dry-run."""
  parser.add_argument("--gin_file", action="append", required=True,
                      help="Gin file of the experiment (repeatable), relative to the repository.")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="Extra gin binding, e.g. train.num_steps=1000 (repeatable).")
  parser.add_argument("--workdir", required=True,
                      help="Checkpoints and logs: a gs:// bucket path (or a path every host shares).")
  parser.add_argument("--dry-run", action="store_true", help="Print every command; run none.")


def train_args(args: argparse.Namespace) -> list[str]:
  """`motif_jax.train` flags for the experiment in `args`."""
  return ([f"--gin_file={f}" for f in args.gin_file] + [f"--gin_param={p}" for p in args.gin_param]
          + [f"--workdir={args.workdir}"])


def require_bucket(workdir: str, hosts: int) -> None:
  """TPU workers share no disk: a run over several must keep its checkpoints in a bucket."""
  if hosts > 1 and not workdir.startswith("gs://"):
    raise LaunchError(f"--workdir={workdir} is a local path, but the slice has {hosts} workers "
                      "that must read and write the same checkpoints; use a gs:// bucket.")


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
  """KEY=VALUE strings from --env into a dict."""
  env = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise LaunchError(f"--env {pair!r} must be KEY=VALUE.")
    env[key] = value
  return env


def env_prefix(env: dict[str, str]) -> str:
  """`env K=V ...` for a shell command line (empty when there is nothing to set)."""
  return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " if env else ""


class Runner:
  """Prints each command, then runs it unless this is a dry run."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def require(self, tool: str, how_to_install: str) -> None:
    """Fails now, before any command runs, when `tool` is not on PATH (a dry run needs no tools)."""
    if not self.dry_run and shutil.which(tool) is None:
      raise LaunchError(f"`{tool}` is not on PATH; {how_to_install} (or pass --dry-run to print "
                        "the commands).")

  def run(self, command: Sequence[str]) -> None:
    print("+ " + shlex.join(command), flush=True)
    if self.dry_run:
      return
    result = subprocess.run(list(command), check=False)
    if result.returncode:
      raise LaunchError(f"`{shlex.join(command)}` failed with exit code {result.returncode}.")

  def start_all(self, commands: Sequence[Sequence[str]], names: Sequence[str]) -> None:
    """Runs the commands side by side (one per host) and waits; fails naming each host that failed."""
    for command in commands:
      print("+ " + shlex.join(command), flush=True)
    if self.dry_run:
      return
    processes = [subprocess.Popen(list(c)) for c in commands]
    failed = [f"{name} (exit code {p.wait()})" for name, p in zip(names, processes) if p.returncode]
    if failed:
      raise LaunchError(f"the run failed on {', '.join(failed)}; see the output above.")


class TpuSlice(NamedTuple):
  """A Cloud TPU accelerator type, e.g. v5p-64: its chips, worker VMs and runtime image."""

  accelerator_type: str
  chips: int
  workers: int
  runtime_version: str


# generation -> (cores per chip counted in the type's number, largest one-VM slice in chips,
# runtime image for JAX). Sources: the Cloud TPU docs' system architecture and runtime pages.
_TPU_GENERATIONS = {
    "v4": (2, 4, "tpu-ubuntu2204-base"),
    "v5p": (2, 4, "v2-alpha-tpuv5"),
    "v5litepod": (1, 8, "v2-alpha-tpuv5-lite"),
    "v6e": (1, 8, "v2-alpha-tpuv6e"),
}
_CHIPS_PER_WORKER = 4  # every multi-VM slice of these generations


def tpu_slice(topology: str) -> TpuSlice:
  """Parses --topology (an accelerator type such as v5p-64, v5litepod-16, v6e-256, v4-32)."""
  match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", topology)
  if not match:
    raise LaunchError(f"--topology={topology!r} is not a TPU accelerator type; use one of "
                      f"{', '.join(g + '-N' for g in _TPU_GENERATIONS)}, e.g. v5p-64.")
  generation, number = match.group(1), int(match.group(2))
  per_chip, one_vm_max, runtime = _TPU_GENERATIONS[generation]
  chips = number // per_chip
  if number % per_chip or chips < 1 or (chips > one_vm_max and chips % _CHIPS_PER_WORKER):
    raise LaunchError(f"--topology={topology}: {number} does not describe a whole {generation} "
                      "slice; check the accelerator types Cloud TPU offers.")
  workers = 1 if chips <= one_vm_max else chips // _CHIPS_PER_WORKER
  return TpuSlice(topology, chips, workers, runtime)
