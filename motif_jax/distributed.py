"""Multi-host start: `jax.distributed.initialize` behind a rendezvous that names missing hosts.

`initialize(...)` picks one of three cases:
- explicit: `coordinator_address`, `num_processes` and `process_id` are given (the `motif_jax.train`
  flags, or the MOTIF_* environment variables behind them): GPU hosts, CPU clusters, tests;
- a TPU slice that names its workers in TPU_WORKER_HOSTNAMES and TPU_WORKER_ID (GKE sets them; on
  a TPU VM they can be exported), one slice: the rendezvous below, then jax's own detection;
- otherwise `jax.distributed.initialize()`'s own detection (Cloud TPU, Slurm, Open MPI), without
  the rendezvous; where it finds no cluster, one process: nothing to start.

When a host never joins, jax's coordination service aborts every other process with a bare
`DEADLINE_EXCEEDED` that does not say which host is missing. So before jax starts it, every process
joins a small TCP rendezvous on the coordinator's address: process 0 waits up to `timeout_s` for the
others and then either releases them all or fails naming each process (and host) that did not
arrive, and tells the ones that did; a process that cannot reach the coordinator fails naming it.
Process 0 closes the rendezvous before jax's service binds the same port.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Sequence

import jax
from absl import logging

_HELLO = "motif-rendezvous"


class StartupError(RuntimeError):
  """Raised when the processes of a multi-host run do not all join in time."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process stands in a multi-host run."""

  coordinator_address: str  # host:port of process 0
  num_processes: int
  process_id: int
  host_names: tuple[str, ...] = ()  # one per process, for messages only; may be empty


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, host_names: Sequence[str] = (),
               timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> Cluster | None:
  """Starts jax's distributed runtime when this is a multi-host run; returns its `Cluster`, or None
  for one process and for a run that jax's detection started (then see `jax.process_count()`).

  Call before any other jax call. `heartbeat_timeout_s` is how long the others wait for a host that
  stopped answering (a lost machine) before jax ends them too, so that a restart can resume.
  """
  cluster = _explicit_cluster(coordinator_address, num_processes, process_id, host_names)
  auto = cluster is None
  if auto:
    cluster = _tpu_slice_from_environment()
    if cluster is None:
      return _detected_by_jax(timeout_s, heartbeat_timeout_s)
  if cluster.num_processes == 1:
    return None
  rendezvous(cluster, timeout_s=timeout_s)
  if auto:  # jax detects the same slice itself (and settings this module does not read)
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes,
                               cluster.process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  _quiet_other_processes()
  return cluster


def _quiet_other_processes() -> None:
  """Log lines come from process 0 alone; errors from every host."""
  if jax.process_index() != 0:
    logging.set_verbosity(logging.ERROR)


def _explicit_cluster(coordinator_address, num_processes, process_id, host_names) -> Cluster | None:
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if all(value is None for value in given.values()):
    return None
  missing = [name for name, value in given.items() if value is None]
  if missing:
    raise ValueError(f"A multi-host start needs --coordinator_address, --num_processes and "
                     f"--process_id together (or MOTIF_COORDINATOR_ADDRESS, MOTIF_NUM_PROCESSES, "
                     f"MOTIF_PROCESS_ID); missing: {', '.join('--' + m for m in missing)}.")
  if ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address!r} must be host:port, e.g. "
                     "10.0.0.2:8476 (process 0's host).")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes}).")
  if host_names and len(host_names) != num_processes:
    raise ValueError(f"--hosts names {len(host_names)} hosts but --num_processes={num_processes}; "
                     "give one host name per process, in process order.")
  return Cluster(coordinator_address, num_processes, process_id, tuple(host_names))


TPU_COORDINATOR_PORT = 8476  # jax's coordinator port on TPU slices (JAX_COORDINATOR_PORT overrides)


