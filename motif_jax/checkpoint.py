"""Checkpoints: orbax async saves every N steps, keep K, resume from the workdir, save on preemption.

A checkpoint holds the whole TrainState (step, params, optimizer state) and a JSON record with the
step and the data position. Orbax writes each step into a temporary directory and renames it when
complete, so a save that a crash interrupts never appears as a step; `latest_complete_step` also
ignores any step directory that orbax does not report finalised (`ocp.step.is_path_finalized`) or
whose step metadata (`ocp.metadata.get_step_metadata`) records no commit of a `state` item.
`restore_latest` skips a newest checkpoint that is incomplete, cannot be read back or holds
non-finite values, and moves it aside (renamed `<step>.corrupt-<UTC time>`, never deleted; the
warning names both paths), so that the run can save that step anew.
"""

from __future__ import annotations

import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class Checkpointer:
  """Saves and restores TrainState pytrees under `directory` (local path or gs:// bucket)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    if keep <= 0:
      raise ValueError(f"checkpoint keep={keep} must be positive.")
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        handler_registry=_handler_registry())

  def _all_steps(self) -> list[int]:
    self._manager.reload()  # steps other runs or processes wrote
    return self._manager.all_steps()

  def latest_complete_step(self) -> int | None:
    """The newest step whose checkpoint finished writing, or None."""
    for step in sorted(self._all_steps(), reverse=True):
      if _is_complete(epath.Path(self.directory) / str(step)):
        return step
      logging.warning("Skipping incomplete checkpoint %s", epath.Path(self.directory) / str(step))
    return None

  def restore_latest(self, abstract_state):
    """(step, state, meta) of the newest checkpoint that restores whole and finite, or None.

    A checkpoint that fails (incomplete, unreadable or truncated files, a bad JSON record, NaN or
    inf values) is moved aside with a warning naming where it went, and the one before it is tried.
    Left in place, it would stop the resumed run when it reaches that step again (orbax refuses to
    save a step that exists). With several processes a checkpoint counts only if every process read
    its part of it, and process 0 alone moves a bad one.
    """
    for step in sorted(self._all_steps(), reverse=True):
      path = self._step_path(step)
      if _on_any_process(not _is_complete(path)):
        self._move_aside(step, "it is incomplete (orbax did not finalise it)")
        continue
      restored, problem = self._try_restore(step, abstract_state)
      if _on_any_process(problem is not None):
        self._move_aside(step, problem or "another process could not restore it")
        continue
      return step, restored[0], restored[1]
    return None

  def _step_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _move_aside(self, step: int, problem: str) -> None:
    """Renames the bad checkpoint of `step` to a name orbax does not take for a step, and says so.

    Every process calls it; process 0 renames (epath, so a gs:// bucket works too), the others wait
    for it, and then all of them forget the step.
    """
    path = self._step_path(step)
    aside = path.parent / f"{step}{_ASIDE_MARK}{_agreed_utc_time()}"
    failure = None
    if jax.process_index() == 0:
      try:
        path.rename(aside)
      except Exception as error:  # pylint: disable=broad-except  (reported on every process below)
        failure = f"{type(error).__name__}: {error}"
    if _on_any_process(failure is not None):  # also the wait for process 0's rename
      raise CheckpointError(
          f"Checkpoint {path} is bad ({problem}) and moving it aside to {aside} failed "
          f"({failure or 'on process 0'}); move it out of {self.directory} by hand and start "
          "again.")
    self._manager.reload()
    logging.warning("Skipping checkpoint %s: %s; moved it aside to %s and trying the one before "
                    "it.", path, problem, aside)

  def _try_restore(self, step: int, abstract_state):
    try:
      state, meta = self.restore(step, abstract_state)
    except Exception as error:  # pylint: disable=broad-except  (any failure makes it unusable)
      return None, f"restoring it failed ({type(error).__name__}: {error})"
    if isinstance(state, _RestoreFailure):
      return None, f"restoring it failed ({state.reason})"
    if not bool(_all_finite(state)):
      return None, "it holds non-finite values"
    return (state, meta), None

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an async save of `state` and `meta` as `step`; the caller decides which steps to save."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state):
    """Restores (state, meta) of `step` onto the shardings in `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class CheckpointError(RuntimeError):
  """A bad checkpoint could not be moved out of the way of the resumed run."""


# Orbax takes only names of digits for steps, so it does not list `<step>.corrupt-<time>` as one.
_ASIDE_MARK = ".corrupt-"


def _agreed_utc_time() -> str:
  """Process 0's UTC time, e.g. 20250131-235959, on every process: one name for a moved step."""
  seconds = np.uint32(time.time())
  if jax.process_count() > 1:
    seconds = multihost_utils.broadcast_one_to_all(seconds)
  return time.strftime("%Y%m%d-%H%M%S", time.gmtime(int(seconds)))


class _RestoreFailure:
  """What `_ReportingHandler` returns in place of a state it could not read."""

  def __init__(self, reason: str):
    self.reason = reason


class _ReportingHandler(ocp.StandardCheckpointHandler):
  """Returns a failed restore as a `_RestoreFailure` instead of raising.

  A process whose part of a checkpoint is unreadable then still reaches orbax's barrier after the
  restore, like the others, and all of them can agree to skip that checkpoint instead of hanging.
  """

  def restore(self, directory, *args, **kwargs):
    try:
      return super().restore(directory, *args, **kwargs)
    except Exception as error:  # pylint: disable=broad-except
      return _RestoreFailure(f"{type(error).__name__}: {error}")


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state, meta = _ReportingHandler(), ocp.JsonCheckpointHandler()
  registry.add("state", ocp.args.StandardSave, state)
  registry.add("state", ocp.args.StandardRestore, state)
  registry.add("meta", ocp.args.JsonSave, meta)
  registry.add("meta", ocp.args.JsonRestore, meta)
  return registry


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _on_any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _is_complete(step_dir: epath.Path) -> bool:
  """Whether orbax finalised the step: not a temporary path, and step metadata recording the commit
  of a `state` item (on a file system without atomic renames a step directory shows up first)."""
  if not ocp.step.is_path_finalized(step_dir):
    return False
  try:
    metadata = ocp.metadata.get_step_metadata(step_dir)
  except Exception:  # pylint: disable=broad-except  (missing or unreadable: never finalised)
    return False
  return metadata.commit_timestamp_nsecs is not None and "state" in (metadata.item_handlers or {})


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class PreemptionWatch:
  """Tells the training loop, polled after every step, when to save and stop for a preemption.

  One process: its own SIGTERM handler sets a flag. Several processes: jax's preemption sync manager,
  which `jax.distributed.initialize` starts and which catches SIGTERM on each host, agrees on one step
  at which `reached` is true on every process, whichever host got the notice (a Python handler here
  would displace jax's, so none is installed).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop; every process must call it at every step."""
    if jax.process_count() == 1:
      return self._event.is_set()
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
