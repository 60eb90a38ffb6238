"""Data settings as plain values, configurable from gin and cheap to import (no TensorFlow, no seqio).

A run's data is a `DataConfig`: the global batch, the sequence length, the seed and a `Curriculum`
(or the name of a preset, `"motif_embedded"`). A curriculum names its tasks, each a source of text
documents (or, in a curriculum of its own, of pre-tokenized token files), and gives stages of mixture
weights over tokens seen:

    train.data_mixture = @curriculum()
    curriculum.tasks = {'web': @web/jsonl_files(), 'code': @embedded/corpus_domain()}
    web/jsonl_files.paths = ['/data/web/*.jsonl']
    web/jsonl_files.text_field = 'text'
    embedded/corpus_domain.domain = 'code'
    curriculum.stages = [(0, {'web': 0.8, 'code': 0.2}), (1e12, {'web': 0.6, 'code': 0.4})]

Every error raised here names the setting and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence, Union

import gin

INTERPOLATIONS = ("linear", "step", "cosine")
TOKEN_DTYPES = ("uint16", "uint32")  # the id types of token files
EMBEDDED_DOMAINS = ("code", "prose", "math")  # the domains of motif_jax.data.corpus


# --- Sources: where a task's documents come from --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CorpusDomain:
  """One domain ("code", "prose" or "math") of the embedded offline corpus (`motif_jax.data.corpus`)."""

  domain: str


@dataclasses.dataclass(frozen=True)
class TextFiles:
  """UTF-8 text files (paths or globs). per_line: each non-empty line is a document; else each file."""

  paths: tuple[str, ...]
  per_line: bool = True


@dataclasses.dataclass(frozen=True)
class JsonlFiles:
  """JSON Lines files (paths or glob patterns); each line is an object whose `text_field` is the document."""

  paths: tuple[str, ...]
  text_field: str = "text"


@dataclasses.dataclass(frozen=True)
class TFRecordFiles:
  """Uncompressed TFRecord files of `tf.train.Example`s whose bytes feature `text_feature` is the document."""

  paths: tuple[str, ...]
  text_feature: str = "text"


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """A prepared tensorflow-datasets dataset (TFRecord format) under `data_dir`; `text_field` is the text."""

  name: str
  data_dir: str | None = None
  split: str = "train"
  text_field: str = "text"


@dataclasses.dataclass(frozen=True)
class TokenFiles:
  """Pre-tokenized token streams (motif_jax.data.token_files): `.npy` (1-D) or raw `.bin` files of `dtype`.

  vocab_size: ids lie in [0, vocab_size); it is the run's vocabulary (there is no tokenizer).
  eos_id: documents end after each `eos_id` (keeping it); None cuts the streams into row-long documents.
  """

  paths: tuple[str, ...]
  vocab_size: int
  dtype: str = "uint16"
  eos_id: int | None = None


Source = Union[CorpusDomain, TextFiles, JsonlFiles, TFRecordFiles, TfdsDataset, TokenFiles]
TEXT_SOURCES = (CorpusDomain, TextFiles, JsonlFiles, TFRecordFiles, TfdsDataset)  # read through seqio


def _paths(paths) -> tuple[str, ...]:
  return (paths,) if isinstance(paths, str) else tuple(paths)


@gin.configurable
def corpus_domain(domain: str = gin.REQUIRED) -> CorpusDomain:
  return CorpusDomain(domain)


@gin.configurable
def text_files(paths: Sequence[str] = gin.REQUIRED, per_line: bool = True) -> TextFiles:
  return TextFiles(_paths(paths), per_line)


@gin.configurable
def jsonl_files(paths: Sequence[str] = gin.REQUIRED, text_field: str = "text") -> JsonlFiles:
  return JsonlFiles(_paths(paths), text_field)


@gin.configurable
def tfrecord_files(paths: Sequence[str] = gin.REQUIRED, text_feature: str = "text") -> TFRecordFiles:
  return TFRecordFiles(_paths(paths), text_feature)


@gin.configurable
def tfds_dataset(name: str = gin.REQUIRED, data_dir: str | None = None, split: str = "train",
                 text_field: str = "text") -> TfdsDataset:
  return TfdsDataset(name, data_dir, split, text_field)


@gin.configurable
def token_files(paths: Sequence[str] = gin.REQUIRED, vocab_size: int = gin.REQUIRED, dtype: str = "uint16",
                eos_id: int | None = None) -> TokenFiles:
  return TokenFiles(_paths(paths), vocab_size, dtype, eos_id)


# --- The curriculum -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Tasks and a schedule of their mixture weights over tokens seen.

  tasks: (name, source) pairs; a name is a domain in metrics (`mixture/target/<name>`) and the seqio
    Task is registered as `motif_<name>`.
  stages: (tokens seen, weights) pairs, tokens strictly increasing from 0; weights map the tasks a stage
    draws from to finite weights > 0, normalised per stage; a task a stage does not name has weight 0
    there (so a domain can enter the schedule late or leave it). Between stage starts the weights are
    interpolated; after the last stage they stay.
  interpolation: "linear" (default), "step" (hold each stage until the next) or "cosine" (eased).
  vocabulary: "byte" (seqio.ByteVocabulary) or the path of a SentencePiece model (`.model` file), for
    text tasks. A curriculum of token files leaves it "byte": its vocabulary is `token_files.vocab_size`.
  vocab_pad_multiple: the vocabulary is padded to a multiple of this (and of the model's vocabulary
    shards) for the model's embedding.
  block_size: examples per block of the task draw (None: max(8, 2 x tasks)); each block holds the
    scheduled count of every task (to within one example), in shuffled order.
  fill: expected tokens per batch over the batch's capacity (rows x seq_len); it sets how many examples
    each batch takes. Below 1 leaves padding, above 1 drops tokens that do not fit.
  """

  tasks: tuple[tuple[str, Source], ...]
  stages: tuple[tuple[float, tuple[tuple[str, float], ...]], ...]
  interpolation: str = "linear"
  vocabulary: str = "byte"
  vocab_pad_multiple: int = 128
  block_size: int | None = None
  fill: float = 1.0

  @property
  def task_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.tasks)

  @property
  def reads_token_files(self) -> bool:
    """Whether the tasks read token files (then all of them do, and neither TF nor seqio is needed)."""
    return isinstance(self.tasks[0][1], TokenFiles)

  @property
  def examples_per_block(self) -> int:
    return self.block_size or max(8, 2 * len(self.tasks))

  def __post_init__(self):
    _validate(self)


