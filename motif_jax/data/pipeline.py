"""Training batches for the trainer: a seqio Task or Mixture, packed by `seqio.LMFeatureConverter`.

    data = make_train_data(DataConfig(batch_size=64, seq_len=2048), process_index=i, process_count=n)
    for step, batch in enumerate(data.batches(start=first_step), first_step): ...

Every batch holds this process's `rows = batch_size // process_count` rows:
  inputs, targets, segment_ids, positions: int32 [rows, seq_len]
  loss_weights:                            float32 [rows, seq_len], 1 on real tokens, 0 on padding.
`targets` are packed document pieces; `inputs` are the targets shifted right by one within each packed
segment (0 at a segment's first position); `segment_ids` count 1, 2, ... per row and are 0 on padding;
`positions` restart at 0 with every segment.

The stream is a deterministic function of (config, process_index, process_count): each process reads a
disjoint shard (the embedded corpus shards by document), reshuffled every epoch from `seed` and repeated
forever. Resume is by batch index: `batches(k)` rebuilds the stream and skips k batches (this interim
pipeline replays them; the curriculum pipeline will seek instead).

Importing this module is cheap; TensorFlow and seqio are imported by `make_train_data`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the trainer asks of the data.

  batch_size: global batch (rows) across all processes.
  seq_len: tokens per row.
  seed: shuffling and mixing seed.
  mixture: a registered seqio Task or Mixture name with a "targets" feature.
  """

  batch_size: int
  seq_len: int
  seed: int = 0
  mixture: str = "motif_embedded"


class TrainData:
  """The packed, sharded, infinite batch stream of one process. Build it with `make_train_data`."""

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int):
    from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel  (imports TF and seqio)
    import seqio  # pylint: disable=import-outside-toplevel

    tasks.register_tasks()
    if cfg.mixture not in seqio.TaskRegistry.names() and cfg.mixture not in seqio.MixtureRegistry.names():
      raise ValueError(
          f"DataConfig.mixture={cfg.mixture!r} is not a registered seqio Task or Mixture; use "
          f"{tasks.MIXTURE_NAME!r}, one of {sorted(tasks.TASK_NAMES.values())}, or register yours first.")
    provider = seqio.get_mixture_or_task(cfg.mixture)
    if "targets" not in provider.output_features:
      raise ValueError(f"DataConfig.mixture={cfg.mixture!r} has no 'targets' feature to train on.")
    self.cfg = cfg
    self.process_index = process_index
    self.process_count = process_count
    self.rows = cfg.batch_size // process_count
    self.vocab_size: int = provider.output_features["targets"].vocabulary.vocab_size
    # Built now so that setting errors surface here; the first `batches` call consumes it.
    self._unused_dataset = self._dataset()

  def _dataset(self):
    """A fresh tf.data pipeline of batches from the start (fresh, so that its shuffles start over)."""
    import seqio  # pylint: disable=import-outside-toplevel

    ds = seqio.get_dataset(
        self.cfg.mixture,
        task_feature_lengths={"targets": self.cfg.seq_len},
        feature_converter=seqio.LMFeatureConverter(pack=True),
        dataset_split="train",
        shuffle=True,
        num_epochs=None,
        shard_info=seqio.ShardInfo(index=self.process_index, num_shards=self.process_count),
        seed=self.cfg.seed,
        verbose=False,
    )
    return ds.batch(self.rows, drop_remainder=True)

  def batches(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches start, start + 1, ... of this process, forever; see the module docstring for the keys."""
    if start < 0:
      raise ValueError(f"batches(start={start}): start must be a batch index >= 0.")
    ds = self._dataset() if self._unused_dataset is None else self._unused_dataset
    self._unused_dataset = None
    return map(_train_batch, ds.skip(start).prefetch(2).as_numpy_iterator())


def _train_batch(converted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The feature converter's `decoder_*` arrays [rows, seq_len] under the trainer's keys and dtypes."""
  return {
      "inputs": converted["decoder_input_tokens"].astype(np.int32),
      "targets": converted["decoder_target_tokens"].astype(np.int32),
      "segment_ids": converted["decoder_segment_ids"].astype(np.int32),
      "positions": converted["decoder_positions"].astype(np.int32),
      "loss_weights": converted["decoder_loss_weights"].astype(np.float32),
  }


def make_train_data(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> TrainData:
  """Validates the settings and returns this process's `TrainData`."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
  if cfg.batch_size <= 0 or cfg.batch_size % process_count:
    raise ValueError(
        f"DataConfig.batch_size={cfg.batch_size} must be a positive multiple of process_count={process_count} "
        f"(each process loads batch_size // process_count rows); set it to e.g. "
        f"{max(1, round(cfg.batch_size / process_count)) * process_count}.")
  if cfg.seq_len < 2:
    raise ValueError(f"DataConfig.seq_len={cfg.seq_len} must be at least 2 tokens.")
  return TrainData(cfg, process_index, process_count)
