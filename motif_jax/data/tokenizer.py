"""Train a SentencePiece tokenizer on the configured sources.

    python -m motif_jax.data.tokenizer train --gin_file=gin_configs/data/embedded_curriculum.gin \\
        --output=/tmp/spm/embedded --vocab_size=4096

reads the documents of the tasks of `train.data_mixture` as the gin files configure it (the embedded
corpus when it is not bound), trains a SentencePiece model on them and writes OUTPUT.model and OUTPUT.vocab.
Point a curriculum at it with `curriculum.vocabulary = '/tmp/spm/embedded.model'` and set the model's
vocab_size to the padded size it prints; `motif_jax.data.vocabulary` loads it (or any SentencePiece
model whose id 0 is padding or unknown and that has an end-of-sequence id).

The model follows seqio's conventions (pad 0, eos 1, unk 2, no bos), falls back to bytes for unseen
characters, keeps whitespace and newlines as they are (code needs them) and splits digits.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator

import gin
from absl import app, flags

from motif_jax import train as train_cli  # defines --gin_file and --gin_param
from motif_jax.data import config, sources, vocabulary

flags.declare_key_flag("gin_file")  # listed by --help with this module's own flags
flags.declare_key_flag("gin_param")


def _documents(curriculum: config.Curriculum, max_chars_per_task: int) -> Iterator[str]:
  """Documents of each task, every stride-th first so that the cap still spans the source."""
  for name, spec in curriculum.tasks:
    source = sources.open_source(spec, f"curriculum.tasks[{name!r}]")
    budget = max_chars_per_task
    stride = max(1, int(source.sizes.sum()) // max_chars_per_task + 1)
    for index in itertools.chain.from_iterable(range(s, len(source), stride) for s in range(stride)):
      text = source.read([index])[0]
      yield text
      budget -= len(text)
      if budget <= 0:
        break


def _sentences(documents: Iterator[str], max_bytes: int) -> Iterator[str]:
  """Documents cut into pieces of at most `max_bytes` UTF-8 bytes, at line breaks where possible."""
  for doc in documents:
    while len(doc.encode("utf-8")) > max_bytes:
      cut = doc.rfind("\n", 0, max_bytes // 4) + 1 or max_bytes // 4  # a quarter: safe for any UTF-8
      yield doc[:cut]
      doc = doc[cut:]
    if doc:
      yield doc


def train(output: str, curriculum: config.Curriculum, *, vocab_size: int, model_type: str = "bpe",
          max_chars_per_task: int = 20_000_000, character_coverage: float = 0.9995,
          num_threads: int = 2) -> str:
  """Trains a SentencePiece model on the curriculum's tasks; returns the path of OUTPUT.model."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  max_bytes = 16384
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=_sentences(_documents(curriculum, max_chars_per_task), max_bytes),
      model_prefix=output, vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      allow_whitespace_only_pieces=True, user_defined_symbols=["\n"], max_sentence_length=max_bytes,
      num_threads=num_threads, minloglevel=1)
  return output + ".model"


_OUTPUT = flags.DEFINE_string("output", None, "Model prefix: writes OUTPUT.model and OUTPUT.vocab.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Number of ids, special ids and bytes included.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece algorithm.")
_MAX_CHARS = flags.DEFINE_integer("max_chars_per_task", 20_000_000, "Training text taken from each task.")


def main(argv):
  if len(argv) != 2 or argv[1] != "train":
    raise app.UsageError("usage: python -m motif_jax.data.tokenizer train --output=PREFIX "
                         "[--gin_file=...] [--gin_param=...] [--vocab_size=N]")
  if not _OUTPUT.value:
    raise app.UsageError("--output=PREFIX is required (writes PREFIX.model and PREFIX.vocab).")
  from motif_jax import trainer  # pylint: disable=import-outside-toplevel,unused-import  (registers train)

  gin.add_config_file_search_path(train_cli.GIN_SEARCH_PATH)
  gin.parse_config_files_and_bindings(train_cli.GIN_FILES.value, train_cli.GIN_PARAMS.value)
  curriculum = config.as_curriculum(config.gin_value("train.data_mixture", "motif_embedded"),
                                    "train.data_mixture")
  path = train(_OUTPUT.value, curriculum, vocab_size=_VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
               max_chars_per_task=_MAX_CHARS.value)
  size = vocabulary.load_vocabulary(path, "--output").vocab_size
  print(f"wrote {path}: {size} ids. Set curriculum.vocabulary = {path!r} and the model's vocab_size to "
        f"{vocabulary.padded_vocab_size(size, 128)} (padded to a multiple of 128).")


if __name__ == "__main__":
  app.run(main)