def _validate(c: Curriculum) -> None:
  names = c.task_names
  if not names:
    raise ValueError("curriculum.tasks is empty; declare at least one task, e.g. "
                     "{'code': @code/corpus_domain()}.")
  if len(set(names)) != len(names):
    raise ValueError(f"curriculum.tasks names a task twice: {names}.")
  for name, source in c.tasks:
    if not name.replace("_", "").isalnum():
      raise ValueError(f"curriculum.tasks: task name {name!r} must be letters, digits and underscores.")
    if not isinstance(source, TEXT_SOURCES + (TokenFiles,)):
      raise ValueError(f"curriculum.tasks[{name!r}] = {source!r} is not a source; use corpus_domain(), "
                       "text_files(), jsonl_files(), tfrecord_files(), tfds_dataset() or token_files().")
    if isinstance(source, CorpusDomain) and source.domain not in EMBEDDED_DOMAINS:
      raise ValueError(f"curriculum.tasks[{name!r}]: unknown embedded corpus domain {source.domain!r}; "
                       f"choose one of {EMBEDDED_DOMAINS}.")
    if isinstance(source, (TextFiles, JsonlFiles, TFRecordFiles, TokenFiles)) and not source.paths:
      raise ValueError(f"curriculum.tasks[{name!r}] lists no paths.")
    if isinstance(source, TokenFiles):
      _validate_token_files(f"curriculum.tasks[{name!r}]", source)
  _validate_token_curriculum(c)
  if not c.stages:
    raise ValueError("curriculum.stages is empty; give at least one (tokens_seen, weights) stage.")
  previous = None
  for index, (tokens, weights) in enumerate(c.stages):
    where = f"curriculum.stages[{index}]"
    if not math.isfinite(tokens) or tokens < 0:
      raise ValueError(f"{where} starts at {tokens} tokens; stage starts must be finite and >= 0.")
    if index == 0 and tokens != 0:
      raise ValueError(f"{where} starts at {tokens:g} tokens; the first stage must start at 0.")
    if previous is not None and tokens <= previous:
      raise ValueError(f"Stages out of order: {where} starts at {tokens:g} tokens, not after "
                       f"curriculum.stages[{index - 1}] at {previous:g}; list stages by increasing "
                       "tokens seen.")
    previous = tokens
    weights = dict(weights)
    unknown = sorted(set(weights) - set(names))
    if unknown:
      raise ValueError(f"{where} weights unknown task(s) {unknown}; curriculum.tasks declares {list(names)}.")
    for name, weight in weights.items():
      if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{where} weight of task {name!r} is {weight}; weights must be finite and > 0. "
                         "To leave a task out of a stage, omit it from that stage's dict.")
    if not weights:
      raise ValueError(f"{where} weights no task; give at least one task a positive weight.")
  never = [n for n in names if all(n not in dict(w) for _, w in c.stages)]
  if never:
    raise ValueError(f"Task(s) {never} appear in no stage; give them a positive weight in at least one "
                     "stage or remove them from curriculum.tasks.")
  if c.interpolation not in INTERPOLATIONS:
    raise ValueError(f"curriculum.interpolation={c.interpolation!r}; choose one of {INTERPOLATIONS}.")
  if c.vocab_pad_multiple < 1:
    raise ValueError(f"curriculum.vocab_pad_multiple={c.vocab_pad_multiple} must be >= 1.")
  if c.block_size is not None and c.block_size < 2 * len(names):
    raise ValueError(f"curriculum.block_size={c.block_size} must be at least twice the number of tasks "
                     f"({len(names)}), so that every block holds examples.")
  if not 0.1 <= c.fill <= 4:
    raise ValueError(f"curriculum.fill={c.fill} must lie in [0.1, 4] (1.0 fills batches on average).")


