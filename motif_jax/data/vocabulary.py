"""Vocabularies: load one by name or path, pad its size for the model, check the model against it.

A curriculum names its vocabulary with `curriculum.vocabulary`: "byte" (`seqio.ByteVocabulary`: 259
ids, pad 0, eos 1, unk 2, byte b -> b + 3) or the path of a SentencePiece model, e.g. one trained by
`python -m motif_jax.data.tokenizer train`.
"""

from __future__ import annotations

import math
import os

from absl import logging

BYTE = "byte"


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  """`vocab_size` rounded up to a multiple of `multiple`."""
  return -(-vocab_size // multiple) * multiple


def check_model_vocab(model_vocab_size: int, data_vocab_size: int, *, pad_multiple: int,
                      shards: int = 1) -> int:
  """Checks `ModelConfig.vocab_size` against the data's vocabulary; returns the padded size it should be.

  The data's vocabulary is padded to a multiple of lcm(pad_multiple, shards), `shards` being how many
  ways the mesh splits the vocabulary axis. A model vocabulary smaller than that cannot embed every id
  (or cannot be sharded) and raises; a larger one works and only logs a warning (unused rows).
  """
  multiple = math.lcm(pad_multiple, shards)
  padded = padded_vocab_size(data_vocab_size, multiple)
  fix = (f"set train.model_overrides = {{'vocab_size': {padded}}} (or point curriculum.vocabulary at "
         "the tokenizer the model was built for)")
  if model_vocab_size < data_vocab_size:
    raise ValueError(f"Vocabulary size mismatch: ModelConfig.vocab_size={model_vocab_size} is smaller than "
                     f"the data's vocabulary ({data_vocab_size} ids, padded to {padded}, a multiple of "
                     f"{multiple}); {fix}.")
  if model_vocab_size % multiple:
    raise ValueError(f"Vocabulary size mismatch: ModelConfig.vocab_size={model_vocab_size} is not a multiple "
                     f"of {multiple} (curriculum.vocab_pad_multiple={pad_multiple} and {shards} vocabulary "
                     f"shards); {fix}.")
  if model_vocab_size > padded:
    logging.warning("ModelConfig.vocab_size=%d exceeds the data's padded vocabulary (%d); %d embedding "
                    "rows will never be used.", model_vocab_size, padded, model_vocab_size - padded)
  return padded


def load_vocabulary(spec: str, setting: str = "curriculum.vocabulary"):
  """The seqio vocabulary named by `spec`: "byte" or the path of a SentencePiece .model file."""
  import seqio  # pylint: disable=import-outside-toplevel

  if spec == BYTE:
    return seqio.ByteVocabulary()
  if not os.path.isfile(os.path.expanduser(spec)):
    raise FileNotFoundError(
        f"{setting}={spec!r}: no such SentencePiece model file. Use 'byte', an existing .model file, or "
        "train one: python -m motif_jax.data.tokenizer train --gin_file=... --output=PREFIX")
  vocab = seqio.SentencePieceVocabulary(os.path.expanduser(spec))
  processor = vocab.tokenizer
  if processor.eos_id() < 0:
    raise ValueError(f"{setting}={spec!r}: the SentencePiece model has no end-of-sequence id; retrain it "
                     "with eos_id set (this module's `train` uses eos 1).")
  if processor.pad_id() != 0 and processor.unk_id() != 0:
    raise ValueError(f"{setting}={spec!r}: id 0 is the piece {processor.id_to_piece(0)!r}, but seqio and "
                     "the packed batches treat id 0 as padding; use a model whose id 0 is pad (or unk).")
  return vocab
