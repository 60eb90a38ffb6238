"""Training entry point: `python -m motif_jax.train --gin_file=... [--gin_param=...] --workdir=DIR`.

Gin files are applied in order, then the bindings; process 0 writes the operative config to
DIR/config.gin. A run resumes from DIR by itself. DIR may be a local path or a gs:// bucket (which a
multi-host run needs: every host reads and writes the same checkpoints).

Multi-host: on a Cloud TPU VM slice, start the same command on every worker and nothing more is
needed. Elsewhere (GPU hosts, CPU clusters) give every process --coordinator_address (process 0's
host:port), --num_processes and its own --process_id, or the MOTIF_COORDINATOR_ADDRESS,
MOTIF_NUM_PROCESSES and MOTIF_PROCESS_ID environment variables.
"""

import os
import sys
import traceback

import gin
from absl import app, flags, logging
from etils import epath

from motif_jax import distributed

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files, applied in order.")
GIN_PARAMS = flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. train.num_steps=100.")
WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and logs; a run resumes from it.")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("MOTIF_COORDINATOR_ADDRESS"),
    "Multi-host: host:port of process 0 (not needed on Cloud TPU VMs).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", _env_int("MOTIF_NUM_PROCESSES"), "Multi-host: the number of processes.")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", _env_int("MOTIF_PROCESS_ID"), "Multi-host: this process's index, from 0.")
HOSTS = flags.DEFINE_list(
    "hosts", os.environ.get("MOTIF_HOSTS", ""),
    "Multi-host: the host of each process, in order; only used to name hosts that fail to join.")
TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Multi-host: how long processes wait for each other at start-up.")
HEARTBEAT = flags.DEFINE_integer(
    "distributed_heartbeat_s", 100,
    "Multi-host: how long the others wait for a host that stopped answering before ending too.")

# gin files name each other relative to the repository root (`include 'gin_configs/base.gin'`).
GIN_SEARCH_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stop(message: str) -> None:
  """Ends the command over a mistake in its settings or data: one line on stderr, exit code 2."""
  print(f"motif_jax.train: {message}", file=sys.stderr)
  sys.exit(2)


def _check_workdir(workdir: str) -> None:
  """Stops with one line when --workdir, a folder above it, or its checkpoints or logs is a file.

  Checked before jax starts, so that the run does not end in a FileExistsError from the first mkdir.
  (A bucket has no files in the way of folders, so above a gs:// path nothing is checked.)
  """
  path = epath.Path(workdir)
  above = () if "://" in workdir else path.parents
  existing = next((p for p in (path, *above) if p.exists()), None)
  if existing is not None and not existing.is_dir():
    what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
    _stop(f"--workdir={workdir} {what}, not a directory; pass a directory path (a new one is "
          "created if it does not exist).")
  for name in ("checkpoints", "logs"):
    if (path / name).exists() and not (path / name).is_dir():
      _stop(f"--workdir={workdir} holds a file named {name!r} where the run keeps its {name} "
            "directory; move that file away or pass another --workdir.")


def _one_line(error: BaseException) -> str:
  """The error's message on one line (gin's added location lines joined in, its call notes dropped)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(line for line in lines if not line.startswith("In call to configurable"))


def _fail(error: BaseException, workdir: str, write_log: bool) -> None:
  """Ends a run stopped by its settings or data: one line on stderr, exit code 2; with `write_log`
  (process 0), the traceback goes to WORKDIR/error.log (to stderr if the workdir cannot be written)."""
  where = ""
  if not write_log:
    _stop(f"{type(error).__name__}: {_one_line(error)}")
  try:
    path = epath.Path(workdir) / "error.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(error)))
    where = f" (traceback in {path})"
  except OSError:
    traceback.print_exception(error)
  _stop(f"{type(error).__name__}: {_one_line(error)}{where}")


def _check_gin_files(files) -> None:
  """Stops with one line when a --gin_file exists neither as given nor under the repository root."""
  for name in files:
    if not (os.path.exists(name) or os.path.exists(os.path.join(GIN_SEARCH_PATH, name))):
      experiments = sorted(os.listdir(os.path.join(GIN_SEARCH_PATH, "gin_configs", "experiments")))
      _stop(f"--gin_file={name} does not exist; experiments: "
            + ", ".join(f"gin_configs/experiments/{e}" for e in experiments))


def main(argv):
  del argv
  if not WORKDIR.value:
    raise app.UsageError("--workdir is required: checkpoints and logs go there, and a run resumes "
                         "from it.")
  _check_workdir(WORKDIR.value)
  _check_gin_files(GIN_FILES.value)
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                           host_names=HOSTS.value, timeout_s=TIMEOUT.value,
                           heartbeat_timeout_s=HEARTBEAT.value)
  except (distributed.StartupError, ValueError) as error:  # a message for the operator, no trace
    _stop(str(error))
  from motif_jax import trainer  # pylint: disable=import-outside-toplevel  (after the jax start)
  import jax  # pylint: disable=import-outside-toplevel

  try:
    gin.add_config_file_search_path(GIN_SEARCH_PATH)
    gin.parse_config_files_and_bindings(GIN_FILES.value, GIN_PARAMS.value)
    if jax.process_index() == 0:
      workdir = epath.Path(WORKDIR.value)
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "config.gin").write_text(gin.config_str())
    trainer.train(WORKDIR.value)
  except (ValueError, FileNotFoundError, trainer.NonFiniteError) as error:  # settings, data, divergence
    _fail(error, WORKDIR.value, write_log=jax.process_index() == 0)


if __name__ == "__main__":
  app.run(main)
