"""Train on GPU hosts: one host with several GPUs, or several hosts over ssh (one process per host).

    python -m launch.gpu --gin_file=gin_configs/experiments/motif_2_6b.gin --workdir=/tmp/run
    python -m launch.gpu --hosts=gpu-a,gpu-b --gin_file=... --workdir=/shared/run [--dry-run]

Each process drives every GPU of its host. With several hosts, the first is the coordinator
(--port on it must be reachable from the others), every host needs the repository at --repo_dir
with the package installed (`pip install -e '.[gpu]'`) for --python, and --workdir must be a path
all hosts share (NFS, Lustre) or a gs:// bucket. The environment keeps NVLink multicast off
(NCCL_NVLS_ENABLE=0, NVSHMEM_DISABLE_NVLS=1: on shared machines a program using it can take the
host's GPUs out of service) and sets XLA's usual GPU flags for overlapping collectives with compute;
--env adds or overrides variables. --platform_gin (default gin_configs/platforms/gpu.gin) selects the
Pallas kernels and the remat policy measured fastest on an H200. A host that fails is named when the
run ends; a host that never starts is named by process 0 after --distributed_timeout_s (a
motif_jax.train flag, default 300 s).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from launch import common

GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
)
GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "NVSHMEM_DISABLE_NVLS": "1",
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",
    "XLA_FLAGS": " ".join(GPU_XLA_FLAGS),
}
LOCAL_HOSTS = ("localhost", "127.0.0.1")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m launch.gpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hosts", default="localhost",
                      help="Comma-separated hosts, the coordinator first (default: this host).")
  parser.add_argument("--port", type=int, default=8476, help="Coordinator port on the first host.")
  parser.add_argument("--repo_dir", default=".", help="The repository's path on every host.")
  parser.add_argument("--python", default="python3", help="Python with motif-jax installed.")
  parser.add_argument("--env", action="append", default=[],
                      help="KEY=VALUE for training on every host (repeatable; overrides defaults).")
  parser.add_argument("--platform_gin", default="gin_configs/platforms/gpu.gin",
                      help="Gin file added after --gin_file: the fastest kernels and remat policy on "
                           "Hopper GPUs. Empty: none.")
  common.add_run_arguments(parser)
  args = parser.parse_args(argv)
  if args.platform_gin:
    args.gin_file.append(args.platform_gin)
  args.hosts = [h for h in args.hosts.split(",") if h]
  if not args.hosts or len(set(args.hosts)) != len(args.hosts):
    parser.error(f"--hosts must name each host once; got {args.hosts!r}.")
  return args


def host_commands(args) -> list[list[str]]:
  """One command per host: the training process itself, through ssh unless it is this host."""
  env = {**GPU_ENV, **common.parse_env(args.env)}
  count = len(args.hosts)
  commands = []
  for index, host in enumerate(args.hosts):
    flags = common.train_args(args)
    if count > 1:
      flags += [f"--coordinator_address={args.hosts[0]}:{args.port}", f"--num_processes={count}",
                f"--process_id={index}", f"--hosts={','.join(args.hosts)}"]
    train = [args.python, "-m", "motif_jax.train", *flags]
    if host in LOCAL_HOSTS and count == 1:
      commands.append(["env", *(f"{k}={v}" for k, v in env.items()), *train])
    else:
      remote = f"cd {shlex.quote(args.repo_dir)} && {common.env_prefix(env)}{shlex.join(train)}"
      commands.append(["ssh", "-o", "BatchMode=yes", host, remote])
  return commands


def main(argv) -> None:
  args = parse_args(argv)
  commands = host_commands(args)
  runner = common.Runner(args.dry_run)
  if any(c[0] == "ssh" for c in commands):
    runner.require("ssh", "install an OpenSSH client with keys for every host")
  print(f"# {len(args.hosts)} host(s): {', '.join(args.hosts)}; one process per host, each on "
        "all of its GPUs")
  runner.start_all(commands, args.hosts)


if __name__ == "__main__":
  main(sys.argv[1:])
