"""Look at a run's data before training on it.

    python -m motif_jax.data.inspect --gin_file=gin_configs/experiments/curriculum_smoke.gin \\
        [--gin_param=...] [--batch_size=16 --seq_len=2048] [--batches=50]

reads the data settings the trainer would use (train.batch_size, train.seq_len, train.seed,
train.data_mixture) from the gin files, overridable by flags, and prints:
* the tasks: source, documents, examples per epoch, tokens per example, tokens per byte;
* the schedule: stages, and the examples per batch and weights at each stage start;
* a few decoded examples of every task;
* packing: non-padding share of the rows and share of tokens dropped, over `--batches` batches;
* throughput of the whole pipeline (read, tokenize, pack, convert) in tokens per second.
"""

from __future__ import annotations

import itertools
import time

import gin
import numpy as np
from absl import app, flags

from motif_jax import train as train_cli  # defines --gin_file and --gin_param
from motif_jax.data import examples as examples_lib
from motif_jax.data.config import DataConfig, gin_value
from motif_jax.data.pipeline import TrainData, make_train_data

flags.declare_key_flag("gin_file")  # listed by --help with this module's own flags
flags.declare_key_flag("gin_param")

_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global rows per batch (default: train.batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Tokens per row (default: train.seq_len).")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches to pack and to time.")
_EXAMPLES = flags.DEFINE_integer("examples_per_task", 2, "Decoded examples shown per task.")
_CHARS = flags.DEFINE_integer("chars", 300, "Characters shown of each decoded example.")


def describe_tasks(data: TrainData) -> str:
  lines = [f"{'task':10s} {'documents':>10s} {'examples/epoch':>15s} {'tokens/example':>15s} "
           f"{'tokens/byte':>12s}  source"]
  for name, stream in zip(data.task_names, data.streams):
    source = data.sources[name]
    lines.append(f"{name:10s} {len(source):10,d} {stream.per_epoch:15,d} {stream.mean_tokens:15.1f} "
                 f"{stream.tokens_per_byte:12.3f}  {source.description}")
  return "\n".join(lines)


def describe_schedule(data: TrainData) -> str:
  plan, tokens_per_batch = data.plan, data.cfg.batch_size * data.cfg.seq_len
  lines = [plan.schedule.describe(tokens_per_batch), "",
           "batch (step)  tokens seen   examples/batch  weights"]
  for start in plan.schedule.starts:
    batch = int(np.ceil(start / tokens_per_batch))
    weights = " ".join(f"{n} {w:.3f}" for n, w in zip(data.task_names, plan.target_weights(batch)))
    lines.append(f"{batch:12,d}  {batch * tokens_per_batch:11.4g}  {plan.batch_size(batch):14d}  {weights}")
  return "\n".join(lines)


def decoded_examples(data: TrainData, per_task: int, chars: int) -> str:
  """The first `per_task` examples of every task, decoded (the start of each, `chars` characters);
  for token files, which have no vocabulary to decode with, the first ids of each."""
  lines = []
  for task, (name, stream) in enumerate(zip(data.task_names, data.streams)):
    document, piece, pieces = stream.locate(np.arange(per_task))
    for d, p, n in zip(document, piece, pieces):
      tokens = _example_tokens(data, name, int(d), int(p), int(n))
      shown = (data.vocab.decode(tokens.tolist())[:chars] if data.vocab is not None
               else "ids " + " ".join(str(t) for t in tokens[:chars // 6].tolist()))
      lines.append(f"--- {name} example: document {d}, piece {p + 1} of {n}, {len(tokens)} tokens "
                   f"(task {task}) ---\n{shown}")
  return "\n".join(lines)


def _example_tokens(data: TrainData, name: str, document: int, piece: int, pieces: int) -> np.ndarray:
  """int [tokens]: one example's tokens, as the pipeline feeds them."""
  source = data.sources[name]
  if data.vocab is None:  # token files: the ids themselves
    return source.piece(document, piece, pieces)
  from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel  (loaded with the data)
  return examples_lib.cut(tasks.encode(data.vocab, source.read([document])[0]), piece, pieces)


def packing_report(data: TrainData, batches: int) -> tuple[float, float]:
  """(non-padding share of the rows, share of tokens dropped) over this process's first `batches`."""
  used = dropped = 0
  for batch in range(batches):
    rows = data.host_batch(batch)
    used += int((rows.segment_ids > 0).sum())
    dropped += rows.dropped
  return used / (batches * data.rows * data.cfg.seq_len), dropped / max(1, used + dropped)


def throughput(data: TrainData, batches: int, start: int) -> tuple[float, float]:
  """(token slots per second, non-padding tokens per second) of `batches()` from batch `start`."""
  stream = data.batches(start)
  next(stream)  # builds the tf.data pipeline
  began, real = time.perf_counter(), 0.0
  for batch in itertools.islice(stream, batches):
    real += float(batch["loss_weights"].sum())
  seconds = time.perf_counter() - began
  return batches * data.rows * data.cfg.seq_len / seconds, real / seconds


def main(argv):
  del argv
  from motif_jax import trainer  # pylint: disable=import-outside-toplevel,unused-import  (registers train)

  gin.add_config_file_search_path(train_cli.GIN_SEARCH_PATH)
  gin.parse_config_files_and_bindings(train_cli.GIN_FILES.value, train_cli.GIN_PARAMS.value)
  cfg = DataConfig(batch_size=_BATCH_SIZE.value or gin_value("train.batch_size"),
                   seq_len=_SEQ_LEN.value or gin_value("train.seq_len"),
                   seed=gin_value("train.seed", 0),
                   mixture=gin_value("train.data_mixture", "motif_embedded"))
  if not cfg.batch_size or not cfg.seq_len:
    raise app.UsageError("Set --batch_size and --seq_len, or give a gin file that binds train.batch_size "
                         "and train.seq_len.")
  began = time.perf_counter()
  data = make_train_data(cfg)
  print(f"batch_size {cfg.batch_size}, seq_len {cfg.seq_len}, seed {cfg.seed}; vocabulary "
        f"{data.cfg.curriculum.vocabulary!r}: {data.vocab_size} ids; set up in "
        f"{time.perf_counter() - began:.1f} s\n")
  print(describe_tasks(data), "\n")
  print(describe_schedule(data), "\n")
  print(decoded_examples(data, _EXAMPLES.value, _CHARS.value), "\n")
  efficiency, dropped = packing_report(data, _BATCHES.value)
  print(f"packing over {_BATCHES.value} batches of {cfg.batch_size} x {cfg.seq_len}: "
        f"{100 * efficiency:.1f}% non-padding tokens, {100 * dropped:.2f}% of tokens dropped (fill "
        f"{data.cfg.curriculum.fill})")
  slots, real = throughput(data, _BATCHES.value, start=_BATCHES.value)
  print(f"pipeline throughput (read, tokenize, pack, convert; {_BATCHES.value} batches): "
        f"{slots:,.0f} tokens/s ({real:,.0f} non-padding tokens/s)")


if __name__ == "__main__":
  app.run(main)
