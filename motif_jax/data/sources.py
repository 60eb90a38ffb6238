"""Document sources with random access, as seqio DataSources.

Every source is an `IndexedSource`: it knows, before reading any document, how many documents it holds
and an upper bound on each one's UTF-8 size (`sizes`, int64 [num_records]), and `read(ids)` returns the
documents at any indices. The curriculum needs this to find example j of a task without reading
examples 0 .. j - 1. Each source counts the documents it has read (`reads`) so that tests can check it.

Indexing costs one pass over the files' framing, not their content: newline positions for text and JSON
Lines, record headers for TFRecord. Documents themselves are read only when asked for.

As seqio DataSources (split "train" only), they yield {"text": tf.string} and shard exactly by document:
shard i of n holds documents i, i + n, ...; with `shuffle`, each epoch comes in a new order from `seed`.

Importing this module imports TensorFlow and seqio.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from motif_jax.data import config, corpus
from motif_jax.data.paths import expand_paths

_SCAN_BYTES = 1 << 26  # bytes per chunk when indexing line breaks


class IndexedSource(seqio.DataSource):
  """Documents addressable by index. Subclasses set `sizes` and implement `_read_one`."""

  def __init__(self, description: str, sizes: np.ndarray):
    super().__init__(splits=("train",), caching_permitted=False)
    if not len(sizes):
      raise ValueError(f"{description} holds no documents.")
    self.description = description
    self.sizes = np.asarray(sizes, dtype=np.int64)
    self.reads = 0
    self.spec: config.Source | None = None  # set by open_source

  def __len__(self) -> int:
    return len(self.sizes)

  def read(self, ids: Sequence[int]) -> list[str]:
    """The documents at `ids` (any order, repeats allowed)."""
    self.reads += len(ids)
    return [self._read_one(int(i)) for i in ids]

  def _read_one(self, index: int) -> str:
    raise NotImplementedError

  # seqio.DataSource interface.
  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    return [split]

  def num_input_examples(self, split: str) -> int:
    return len(self)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached
    if split not in self.splits:
      raise ValueError(f"{self.description} has only the split 'train', not {split!r}.")
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    if len(self) < count:
      raise ValueError(f"{self.description} has {len(self)} documents, fewer than the {count} shards "
                       "asked for (one per process).")
    ids = np.arange(index, len(self), count)

    def documents():
      epoch = 0
      while num_epochs is None or epoch < num_epochs:
        order = np.random.default_rng([seed or 0, epoch]).permutation(ids) if shuffle else ids
        for i in order:
          yield {"text": self.read([i])[0]}
        epoch += 1

    return tf.data.Dataset.from_generator(
        documents, output_signature={"text": tf.TensorSpec((), tf.string)})


class CorpusSource(IndexedSource):
  """One domain of the embedded offline corpus (`motif_jax.data.corpus`), held in memory."""

  def __init__(self, domain: str):
    self.documents = corpus.documents(domain)
    super().__init__(f"embedded corpus domain {domain!r}",
                     np.array([len(d.encode("utf-8")) for d in self.documents]))

  def _read_one(self, index: int) -> str:
    return self.documents[index]


class _FileRecords:
  """Byte ranges (file, start, end) of records in a list of files, read through memory maps."""

  def __init__(self, files: list[str], spans: list[tuple[np.ndarray, np.ndarray]]):
    self.files = files
    self.file_of = np.concatenate([np.full(len(s), f, np.int32) for f, (s, _) in enumerate(spans)])
    self.starts = np.concatenate([s for s, _ in spans]).astype(np.int64)
    self.ends = np.concatenate([e for _, e in spans]).astype(np.int64)
    self._maps: dict[int, mmap.mmap] = {}

  def get(self, index: int) -> bytes:
    f = int(self.file_of[index])
    if f not in self._maps:
      with open(self.files[f], "rb") as handle:
        self._maps[f] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return self._maps[f][self.starts[index]:self.ends[index]]


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends) int64 of the non-empty lines of a file, without their line breaks.

  Scans the file in chunks through a memory map, so indexing a large file takes little memory.
  """
  size = os.path.getsize(path)
  breaks = []
  if size:
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
      for offset in range(0, size, _SCAN_BYTES):
        chunk = np.frombuffer(data, dtype=np.uint8, count=min(_SCAN_BYTES, size - offset), offset=offset)
        breaks.append(np.flatnonzero(chunk == ord("\n")) + offset)
        del chunk  # the memory map closes only once no array views it
  breaks = np.concatenate(breaks) if breaks else np.zeros(0, np.int64)
  starts = np.concatenate([[0], breaks + 1])
  ends = np.concatenate([breaks, [size]])
  keep = ends > starts
  return starts[keep], ends[keep]


class TextSource(IndexedSource):
  """Text files: one document per non-blank line, or (per_line=False) one per file."""

  def __init__(self, spec: config.TextFiles, setting: str):
    files = expand_paths(spec.paths, setting)
    if spec.per_line:
      spans = [_line_spans(f) for f in files]
    else:
      spans = [(np.array([0]), np.array([os.path.getsize(f)])) for f in files]
    self.records = _FileRecords(files, spans)
    super().__init__(f"{setting} (text files {list(spec.paths)})", self.records.ends - self.records.starts)

  def _read_one(self, index: int) -> str:
    return self.records.get(index).decode("utf-8", errors="replace")


