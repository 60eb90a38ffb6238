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
3. The pieces' tokens: a text run (`TextTrainData`) reads the documents from the task's source by index
   (nothing else is read), tokenizes them with EOS (`tasks.encode`, the Tasks' own preprocessing) and
   cuts them; a token-file run (`TokenTrainData`) reads just the pieces from the memory-mapped files.
4. `packing.pack` packs the slice's pieces into the process's rows. A text run turns them into decoder
   inputs, targets and weights with seqio's LM feature converter (`tasks.PackedLMFeatureConverter`), in
   a tf.data pipeline that prepares the next batches in the background; a token-file run with `lm_batch`,
   the same layout in numpy.
So `batches(k)` starts at batch k without reading or packing batches 0 .. k - 1, and the processes'
slices are disjoint and together make up the single-process stream.

Importing this module is cheap. A text run imports TensorFlow and seqio in `make_train_data`; a run
whose tasks are all token files (`token_files.py`) imports neither.
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Iterator

import numpy as np

from motif_jax.data import examples as examples_lib
from motif_jax.data import curriculum, packing, token_files, vocabulary
from motif_jax.data.config import DataConfig

TOKENS_PER_BYTE_SAMPLE = 32  # documents per task tokenized at start-up to estimate tokens per byte
DOCUMENT_CACHE_TOKENS = 1 << 24  # tokens of recently read documents kept (64 MiB), for their other pieces
REALISED_WINDOW = 200  # examples over which `log_metrics` measures the realised shares (at least a batch)


class TrainData:
  """The packed, sharded, infinite batch stream of one process. Build it with `make_train_data`.

  This class holds what every run shares: the plan, this process's slice of each batch, packing and
  metrics. A subclass opens the sources and turns examples into tokens and batches: `TextTrainData`
  (seqio Tasks, TensorFlow) or `TokenTrainData` (token files, numpy only).

  sources: task name -> its source, with `sizes` int64 [documents] and `len()`.
  vocab: the seqio vocabulary of a text run; None for token files (`vocab_size` is the declared one).
  """

  vocab = None

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int, *, sources: dict,
               vocab_size: int):
    mixture = cfg.curriculum
    self.cfg = cfg
    self.process_index, self.process_count = process_index, process_count
    self.rows = cfg.batch_size // process_count
    self.task_names = mixture.task_names
    self.sources = sources
    self.vocab_size = vocab_size
    self.vocab_pad_multiple = mixture.vocab_pad_multiple
    self.streams = []
    for index, name in enumerate(self.task_names):
      tokens_per_byte, added_tokens = self._size_model(self.sources[name])
      self.streams.append(examples_lib.TaskExamples(
          self.sources[name].sizes, seq_len=cfg.seq_len, seed=cfg.seed, task=index,
          tokens_per_byte=tokens_per_byte, added_tokens=added_tokens))
    self.plan = curriculum.CurriculumMixture(
        curriculum.Schedule(mixture), batch_tokens=cfg.batch_size * cfg.seq_len,
        example_tokens=[s.mean_tokens for s in self.streams], fill=mixture.fill,
        block_size=mixture.examples_per_block, seed=cfg.seed)
    self._lock = threading.Lock()  # a background pipeline and the caller share the caches

  def _size_model(self, source) -> tuple[float, float]:
    """(tokens per unit of `source.sizes`, tokens added per document): see examples.TaskExamples."""
    raise NotImplementedError

  def _pieces(self, found: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The tokens (int32 [n]) of the examples `host_examples` found, in their order; under the lock."""
    raise NotImplementedError

  def _batches(self, start: int) -> Iterator[dict[str, np.ndarray]]:
    raise NotImplementedError

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
    found = self.host_examples(batch)
    with self._lock:
      items = self._pieces(found)
    return packing.pack(items, self.rows, self.cfg.seq_len)

  # -- the trainer's interface ----------------------------------------------------------------------

  def batches(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches start, start + 1, ... of this process, forever; see the module docstring for the keys."""
    if start < 0:
      raise ValueError(f"batches(start={start}): start must be a batch index >= 0.")
    return self._batches(start)

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


class TextTrainData(TrainData):
  """A run of text tasks: seqio Tasks read by index, tokenized as they are read, converted by tf.data."""

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int):
    from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel  (imports TF and seqio)

    self.vocab, sources = tasks.register(cfg.curriculum)
    self.documents_read = 0  # documents this object has read from its sources
    self._documents: collections.OrderedDict = collections.OrderedDict()  # (task, doc) -> tokens
    self._cached_tokens = 0
    super().__init__(cfg, process_index, process_count, sources=sources,
                     vocab_size=self.vocab.vocab_size)

  def _read(self, task: int, documents: list[int]) -> list[str]:
    self.documents_read += len(documents)
    return self.sources[self.task_names[task]].read(documents)

  def _size_model(self, source) -> tuple[float, float]:
    """(Tokens per byte of `source.sizes`, measured on up to TOKENS_PER_BYTE_SAMPLE spread-out documents;
    1: the EOS that tokenization appends)."""
    ids = np.unique(np.linspace(0, len(source) - 1, min(len(source), TOKENS_PER_BYTE_SAMPLE)).astype(int))
    self.documents_read += len(ids)
    tokens = sum(len(self.vocab.encode(text)) for text in source.read(ids))
    return max(tokens, 1) / max(int(source.sizes[ids].sum()), 1), 1.0

  def _pieces(self, found: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reads and tokenizes the documents not in the cache, then cuts every example from its document."""
    from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel

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
    return items

  def _batches(self, start: int) -> Iterator[dict[str, np.ndarray]]:
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


class TokenTrainData(TrainData):
  """A run of token-file tasks (token_files.py): pieces read from memory maps, batches built in numpy.

  No TensorFlow, no seqio. The vocabulary is the tasks' declared `token_files.vocab_size`. Batches are
  made on the caller's thread, one at a time: the trainer reads the next batch while the device runs
  the step it has just launched.
  """

  def __init__(self, cfg: DataConfig, process_index: int, process_count: int):
    mixture = cfg.curriculum
    sources = {name: token_files.TokenFileSource(spec, cfg.seq_len, f"curriculum.tasks[{name!r}]")
               for name, spec in mixture.tasks}
    super().__init__(cfg, process_index, process_count, sources=sources,
                     vocab_size=mixture.tasks[0][1].vocab_size)

  def _size_model(self, source) -> tuple[float, float]:
    return 1.0, 0.0  # sizes are exact token counts, EOS included

  def _pieces(self, found: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [self.sources[self.task_names[t]].piece(d, p, n)
            for t, d, p, n in zip(found["task"], found["document"], found["piece"], found["pieces"])]

  def _batches(self, start: int) -> Iterator[dict[str, np.ndarray]]:
    return (lm_batch(self.host_batch(batch)) for batch in itertools.count(start))


def lm_batch(rows: packing.PackedRows) -> dict[str, np.ndarray]:
  """The trainer's batch of packed rows, built in numpy in the layout of seqio's LM feature converter.

  inputs: int32 [rows, seq_len], the targets shifted right by one within each segment, 0 at a segment's
  first position and on padding; targets, segment_ids, positions: int32, as packed; loss_weights:
  float32, 1 wherever segment_ids > 0. (seqio weighs `targets != 0`, the same rows unless a real token
  has id 0, which a token file may hold: here it is trained on like any other.)
  """
  targets, segments = rows.targets, rows.segment_ids
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = np.where(segments[:, 1:] == segments[:, :-1], targets[:, :-1], 0)
  return {
      "inputs": inputs.astype(np.int32),
      "targets": targets.astype(np.int32),
      "segment_ids": segments.astype(np.int32),
      "positions": rows.positions.astype(np.int32),
      "loss_weights": (segments > 0).astype(np.float32),
  }


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
  kind = TokenTrainData if cfg.curriculum.reads_token_files else TextTrainData  # raises for a bad preset
  return kind(cfg, process_index, process_count)