def _validate_token_files(where: str, s: TokenFiles) -> None:
  if s.dtype not in TOKEN_DTYPES:
    raise ValueError(f"{where}: token_files.dtype={s.dtype!r}; choose one of {TOKEN_DTYPES}.")
  if isinstance(s.vocab_size, bool) or not isinstance(s.vocab_size, int) or s.vocab_size < 2:
    raise ValueError(f"{where}: token_files.vocab_size={s.vocab_size!r}; give the tokenizer's number of ids "
                     "(an int >= 2).")
  limit = 1 << (8 * (2 if s.dtype == "uint16" else 4))
  if s.vocab_size > limit:
    raise ValueError(f"{where}: token_files.vocab_size={s.vocab_size} needs ids beyond dtype={s.dtype!r} "
                     f"(below {limit:,}); write the files as uint32 and set dtype='uint32'.")
  if s.eos_id is not None and (isinstance(s.eos_id, bool) or not isinstance(s.eos_id, int)
                               or not 0 <= s.eos_id < s.vocab_size):
    raise ValueError(f"{where}: token_files.eos_id={s.eos_id!r} must be an id in [0, vocab_size="
                     f"{s.vocab_size}), or None to cut the streams into row-long documents.")


def _validate_token_curriculum(c: Curriculum) -> None:
  """Token-file tasks: all or none of a curriculum, with one vocabulary size."""
  token = [name for name, source in c.tasks if isinstance(source, TokenFiles)]
  if not token:
    return
  text = [name for name in c.task_names if name not in token]
  if text:
    raise ValueError(f"curriculum.tasks mixes token-file tasks {token} with text tasks {text}; a curriculum "
                     "reads either token files or text: tokenize the text tasks into token files (README, "
                     "Data) or train on them in a run of their own.")
  sizes = {name: source.vocab_size for name, source in c.tasks}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"curriculum.tasks: the token-file tasks declare different vocab_size {sizes}; they "
                     "must come from one tokenizer: give every token_files.vocab_size its number of ids.")
  if c.vocabulary != "byte":
    raise ValueError(f"curriculum.vocabulary={c.vocabulary!r} names a tokenizer for text tasks, but the "
                     "tasks are token files (their vocabulary is token_files.vocab_size): remove the "
                     "binding.")


