"""Train on a Cloud TPU VM slice: create it, install the package on every worker, start training.

    python -m launch.tpu_vm --name=motif-v5p --zone=us-east5-a --topology=v5p-64 \\
        --gin_file=gin_configs/experiments/motif_2_12_7b.gin --workdir=gs://BUCKET/motif-12b [--dry-run]

Steps (--steps, default all three, in this order):
  create   `gcloud compute tpus tpu-vm create`, or with --queued a queued resource (optionally
           --spot), waiting until it is ACTIVE;
  install  copy the committed tree (`git archive HEAD`) to every worker, make a Python 3.12
           virtual environment there (uv fetches the interpreter) and `pip install -e .[tpu]`;
  train    start `python -m motif_jax.train` on all workers at once (`--worker=all`), detached,
           logging to ~/motif-train.log on each worker. jax finds the slice's other workers by
           itself; a worker that does not join is named in process 0's log.
Run the same command again with --steps=train to restart a run: it resumes from --workdir.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

from launch import common

VENV = "$HOME/motif-venv"
LOG = "$HOME/motif-train.log"
ARCHIVE = "motif-jax.tar.gz"
GCLOUD_HELP = "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and log in"


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name.")
  parser.add_argument("--zone", required=True, help="e.g. us-east5-a (one that offers the type).")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
  parser.add_argument("--topology", required=True, help="Accelerator type, e.g. v5p-64, v6e-256.")
  parser.add_argument("--runtime_version", help="TPU VM image (default: the one for the type).")
  parser.add_argument("--queued", action="store_true", help="Create through a queued resource.")
  parser.add_argument("--spot", action="store_true", help="Spot capacity (preemptible).")
  parser.add_argument("--steps", default="create,install,train",
                      help="Comma-separated subset of create,install,train.")
  parser.add_argument("--env", action="append", default=[],
                      help="KEY=VALUE set for training on every worker (repeatable).")
  common.add_run_arguments(parser)
  args = parser.parse_args(argv)
  steps = args.steps.split(",")
  unknown = sorted(set(steps) - {"create", "install", "train"})
  if unknown:
    parser.error(f"--steps: unknown step(s) {', '.join(unknown)}; use create, install, train.")
  return args, steps


def gcloud_tpu(args, *words: str) -> list[str]:
  """A `gcloud compute tpus ...` command with the zone and project of `args`."""
  command = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
  return command + ([f"--project={args.project}"] if args.project else [])


def ssh_all(args, remote: str) -> list[str]:
  return gcloud_tpu(args, "tpu-vm", "ssh", args.name, "--worker=all", f"--command={remote}")


def create(args, tpu: common.TpuSlice, runner: common.Runner) -> None:
  runtime = args.runtime_version or tpu.runtime_version
  spot = ["--spot"] if args.spot else []
  if not args.queued:
    runner.run(gcloud_tpu(args, "tpu-vm", "create", args.name,
                          f"--accelerator-type={tpu.accelerator_type}", f"--version={runtime}",
                          *spot))
    return
  runner.run(gcloud_tpu(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                        f"--accelerator-type={tpu.accelerator_type}",
                        f"--runtime-version={runtime}", *spot))
  describe = gcloud_tpu(args, "queued-resources", "describe", args.name,
                        "--format=value(state.state)")
  print("+ " + shlex.join(describe) + "   # repeated every 60 s until ACTIVE", flush=True)
  while not runner.dry_run:
    state = subprocess.run(describe, capture_output=True, text=True, check=False).stdout.strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise common.LaunchError(f"queued resource {args.name} is {state}; see `gcloud compute tpus "
                               f"queued-resources describe {args.name} --zone={args.zone}`.")
    time.sleep(60)


def install(args, runner: common.Runner) -> None:
  local_archive = f"/tmp/{ARCHIVE}"
  runner.run(["git", "archive", "--format=tar.gz", f"--output={local_archive}", "HEAD"])
  runner.run(gcloud_tpu(args, "tpu-vm", "scp", local_archive, f"{args.name}:{ARCHIVE}",
                        "--worker=all"))
  package = f"$HOME/{common.PACKAGE_DIR}"
  runner.run(ssh_all(args, " && ".join([
      f"rm -rf {package} && mkdir -p {package} && tar -xzf $HOME/{ARCHIVE} -C {package}",
      "python3 -m pip install -q --user uv",
      f"python3 -m uv venv -q --python 3.12 {VENV}",
      f'VIRTUAL_ENV={VENV} python3 -m uv pip install -q -e "{package}[tpu]"'])))


def train(args, runner: common.Runner) -> None:
  command = (f"cd $HOME/{common.PACKAGE_DIR} && {common.env_prefix(common.parse_env(args.env))}"
             f"setsid nohup {VENV}/bin/python -m motif_jax.train "
             f"{shlex.join(common.train_args(args))} > {LOG} 2>&1 < /dev/null &")
  runner.run(ssh_all(args, command))
  follow = gcloud_tpu(args, "tpu-vm", "ssh", args.name, "--worker=0", f"--command=tail -f {LOG}")
  print(f"# training started on every worker; follow it with:\n#   {shlex.join(follow)}")


def main(argv) -> None:
  args, steps = parse_args(argv)
  tpu = common.tpu_slice(args.topology)
  common.require_bucket(args.workdir, tpu.workers)
  common.parse_env(args.env)
  runner = common.Runner(args.dry_run)
  runner.require("gcloud", GCLOUD_HELP)
  if "install" in steps:
    runner.require("git", "install git; the package is copied from the committed tree")
  print(f"# {tpu.accelerator_type}: {tpu.chips} chips on {tpu.workers} worker(s), image "
        f"{args.runtime_version or tpu.runtime_version}; one training process per worker")
  if "create" in steps:
    create(args, tpu, runner)
  if "install" in steps:
    install(args, runner)
  if "train" in steps:
    train(args, runner)


if __name__ == "__main__":
  main(sys.argv[1:])
