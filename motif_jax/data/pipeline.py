"""Training batches from a curriculum: planned, read by index, packed per batch, resumable at any batch.

    data = make_train_data(DataConfig(batch_size=64, seq_len=2048, mixture=curriculum),
                           process_index=i, process_count=n)
    for step, batch in enumerate(data.batches(start=first_step), first_step): ...
    metrics = data.log_metrics(position)   # mixture/target/<task>, mixture/realised/<task>

Every batch holds this process's `rows = batch_size // process_count` rows:
  inputs, targets, segment_ids, positions: int32 [rows, seq_len]
  loss_weights:                            float32 [rows, seq_len], 1 on real tokens, 0 on padding.
`targets` are packed pieces of documents; `inputs` are the targets shifted right by one within each
segment (0 at a segment's first position); `segment_ids` count 1, 2, ... per row and are 0 on padding;
`positions` restart at 0 with every segment.

How batch k is made, from (config, seed, k) alone:
1. `CurriculumMixture` (curriculum.py) gives the batch's global examples I(k) .. I(k + 1) - 1 and,
   for each, its task and its index among that task's examples. Process p of n takes the p-th of n
   contiguous slices.
2. `TaskExamples` (examples.py) turns a task's example index into (document, piece, pieces).
3. The documents are read from the task's source by index (nothing else is read), tokenized with EOS
   (`tasks.encode`, the Tasks' own preprocessing) and cut into the pieces.
4. `packing.pack` packs the slice's pieces into the process's rows; seqio's LM feature converter
   (`tasks.PackedLMFeatureConverter`) turns the packed rows into decoder inputs, targets and weights, in a
   tf.data pipeline that prepares the next batches in the background.
So `batches(k)` starts at batch k without reading or packing batches 0 .. k - 1, and the processes'
slices are disjoint and together make up the single-process stream.

Importing this module is cheap; TensorFlow and seqio are imported by `make_train_data`.
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Iterator

import numpy as np

from motif_jax.data import examples as examples_lib
from motif_jax.data import curriculum, packing, vocabulary
from motif_jax.data.config import DataConfig

TOKENS_PER_BYTE_SAMPLE = 32  # documents per task tokenized at start-up to estimate tokens per byte
DOCUMENT_CACHE_TOKENS = 1 << 24  # tokens of recently read documents kept (64 MiB), for their other pieces
REALISED_WINDOW = 200  # examples over which `log_metrics` measures the realised shares (at least a batch)


class TrainData:
  """The packed, sharded, infinite batch stream of one process. Build it with `make_train_data`."""

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int):
    from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel  (imports TF and seqio)

    mixture = cfg.curriculum
    self.cfg = cfg
    self.process_index, self.process_count = process_index, process_count
    self.rows = cfg.batch_size // process_count
    self.task_names = mixture.task_names
    self.vocab, self.sources = tasks.register(mixture)
    self.vocab_size: int = self.vocab.vocab_size
    self.vocab_pad_multiple = mixture.vocab_pad_multiple
    self.documents_read = 0  # documents this object has read from its sources
    self.streams = [
        examples_lib.TaskExamples(self.sources[name].sizes, seq_len=cfg.seq_len, seed=cfg.seed, task=index,
                                  tokens_per_byte=self._tokens_per_byte(self.sources[name]))
        for index, name in enumerate(self.task_names)]
    self.plan = curriculum.CurriculumMixture(
        curriculum.Schedule(mixture), batch_tokens=cfg.batch_size * cfg.seq_len,
        example_tokens=[s.mean_tokens for s in self.streams], fill=mixture.fill,
        block_size=mixture.examples_per_block, seed=cfg.seed)
    self._documents: collections.OrderedDict = collections.OrderedDict()  # (task, doc) -> tokens
    self._cached_tokens = 0
    self._lock = threading.Lock()  # the background pipeline and the caller share the caches

  def _read(self, task: int, documents: list[int]) -> list[str]:
    self.documents_read += len(documents)
    return self.sources[self.task_names[task]].read(documents)

  def _tokens_per_byte(self, source) -> float:
    """Tokens per byte of `source.sizes`, measured on up to TOKENS_PER_BYTE_SAMPLE spread-out documents."""
    ids = np.unique(np.linspace(0, len(source) - 1, min(len(source), TOKENS_PER_BYTE_SAMPLE)).astype(int))
    self.documents_read += len(ids)
    tokens = sum(len(self.vocab.encode(text)) for text in source.read(ids))
    return max(tokens, 1) / max(int(source.sizes[ids].sum()), 1)

  # -- the plan -------------------------------------------------------------------------------------

  def host_span(self, batch: int) -> tuple[int, int]:
    """[start, stop): the global examples of `batch` that this process takes."""
    start, size = self.plan.batch_start(batch), self.plan.batch_size(batch)
    return (start + self.process_index * size // self.process_count,
            start + (self.process_index + 1) * size // self.process_count)

  def host_examples(self, batch: int) -> dict[str, np.ndarray]:
    """This process's examples of `batch`: task, index (within the task), document, piece, pieces: [n]."""
    with self._lock:
      start, stop = self.host_span(batch)
      task, index = self.plan.assign(start, stop)
      document, piece, pieces = (np.zeros(len(task), np.int64) for _ in range(3))
      for t in np.unique(task):
        mask = task == t
        document[mask], piece[mask], pieces[mask] = self.streams[t].locate(index[mask])
    return dict(task=task, index=index, document=document, piece=piece, pieces=pieces)

  def host_batch(self, batch: int) -> packing.PackedRows:
    """This process's rows of `batch`, packed (before the feature converter)."""
    from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel

    found = self.host_examples(batch)
    with self._lock:
      for t in np.unique(found["task"]):
        missing = [d for d in dict.fromkeys(found["document"][found["task"] == t].tolist())
                   if (t, d) not in self._documents]
        for d, text in zip(missing, self._read(int(t), missing)):
          self._documents[(t, d)] = tasks.encode(self.vocab, text)
        self._cached_tokens += sum(len(self._documents[(t, d)]) for d in missing)
      items = []
      for t, d, p, n in zip(found["task"], found["document"], found["piece"], found["pieces"]):
        self._documents.move_to_end((t, d))
        items.append(examples_lib.cut(self._documents[(t, d)], int(p), int(n)))
      while self._cached_tokens > DOCUMENT_CACHE_TOKENS and len(self._documents) > len(items):
        self._cached_tokens -= len(self._documents.popitem(last=False)[1])
    return packing.pack(items, self.rows, self.cfg.seq_len)

  # -- the trainer's interface ----------------------------------------------------------------------

  def batches(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches start, start + 1, ... of this process, forever; see the module docstring for the keys."""
    if start < 0:
      raise ValueError(f"batches(start={start}): start must be a batch index >= 0.")
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel

    def packed_rows():
      for batch in itertools.count(start):
        rows = self.host_batch(batch)
        yield {"targets": rows.targets, "targets_segment_ids": rows.segment_ids,
               "targets_positions": rows.positions}

    spec = tf.TensorSpec((self.rows, self.cfg.seq_len), tf.int32)
    ds = tf.data.Dataset.from_generator(packed_rows, output_signature={
        "targets": spec, "targets_segment_ids": spec, "targets_positions": spec})
    ds = tasks.PackedLMFeatureConverter()(ds.unbatch(), {"targets": self.cfg.seq_len})
    ds = ds.batch(self.rows, drop_remainder=True).prefetch(2)
    return map(_train_batch, ds.as_numpy_iterator())

  def log_metrics(self, position: int) -> dict[str, float]:
    """Scheduled and realised task shares after `position` batches (all processes together).

    mixture/target/<task>: the weights scheduled for the last batch consumed; mixture/realised/<task>:
    the tasks' shares of the last max(REALISED_WINDOW, one batch) examples consumed. Reads no data.
    """
    with self._lock:
      last = max(position, 1) - 1
      target = self.plan.target_weights(last)
      stop = self.plan.batch_start(last + 1)
      counts = self.plan.task_counts(max(0, stop - max(REALISED_WINDOW, self.plan.batch_size(last))), stop)
    metrics = {f"mixture/target/{n}": float(w) for n, w in zip(self.task_names, target)}
    metrics.update({f"mixture/realised/{n}": float(c / max(1, counts.sum()))
                    for n, c in zip(self.task_names, counts)})
    return metrics

  def check_model_vocab(self, model_vocab_size: int, shards: int = 1) -> int:
    """Raises if the model cannot embed this vocabulary (see vocabulary.check_model_vocab)."""
    return vocabulary.check_model_vocab(model_vocab_size, self.vocab_size,
                                        pad_multiple=self.vocab_pad_multiple, shards=shards)


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
        f"DataConfig.batch_size={cfg.batch_size} must be a positive multiple of process_count="
        f"{process_count} (each process loads batch_size // process_count rows); set it to e.g. "
        f"{max(1, round(cfg.batch_size / process_count)) * process_count}.")
  if cfg.seq_len < 2:
    raise ValueError(f"DataConfig.seq_len={cfg.seq_len} must be at least 2 tokens.")
  cfg.curriculum  # pylint: disable=pointless-statement  (raises for an unknown preset name)
  return TrainData(cfg, process_index, process_count)
