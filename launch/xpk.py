"""Train on TPU slices of a GKE cluster through xpk (one workload; xpk starts a pod per worker).

    python -m launch.xpk --cluster=my-cluster --workload=motif-12b --topology=v5p-64 \\
        --base_docker_image=python:3.12-slim \\
        --gin_file=gin_configs/experiments/motif_2_12_7b.gin --workdir=gs://BUCKET/motif-12b [--dry-run]

With --docker_image the image must already hold the package (`pip install -e '.[tpu]'`); with
--base_docker_image xpk builds one from it and the repository, and the command installs the package
first. --num_slices > 1 runs on several slices (multislice): make the mesh's data axis a multiple of
the slice count so that only data parallelism crosses the slower links between slices. Submitting
the same workload again after it ends resumes from --workdir.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from launch import common


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m launch.xpk", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cluster", required=True, help="GKE cluster that xpk created.")
  parser.add_argument("--workload", required=True, help="Workload name (lower case, dashes).")
  parser.add_argument("--topology", required=True, help="TPU type of each slice, e.g. v5p-64.")
  parser.add_argument("--num_slices", type=int, default=1, help="Number of slices.")
  image = parser.add_mutually_exclusive_group(required=True)
  image.add_argument("--docker_image", help="Image that already has motif-jax installed.")
  image.add_argument("--base_docker_image", help="Image xpk builds on, adding this repository.")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
  parser.add_argument("--zone", help="Zone of the cluster (default: gcloud's).")
  parser.add_argument("--env", action="append", default=[],
                      help="KEY=VALUE set for training in every pod (repeatable).")
  common.add_run_arguments(parser)
  args = parser.parse_args(argv)
  if args.num_slices < 1:
    parser.error(f"--num_slices={args.num_slices} must be at least 1.")
  return args


def workload_command(args) -> list[str]:
  """The `xpk workload create` command line."""
  tpu = common.tpu_slice(args.topology)
  common.require_bucket(args.workdir, tpu.workers * args.num_slices)
  train = (f"{common.env_prefix(common.parse_env(args.env))}python3 -m motif_jax.train "
           f"{shlex.join(common.train_args(args))}")
  if args.base_docker_image:
    train = "python3 -m pip install -q -e '.[tpu]' && " + train
    image = [f"--base-docker-image={args.base_docker_image}", "--script-dir=."]
  else:
    image = [f"--docker-image={args.docker_image}"]
  command = ["xpk", "workload", "create", f"--cluster={args.cluster}",
             f"--workload={args.workload}", f"--tpu-type={tpu.accelerator_type}",
             f"--num-slices={args.num_slices}", *image, f"--command={train}"]
  command += [f"--project={args.project}"] if args.project else []
  return command + ([f"--zone={args.zone}"] if args.zone else [])


def main(argv) -> None:
  args = parse_args(argv)
  command = workload_command(args)
  runner = common.Runner(args.dry_run)
  runner.require("xpk", "install it with `pip install xpk` (it also needs gcloud and kubectl)")
  tpu = common.tpu_slice(args.topology)
  print(f"# {args.num_slices} x {tpu.accelerator_type}: {tpu.workers * args.num_slices} pods, "
        f"{tpu.chips * args.num_slices} chips; one training process per pod")
  runner.run(command)


if __name__ == "__main__":
  main(sys.argv[1:])
