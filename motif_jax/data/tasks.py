"""seqio Tasks for a curriculum's sources, all with the same preprocessing: tokenize, append EOS.

Importing this module imports TensorFlow and seqio (several seconds) and hides every GPU from TensorFlow,
so that tf.data never takes accelerator memory from JAX. `motif_jax.data` imports it lazily.

Task `motif_<name>` reads the source of curriculum task `<name>` and yields {"targets": int32 [n + 1]}:
the document's tokens followed by EOS. `seqio.get_dataset("motif_code", ...)` works as for any Task.
The curriculum pipeline reads the same sources by index and tokenizes with `encode`, which gives the same
tokens as the Task's preprocessors (tests check this).
"""

from __future__ import annotations

import functools

import numpy as np
from absl import logging
import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices; nothing left to change.
  logging.warning("TensorFlow was initialised before motif_jax.data.tasks; it may hold GPU memory.")

import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position

from motif_jax.data import config, sources, vocabulary  # pylint: disable=wrong-import-position

SHUFFLE_BUFFER_SIZE = 1024  # documents, per Task and process, for seqio.get_dataset users

# The shared preprocessing of every Task: the source's "text" becomes "targets", tokenized, then EOS.
PREPROCESSORS = (
    functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
    functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
    seqio.preprocessors.append_eos,
)


def task_name(name: str) -> str:
  return f"motif_{name}"


def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}


def encode(vocab: seqio.Vocabulary, text: str) -> np.ndarray:
  """int32 [n + 1]: `text` tokenized by `vocab`, then EOS, as the Tasks' preprocessors produce it."""
  return np.array(vocab.encode(text) + [vocab.eos_id], dtype=np.int32)


def register(curriculum: config.Curriculum) -> tuple[seqio.Vocabulary, dict[str, sources.IndexedSource]]:
  """Opens the curriculum's sources and (re)registers their Tasks; returns the vocabulary and the sources.

  A Task already registered under the same name is replaced when its source or vocabulary differ (with
  a warning), so the latest configuration wins, as with gin.
  """
  vocab = vocabulary.load_vocabulary(curriculum.vocabulary)
  features = output_features(vocab)
  opened = {}
  for name, spec in curriculum.tasks:
    full_name = task_name(name)
    if full_name in seqio.TaskRegistry.names():
      existing = seqio.TaskRegistry.get(full_name)
      if getattr(existing.source, "spec", None) == spec and existing.output_features == features:
        opened[name] = existing.source
        continue
      logging.warning("Replacing seqio Task %s: its source is now %r.", full_name, spec)
      seqio.TaskRegistry.remove(full_name)
    opened[name] = sources.open_source(spec, f"curriculum.tasks[{name!r}]")
    seqio.TaskRegistry.add(full_name, source=opened[name], output_features=features,
                           preprocessors=list(PREPROCESSORS), shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
  return vocab, opened


class PackedLMFeatureConverter(seqio.LMFeatureConverter):
  """seqio's LM feature converter for rows that `packing.pack` has already packed.

  Input rows carry "targets", "targets_segment_ids" and "targets_positions" (int32 [seq_len]), the
  layout seqio's own packing produces; the converter adds the decoder inputs (targets shifted right
  within each segment), loss weights and the `decoder_*` names. seqio's packing is not used: it packs a
  stream across batch boundaries, so batch k would depend on every earlier batch.
  """

  def __init__(self):
    super().__init__(pack=True)

  def _pack_or_pad(self, ds: tf.data.Dataset, packed_lengths) -> tf.data.Dataset:
    del packed_lengths  # rows arrive packed to seq_len
    return ds
