"""Checkpoints: orbax async saves every N steps, keep K, resume from the workdir, save on SIGTERM.

A checkpoint holds the whole TrainState (params, optimizer state, step, RNG) and a JSON record
with the step and the data position. Orbax writes each step into a temporary directory and renames
it when complete, so a save that a crash interrupts never appears as a step; `latest_complete_step`
also ignores any step directory that lacks orbax's completion metadata.
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


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
        item_names=("state", "meta"))

  def latest_complete_step(self) -> int | None:
    """The newest step whose checkpoint finished writing, or None."""
    for step in sorted(self._manager.all_steps(read=True), reverse=True):
      if _is_complete(epath.Path(self.directory) / str(step)):
        return step
      logging.warning("Skipping incomplete checkpoint %s", epath.Path(self.directory) / str(step))
    return None

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


def _is_complete(step_dir: epath.Path) -> bool:
  """A step directory counts only with its metadata and state; orbax writes both before finalising."""
  return (step_dir / "_CHECKPOINT_METADATA").exists() and (step_dir / "state").exists()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class PreemptionFlag:
  """Set by SIGTERM; the training loop polls it between steps, saves and exits 0."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def restore_handler(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