def _tpu_slice_from_environment() -> Cluster | None:
  """The TPU slice named by TPU_WORKER_HOSTNAMES (comma-separated, in worker order) and
  TPU_WORKER_ID, coordinated by its first worker as jax does; None when they are unset or when
  MEGASCALE_COORDINATOR_ADDRESS says the run spans several slices (jax's detection alone)."""
  hosts = [h.strip() for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  worker = os.environ.get("TPU_WORKER_ID", "")
  if not hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return None
  if not worker.isdigit() or int(worker) >= len(hosts):
    raise ValueError(f"TPU_WORKER_ID={worker!r} must be a worker index in [0, {len(hosts)}) of "
                     f"TPU_WORKER_HOSTNAMES={','.join(hosts)}; fix or unset both.")
  port = os.environ.get("JAX_COORDINATOR_PORT", str(TPU_COORDINATOR_PORT))
  return Cluster(f"{hosts[0]}:{port}", len(hosts), int(worker), tuple(hosts))


def _detected_by_jax(timeout_s: int, heartbeat_timeout_s: int) -> None:
  """`jax.distributed.initialize()` with jax's own cluster detection (Cloud TPU, Slurm, Open MPI);
  where it finds no cluster, nothing is started and this process runs alone."""
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except ValueError as error:  # jax found no cluster to join: its coordinator address stays unset
    logging.info("No multi-host environment detected (%s); running as one process.", error)
    return None
  _quiet_other_processes()
  logging.info("jax.distributed started by jax's cluster detection: process %d of %d.",
               jax.process_index(), jax.process_count())
  return None


def _describe(cluster: Cluster, process: int, joined: dict[int, str]) -> str:
  host = joined.get(process) or (cluster.host_names[process] if cluster.host_names else None)
  return f"process {process}" + (f" (host {host})" if host else "")


def rendezvous(cluster: Cluster, *, timeout_s: float) -> None:
  """Returns once all `cluster.num_processes` processes have joined; raises StartupError otherwise."""
  host, port = cluster.coordinator_address.rsplit(":", 1)
  if cluster.process_id == 0:
    _serve(cluster, int(port), timeout_s)
  else:
    _join(cluster, host.strip("[]"), int(port), timeout_s)


def _serve(cluster: Cluster, port: int, timeout_s: float) -> None:
  """Process 0: accept one hello per other process until all arrived or `timeout_s` passed."""
  deadline = time.monotonic() + timeout_s
  joined: dict[int, str] = {0: socket.gethostname()}
  connections: dict[int, socket.socket] = {}
  family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
  with socket.create_server(("", port), family=family,
                            dualstack_ipv6=family == socket.AF_INET6) as server:
    try:
      while len(joined) < cluster.num_processes and time.monotonic() < deadline:
        server.settimeout(max(0.05, deadline - time.monotonic()))
        try:
          connection, _ = server.accept()
        except TimeoutError:
          break
        process, host = _read_hello(connection, cluster)
        if process in joined:
          connection.close()
          raise StartupError(f"Two processes claim --process_id={process}: hosts {joined[process]} "
                             f"and {host}; give each host its own process id.")
        joined[process], connections[process] = host, connection
      missing = [p for p in range(cluster.num_processes) if p not in joined]
      reply = "go" if not missing else "missing " + ",".join(map(str, missing))
      for connection in connections.values():
        connection.sendall(reply.encode() + b"\n")
      for connection in connections.values():  # let each peer close first: the port stays free
        connection.settimeout(5)
        try:
          connection.recv(1)
        except OSError:
          pass
    finally:
      for connection in connections.values():
        connection.close()
  if missing:
    raise StartupError(_missing_message(cluster, missing, joined, timeout_s))


def _read_hello(connection: socket.socket, cluster: Cluster) -> tuple[int, str]:
  connection.settimeout(10)
  words = connection.makefile("r").readline().split()
  if len(words) != 3 or words[0] != _HELLO or not words[1].isdigit():
    connection.close()
    raise StartupError(f"Something that is not a motif-jax process connected to the coordinator "
                       f"port {cluster.coordinator_address}; pick a free port.")
  process = int(words[1])
  if not 0 < process < cluster.num_processes:
    connection.close()
    raise StartupError(f"Host {words[2]} joined as --process_id={process}, outside [1, "
                       f"--num_processes={cluster.num_processes}); check its flags.")
  return process, words[2]


def _join(cluster: Cluster, host: str, port: int, timeout_s: float) -> None:
  """Processes 1...: say hello to process 0, then wait for its verdict."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      connection = socket.create_connection((host, port), timeout=5)
      break
    except OSError as error:
      if time.monotonic() >= deadline:
        raise StartupError(
            f"Process {cluster.process_id} could not reach the coordinator, "
            f"{_describe(cluster, 0, {})} at {cluster.coordinator_address}, within {timeout_s:.0f} s "
            f"({error}). Start the run on that host too, or fix --coordinator_address.") from error
      time.sleep(0.25)
  with connection:
    connection.sendall(f"{_HELLO} {cluster.process_id} {socket.gethostname()}\n".encode())
    connection.settimeout(timeout_s + 30)  # process 0 answers by its own deadline
    try:
      reply = connection.makefile("r").readline().strip()
    except TimeoutError:
      reply = ""
  if reply == "go":
    return
  if reply.startswith("missing "):
    missing = [int(p) for p in reply.split()[1].split(",")]
    raise StartupError(_missing_message(cluster, missing, {}, timeout_s))
  raise StartupError(f"The coordinator at {cluster.coordinator_address} closed the rendezvous "
                     "without an answer; see process 0's log.")


def _missing_message(cluster: Cluster, missing: Sequence[int], joined: dict[int, str],
                     timeout_s: float) -> str:
  names = ", ".join(_describe(cluster, p, joined) for p in missing)
  return (f"{len(missing)} of {cluster.num_processes} processes did not join the run at "
          f"{cluster.coordinator_address} within {timeout_s:.0f} s: {names}. Check that the training "
          "command started on every host with its own --process_id, or raise "
          "--distributed_timeout_s if hosts start slowly.")


def local_data_shards(data_shards: int | None) -> tuple[range, int]:
  """(the data shards this process reads, the number of shards): process p reads a contiguous block.

  `data_shards` None means one shard per process. Fixing it (a multiple of the process count) makes
  the global batch the same whatever the number of hosts: a process reading several shards stacks
  their rows in shard order, which is where `jax.make_array_from_process_local_data` puts the rows of
  the hosts that would otherwise read them.
  """
  count, index = jax.process_count(), jax.process_index()
  shards = count if data_shards is None else data_shards
  if shards < 1 or shards % count:
    raise ValueError(f"train.data_shards={data_shards} must be a positive multiple of the number of "
                     f"processes ({count}); e.g. set it to {count} or leave it None.")
  per_process = shards // count
  return range(index * per_process, (index + 1) * per_process), shards
