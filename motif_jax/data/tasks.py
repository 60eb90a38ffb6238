"""seqio Tasks over the embedded corpus: one Task per domain and a Mixture over them with fixed rates.

Importing this module imports TensorFlow and seqio (several seconds) and hides every GPU from TensorFlow,
so that tf.data never takes accelerator memory from JAX. `motif_jax.data` imports it lazily.

Each Task yields examples {"targets": int32 [length]} with length <= the requested
`sequence_length["targets"]`: a document is byte-tokenized (`seqio.ByteVocabulary`: 259 ids, pad 0,
eos 1, byte b -> b + 3), EOS is appended, and the result is cut into consecutive pieces of at most that
length, so long documents are split rather than truncated.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

from absl import logging
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices; nothing left to change.
  logging.warning("TensorFlow was initialised before motif_jax.data.tasks; it may hold GPU memory.")

import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

from motif_jax.data import corpus  # pylint: disable=wrong-import-position

MIXTURE_NAME = "motif_embedded"
TASK_NAMES = {domain: f"{MIXTURE_NAME}_{domain}" for domain in corpus.DOMAINS}
# Rates are per example (document piece); roughly the domains' sizes, with code a little ahead.
MIXTURE_RATES = {"code": 0.45, "prose": 0.3, "math": 0.25}
SHUFFLE_BUFFER_SIZE = 1024  # document pieces, per Task and process; documents are also reshuffled per epoch


def vocabulary() -> seqio.Vocabulary:
  """The byte-level vocabulary: vocab_size 259, pad 0, eos 1, unk 2, byte b -> id b + 3."""
  return seqio.ByteVocabulary()


class CorpusSource(seqio.DataSource):
  """The documents of one corpus domain as {"targets": tf.string} examples.

  Sharding is exact and at the document level: shard i of n holds documents i, i + n, i + 2n, ... of the
  domain, so shards are disjoint, and a process materialises only its own shard. With `shuffle`, the
  shard's documents come in a new order every epoch (a deterministic function of `seed`).
  """

  def __init__(self, domain: str):
    super().__init__(splits=("train",), caching_permitted=False)
    self.domain = domain

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> list[str]:
    return [split]

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None, use_cached=False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # Tasks repeat and trim; the source only reads.
    if split not in self.splits:
      raise ValueError(f"The embedded corpus has only the splits {self.splits}, not {split!r}.")
    docs = corpus.documents(self.domain)
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    if len(docs) < count:
      raise ValueError(
          f"Corpus domain {self.domain!r} has {len(docs)} documents, fewer than the {count} shards asked "
          f"for (process_count); the embedded corpus supports at most {len(docs)} processes.")
    shard = docs[index::count]
    ds = tf.data.Dataset.from_tensor_slices({"targets": tf.constant(shard, dtype=tf.string)})
    if shuffle:
      ds = ds.shuffle(len(shard), seed=seed, reshuffle_each_iteration=True)
    return ds


def split_to_length(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]] = None) -> tf.data.Dataset:
  """Cuts each "targets" int32 [n] into consecutive pieces [<= L], L = sequence_length["targets"]."""
  if not sequence_length or not sequence_length.get("targets"):
    return dataset
  limit = sequence_length["targets"]

  def pieces(example):
    tokens = example["targets"]
    size = tf.size(tokens)
    starts = tf.range(0, size, limit)
    lengths = tf.minimum(limit, size - starts)
    return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_lengths(tokens, lengths)})

  return dataset.flat_map(pieces)


def register_tasks() -> str:
  """Registers the domain Tasks and the Mixture (idempotent) and returns the Mixture's name."""
  output_features = {"targets": seqio.Feature(vocabulary(), add_eos=True, dtype=tf.int32)}
  preprocessors = [
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos,
      split_to_length,
  ]
  registered = set(seqio.TaskRegistry.names())
  for domain, name in TASK_NAMES.items():
    if name not in registered:
      seqio.TaskRegistry.add(name, source=CorpusSource(domain), output_features=output_features,
                             preprocessors=preprocessors, shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
  if MIXTURE_NAME not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(MIXTURE_NAME, [(TASK_NAMES[d], rate) for d, rate in MIXTURE_RATES.items()])
  return MIXTURE_NAME