class JsonlSource(IndexedSource):
  """JSON Lines files; the document is the string field `text_field` of each line's object."""

  def __init__(self, spec: config.JsonlFiles, setting: str):
    files = expand_paths(spec.paths, setting)
    self.records = _FileRecords(files, [_line_spans(f) for f in files])
    self.text_field = spec.text_field
    self.setting = setting
    super().__init__(f"{setting} (JSON Lines {list(spec.paths)})", self.records.ends - self.records.starts)

  def _read_one(self, index: int) -> str:
    line = self.records.get(index)
    try:
      text = json.loads(line)[self.text_field]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      where = self.records.files[int(self.records.file_of[index])]
      raise ValueError(f"{self.setting}: a line of {where} is not a JSON object with a string field "
                       f"{self.text_field!r} (text_field); fix the file or the setting. ({e!r})") from e
    if not isinstance(text, str):
      raise ValueError(f"{self.setting}: field {self.text_field!r} holds {type(text).__name__}, not text.")
    return text


def _tfrecord_spans(path: str, setting: str) -> tuple[np.ndarray, np.ndarray]:
  """(starts, ends) of the payloads of an uncompressed TFRecord file, from its record headers."""
  starts, ends = [], []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    if f.read(2) == b"\x1f\x8b":
      raise ValueError(f"{setting}: {path} is GZIP-compressed; random access needs uncompressed "
                       "TFRecord files.")
    offset = 0
    while offset < size:
      f.seek(offset)
      header = f.read(12)
      if len(header) < 12:
        raise ValueError(f"{setting}: {path} ends inside a record header; is it a TFRecord file?")
      (length,) = struct.unpack("<Q", header[:8])
      if offset + 16 + length > size:
        raise ValueError(f"{setting}: {path} has a record running past its end; is it a TFRecord file?")
      starts.append(offset + 12)
      ends.append(offset + 12 + length)
      offset += 16 + length
  return np.array(starts, np.int64), np.array(ends, np.int64)


class TFRecordSource(IndexedSource):
  """TFRecord files of serialised `tf.train.Example`s; the document is the bytes feature `text_feature`."""

  def __init__(self, files: list[str], text_feature: str, setting: str, description: str):
    self.records = _FileRecords(files, [_tfrecord_spans(f, setting) for f in files])
    self.text_feature = text_feature
    self.setting = setting
    super().__init__(description, self.records.ends - self.records.starts)

  def _read_one(self, index: int) -> str:
    example = tf.train.Example.FromString(self.records.get(index))
    feature = example.features.feature
    if self.text_feature not in feature or not feature[self.text_feature].bytes_list.value:
      raise ValueError(f"{self.setting}: a record has no bytes feature {self.text_feature!r}; it has "
                       f"{sorted(feature)}. Set the text feature name to one of them.")
    return feature[self.text_feature].bytes_list.value[0].decode("utf-8", errors="replace")


def tfds_source(spec: config.TfdsDataset, setting: str) -> TFRecordSource:
  """The TFRecord files of a prepared tfds split, read as a `TFRecordSource` (no download, no network)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    builder = tfds.builder(spec.name, data_dir=spec.data_dir)
  except Exception as e:  # tfds raises several types for "not found"
    raise FileNotFoundError(f"{setting}: tfds dataset {spec.name!r} is not available under data_dir="
                            f"{spec.data_dir!r}; prepare it there first ({e}).") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"{setting}: tfds dataset {spec.name!r} is not prepared under data_dir="
                            f"{spec.data_dir!r}; run its download_and_prepare there first.")
  if spec.split not in builder.info.splits:
    raise ValueError(f"{setting}: tfds dataset {spec.name!r} has splits {sorted(builder.info.splits)}, "
                     f"not {spec.split!r}.")
  file_format = str(getattr(builder.info, "file_format", "tfrecord"))
  if "tfrecord" not in file_format.lower():
    raise ValueError(f"{setting}: tfds dataset {spec.name!r} is stored as {file_format}; only TFRecord "
                     "datasets are supported.")
  files = [os.fspath(p) for p in builder.info.splits[spec.split].filepaths]
  return TFRecordSource(files, spec.text_field, setting,
                        f"{setting} (tfds {spec.name}, split {spec.split})")


def open_source(spec: config.Source, setting: str) -> IndexedSource:
  """The `IndexedSource` for a source spec; errors name `setting` (e.g. "curriculum.tasks['web']")."""
  source = _open(spec, setting)
  source.spec = spec
  return source


def _open(spec: config.Source, setting: str) -> IndexedSource:
  if isinstance(spec, config.CorpusDomain):
    return CorpusSource(spec.domain)
  if isinstance(spec, config.TextFiles):
    return TextSource(spec, setting)
  if isinstance(spec, config.JsonlFiles):
    return JsonlSource(spec, setting)
  if isinstance(spec, config.TFRecordFiles):
    files = expand_paths(spec.paths, setting)
    return TFRecordSource(files, spec.text_feature, setting, f"{setting} (TFRecord {list(spec.paths)})")
  if isinstance(spec, config.TfdsDataset):
    return tfds_source(spec, setting)
  raise ValueError(f"{setting}: {spec!r} is not a source.")