@gin.configurable
def curriculum(tasks: Mapping[str, Source] = gin.REQUIRED,
               stages: Sequence[tuple[float, Mapping[str, float]]] = gin.REQUIRED, *,
               interpolation: str = "linear", vocabulary: str = "byte", vocab_pad_multiple: int = 128,
               block_size: int | None = None, fill: float = 1.0) -> Curriculum:
  """Builds a `Curriculum` from gin-friendly dicts (see `Curriculum` for the fields)."""
  if not isinstance(tasks, Mapping):
    raise ValueError(f"curriculum.tasks must be a dict of task name -> source, not {type(tasks).__name__}.")
  frozen_stages = []
  for index, stage in enumerate(stages):
    if len(stage) != 2 or not isinstance(stage[1], Mapping):
      raise ValueError(f"curriculum.stages[{index}] = {stage!r}; a stage is (tokens_seen, {{task: weight}}).")
    frozen_stages.append((float(stage[0]), tuple((str(k), float(v)) for k, v in stage[1].items())))
  return Curriculum(tuple(tasks.items()), tuple(frozen_stages), interpolation=interpolation,
                    vocabulary=vocabulary, vocab_pad_multiple=vocab_pad_multiple, block_size=block_size,
                    fill=fill)


# Fixed per-example weights over the embedded corpus: roughly the domains' sizes, code a little ahead.
EMBEDDED_WEIGHTS = {"code": 0.45, "prose": 0.3, "math": 0.25}
PRESETS = {
    "motif_embedded": Curriculum(
        tasks=tuple((d, CorpusDomain(d)) for d in EMBEDDED_DOMAINS),
        stages=((0.0, tuple(EMBEDDED_WEIGHTS.items())),)),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the trainer asks of the data.

  batch_size: global batch (rows) across all processes.
  seq_len: tokens per row.
  seed: draws, shuffles and permutations derive from it.
  mixture: a `Curriculum`, or the name of a preset in `PRESETS` ("motif_embedded": the embedded corpus
    at fixed weights).
  """

  batch_size: int
  seq_len: int
  seed: int = 0
  mixture: Union[str, Curriculum] = "motif_embedded"

  @property
  def curriculum(self) -> Curriculum:
    return as_curriculum(self.mixture)


def as_curriculum(mixture: Union[str, Curriculum], setting: str = "DataConfig.mixture") -> Curriculum:
  """`mixture` itself, or the preset it names."""
  if isinstance(mixture, Curriculum):
    return mixture
  if mixture not in PRESETS:
    raise ValueError(f"{setting}={mixture!r} is neither a curriculum nor a preset; use one of "
                     f"{sorted(PRESETS)} or bind train.data_mixture = @curriculum().")
  return PRESETS[mixture]


def gin_value(name: str, default=None):
  """The value gin binds to `name` (e.g. "train.seq_len"), macros and @calls evaluated; else `default`."""
  try:
    value = gin.query_parameter(name)
  except ValueError:
    return default
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value
