"""The pipeline's batches (layout, packing, determinism, resume), the seqio Tasks and the embedded corpus."""

import re
import subprocess
import sys

import numpy as np
import pytest

from motif_jax.data import DOMAINS, DataConfig, documents, make_train_data
from batches import KEYS, assert_same, take  # tests/batches.py

CFG = DataConfig(batch_size=8, seq_len=512, seed=0)
NUM_BATCHES = 6


@pytest.fixture(scope="module")
def data():
  return make_train_data(CFG)


@pytest.fixture(scope="module")
def batches(data):
  """The first NUM_BATCHES batches of CFG on one process."""
  return take(data, 0, NUM_BATCHES)


def test_import_is_light():
  code = "import sys, motif_jax.data; assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_shapes_dtypes_and_vocab(data, batches):
  assert data.vocab_size == 259
  for batch in batches:
    assert sorted(batch) == sorted(KEYS)
    for key in KEYS:
      assert batch[key].shape == (CFG.batch_size, CFG.seq_len), key
      assert batch[key].dtype == (np.float32 if key == "loss_weights" else np.int32), key
    for key in ("inputs", "targets"):
      assert batch[key].min() >= 0 and batch[key].max() < data.vocab_size


def test_packing_structure(batches):
  for batch in batches:
    real = batch["segment_ids"] > 0
    np.testing.assert_array_equal(batch["loss_weights"], real.astype(np.float32))
    np.testing.assert_array_equal(batch["targets"] > 0, real)  # pad id 0 only on padding
    for row in range(CFG.batch_size):
      seg, pos = batch["segment_ids"][row], batch["positions"][row]
      tgt, inp = batch["targets"][row], batch["inputs"][row]
      n_real = int(real[row].sum())
      assert real[row, :n_real].all() and not real[row, n_real:].any(), "padding only at the end"
      assert not pos[n_real:].any()
      starts = np.flatnonzero(np.diff(seg[:n_real], prepend=0))
      np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))  # ids 1, 2, 3, ...
      for begin, end in zip(starts, list(starts[1:]) + [n_real]):
        np.testing.assert_array_equal(pos[begin:end], np.arange(end - begin))
        assert inp[begin] == 0
        np.testing.assert_array_equal(inp[begin + 1:end], tgt[begin:end - 1])


def test_packing_efficiency(batches):
  efficiency = float(np.mean([b["loss_weights"].mean() for b in batches]))
  print(f"packing efficiency at seq_len {CFG.seq_len}: {efficiency:.3f}")
  assert efficiency > 0.9


def test_batches_draw_from_every_domain(batches):
  text = b"".join(bytes((row[row >= 3] - 3).astype(np.uint8)) for b in batches for row in b["targets"])
  assert b"Answer: " in text and b"def " in text and b"    " in text


def test_deterministic_across_builds(batches):
  assert_same(take(make_train_data(CFG), 0, NUM_BATCHES), batches)


def test_resume_by_index(data, batches):
  assert_same(take(data, 3, NUM_BATCHES - 3), batches[3:])  # a second batches() call starts anew
  assert not np.array_equal(batches[0]["targets"], batches[3]["targets"])


def test_tasks_yield_the_tokens_the_pipeline_uses(data):
  """seqio.get_dataset on a Task yields what `tasks.encode` gives the pipeline for the same document."""
  import seqio  # pylint: disable=import-outside-toplevel  (loaded by the fixture)
  from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel

  ds = seqio.get_dataset("motif_math", task_feature_lengths={"targets": 1 << 16}, dataset_split="train",
                         shuffle=False, num_epochs=1, feature_converter=seqio.PassThroughFeatureConverter())
  for document, example in zip(documents("math")[:5], ds.as_numpy_iterator()):
    np.testing.assert_array_equal(example["targets"], tasks.encode(data.vocab, document))
  assert tasks.encode(data.vocab, "hi").tolist() == [107, 108, 1]


def test_registration_is_idempotent(data):
  from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel  (TF is loaded by now)

  _, first = tasks.register(CFG.curriculum)
  _, second = tasks.register(CFG.curriculum)
  assert all(first[name] is second[name] is data.sources[name] for name in data.task_names)


def test_source_shards_and_reshuffles_each_epoch(data):
  import seqio  # pylint: disable=import-outside-toplevel  (loaded by the fixture)

  source = data.sources["math"]
  shard = documents("math")[1::2]
  ds = source.get_dataset(shuffle=True, seed=0, shard_info=seqio.ShardInfo(index=1, num_shards=2),
                          num_epochs=2)
  texts = [example["text"].decode() for example in ds.as_numpy_iterator()]
  first_epoch, second_epoch = texts[:len(shard)], texts[len(shard):]
  assert sorted(first_epoch) == sorted(second_epoch) == sorted(shard)
  assert first_epoch != second_epoch
  with pytest.raises(ValueError, match="fewer than the"):
    source.get_dataset(shard_info=seqio.ShardInfo(index=0, num_shards=len(documents("math")) + 1))


def test_corpus_domains():
  for domain in DOMAINS:
    docs = documents(domain)
    assert len(docs) >= 50 and all(doc.strip() for doc in docs), domain
    assert len(set(docs)) == len(docs), domain
  assert all(doc.startswith("# Lib/") for doc in documents("code"))
  assert any(doc.startswith("Python language reference: ") for doc in documents("prose"))
  assert any(doc.startswith("Module ") for doc in documents("prose"))
  total = sum(len(doc) for domain in DOMAINS for doc in documents(domain))
  assert 2_000_000 < total < 8_000_000


_ARITHMETIC = re.compile(r"^[\d\s()+*-]+$")


def _evaluate(expression):
  assert _ARITHMETIC.match(expression), expression
  return eval(expression, {"__builtins__": {}})  # pylint: disable=eval-used  (digits and + - * ( ) only)


def _check_problem(block):
  lines = block.splitlines()
  question = lines[0].removeprefix("Problem: ")
  answer = lines[-1].removeprefix("Answer: ")
  assert lines[1] == "Solution:" and lines[-1].startswith("Answer: "), block
  for line in lines[2:-1]:  # every indented arithmetic chain holds
    if line.startswith("  ") and _ARITHMETIC.match(line.replace(" = ", " ")):
      values = {_evaluate(part) for part in line.split(" = ")}
      assert len(values) == 1, line
  if match := re.fullmatch(r"What is (.+)\?", question):
    assert _evaluate(match[1]) == int(answer), block
    return "expression"
  if match := re.fullmatch(r"Divide (\d+) by (\d+)\. Give the quotient and the remainder\.", question):
    dividend, divisor = int(match[1]), int(match[2])
    quotient, remainder = map(int, re.fullmatch(r"quotient (\d+), remainder (\d+)", answer).groups())
    assert dividend == divisor * quotient + remainder and 0 <= remainder < divisor, block
    return "division"
  if match := re.fullmatch(r"Solve for x: (\d+) \* x ([+-]) (\d+) = (-?\d+)\.", question):
    x = int(answer.removeprefix("x = "))
    assert _evaluate(f"{match[1]} * ({x}) {match[2]} {match[3]}") == int(match[4]), block
    return "equation"
  raise AssertionError(f"unrecognised problem: {question}")


def test_math_answers_are_correct():
  docs = documents("math")
  kinds = []
  for doc in docs[:40]:
    header, *blocks = doc.strip().split("\n\n")
    assert header.startswith("Arithmetic practice, worksheet ")
    kinds.extend(_check_problem(block) for block in blocks)
  assert set(kinds) == {"expression", "division", "equation"}
  assert len(kinds) >= 160
