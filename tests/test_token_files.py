"""Token-file tasks: the streams' tokens in packed order, resume, host slices, no TF, errors, training."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from motif_jax.data import DataConfig, make_train_data
from motif_jax.data import config as data_config
from motif_jax.data import packing, pipeline
from batches import assert_same, take  # tests/batches.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, EOS = 1000, 3


def _stream(seed, size, vocab=VOCAB, eos=EOS, doc_tokens=30):
  """Random ids in [1, vocab) (never 0), with EOS after about every `doc_tokens` tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size)
  ids[ids == eos] = eos + 1
  ids[rng.random(size) < 1 / doc_tokens] = eos
  return ids


def _write(tmp_path):
  """Task 'web': two raw uint16 .bin files; task 'code': one uint32 .npy file. Returns streams, tasks."""
  streams = {"web": [_stream(1, 3000), _stream(2, 2001)], "code": [_stream(3, 4000)]}
  (tmp_path / "web").mkdir()
  for i, ids in enumerate(streams["web"]):
    np.asarray(ids, np.uint16).tofile(tmp_path / "web" / f"part_{i}.bin")
  np.save(tmp_path / "code.npy", np.asarray(streams["code"][0], np.uint32))
  tasks = {"web": data_config.token_files([str(tmp_path / "web" / "*.bin")], VOCAB, eos_id=EOS),
           "code": data_config.token_files(str(tmp_path / "code.npy"), VOCAB, dtype="uint32", eos_id=EOS)}
  return streams, tasks


def _config(tasks, *, seed=0, fill=1.0, batch_size=8, seq_len=64):
  mixture = data_config.curriculum(tasks, [(0, {"web": 0.7, "code": 0.3}), (3000, {"web": 0.2, "code": 0.8})],
                                   fill=fill)
  return DataConfig(batch_size=batch_size, seq_len=seq_len, seed=seed, mixture=mixture)


def _documents(streams, eos=EOS, seq_len=None):
  """The documents of a task's files, worked out here: split after every EOS, or into seq_len pieces."""
  documents = []
  for ids in streams:
    if eos is None:
      documents += [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    else:
      documents += [d for d in np.split(ids, np.flatnonzero(ids == eos) + 1) if len(d)]
  return documents


def _expected_pieces(data, documents, found):
  pieces = []
  for t, d, p, n in zip(found["task"], found["document"], found["piece"], found["pieces"]):
    doc = documents[data.task_names[t]][d]
    pieces.append(doc[p * len(doc) // n:(p + 1) * len(doc) // n])
  return pieces


def _check_layout(batch, rows, seq_len, vocab=VOCAB):
  """Shapes, dtypes, and the LM layout: inputs are targets shifted within segments, and so on."""
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      **{k: ((rows, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")},
      "loss_weights": ((rows, seq_len), np.float32)}
  targets, inputs, segments, positions = (batch[k] for k in ("targets", "inputs", "segment_ids", "positions"))
  for r in range(rows):
    used = int((segments[r] > 0).sum())
    assert (segments[r, :used] > 0).all() and not segments[r, used:].any()  # padding only at the end
    np.testing.assert_array_equal(batch["loss_weights"][r], segments[r] > 0)
    assert not targets[r, used:].any() and not inputs[r, used:].any() and not positions[r, used:].any()
    assert (targets[r, :used] >= 1).all() and (targets[r, :used] < vocab).all()
    ids = segments[r, :used]
    assert ids[:1].tolist() in ([], [1]) and set(np.diff(ids)) <= {0, 1}  # 1, 2, ... in order
    for s in np.unique(ids):
      where = np.flatnonzero(segments[r] == s)
      np.testing.assert_array_equal(positions[r, where], np.arange(len(where)))
      assert inputs[r, where[0]] == 0
      np.testing.assert_array_equal(inputs[r, where[1:]], targets[r, where[:-1]])


def test_batches_hold_the_streams_tokens_in_packed_order(tmp_path):
  streams, tasks = _write(tmp_path)
  data = make_train_data(_config(tasks))
  assert data.vocab is None and data.vocab_size == VOCAB and data.check_model_vocab(1024) == 1024
  documents = {name: _documents(streams[name]) for name in streams}
  for name, source in data.sources.items():  # the documents partition the streams, EOS kept
    assert len(source) == len(documents[name])
    np.testing.assert_array_equal(source.sizes, [len(d) for d in documents[name]])
    np.testing.assert_array_equal(np.concatenate(source.read(range(len(source)))),
                                  np.concatenate(streams[name]))
  batches = take(data, 0, 40)  # into the second stage, and past an epoch of 'code'
  for k, batch in enumerate(batches):
    _check_layout(batch, 8, 64)
    found = data.host_examples(k)
    expected = packing.pack(_expected_pieces(data, documents, found), 8, 64)
    for key, value in (("targets", expected.targets), ("segment_ids", expected.segment_ids),
                       ("positions", expected.positions)):
      np.testing.assert_array_equal(batch[key], value, err_msg=f"batch {k} {key}")
  realised = data.log_metrics(40)
  assert sorted(realised) == ["mixture/realised/code", "mixture/realised/web", "mixture/target/code",
                              "mixture/target/web"]
  assert realised["mixture/target/code"] == pytest.approx(0.8)


def test_streams_without_eos_are_cut_into_rows(tmp_path):
  ids = _stream(4, 64 * 30 + 17)
  np.save(tmp_path / "flat.npy", np.asarray(ids, np.uint16))
  tasks = {"flat": data_config.token_files([str(tmp_path / "flat.npy")], VOCAB)}
  data = make_train_data(DataConfig(batch_size=4, seq_len=64, mixture=data_config.curriculum(
      tasks, [(0, {"flat": 1.0})])))
  np.testing.assert_array_equal(data.sources["flat"].sizes, [64] * 30 + [17])
  documents = {"flat": _documents([ids], eos=None, seq_len=64)}
  for k, batch in enumerate(take(data, 0, 10)):
    _check_layout(batch, 4, 64)
    expected = packing.pack(_expected_pieces(data, documents, data.host_examples(k)), 4, 64)
    np.testing.assert_array_equal(batch["targets"], expected.targets)
    full = (batch["segment_ids"] == 1).all(axis=1)  # rows filled by one piece: 64 tokens of the stream
    assert full.sum() >= 3
    for row in batch["targets"][full]:
      assert any(np.array_equal(ids[i:i + 64], row) for i in range(0, len(ids), 64))


def test_numpy_rows_match_seqios_feature_converter(tmp_path):
  """lm_batch lays rows out exactly as the text path's converter (tasks.PackedLMFeatureConverter)."""
  tf = pytest.importorskip("tensorflow")
  from motif_jax.data import tasks  # pylint: disable=import-outside-toplevel

  _, token_tasks = _write(tmp_path)
  data = make_train_data(_config(token_tasks))
  rows = data.host_batch(3)
  ds = tf.data.Dataset.from_tensor_slices({"targets": rows.targets, "targets_segment_ids": rows.segment_ids,
                                           "targets_positions": rows.positions})
  converted = next(tasks.PackedLMFeatureConverter()(ds, {"targets": 64}).batch(8).as_numpy_iterator())
  ours = pipeline.lm_batch(rows)
  for key, theirs in (("inputs", "decoder_input_tokens"), ("targets", "decoder_target_tokens"),
                      ("segment_ids", "decoder_segment_ids"), ("positions", "decoder_positions"),
                      ("loss_weights", "decoder_loss_weights")):
    np.testing.assert_array_equal(ours[key], converted[theirs], err_msg=key)


def test_same_settings_give_the_same_batches_and_resume_is_exact(tmp_path):
  _, tasks = _write(tmp_path)
  first = take(make_train_data(_config(tasks, seed=7)), 0, 12)
  assert_same(take(make_train_data(_config(tasks, seed=7)), 0, 12), first)
  other = take(make_train_data(_config(tasks, seed=8)), 0, 12)
  assert any(not np.array_equal(a["targets"], b["targets"]) for a, b in zip(first, other))

  k, m = 9, 3
  resumed = make_train_data(_config(tasks, seed=7))
  assert_same(take(resumed, k, m), first[k:k + m])
  examples = sum(len(resumed.host_examples(b)["task"]) for b in range(k, k + m))
  assert sum(source.reads for source in resumed.sources.values()) == examples  # only batches k .. k+m-1
  with pytest.raises(ValueError, match="batches\\(start=-1\\)"):
    resumed.batches(-1)


def test_two_processes_split_the_single_process_batch(tmp_path):
  _, tasks = _write(tmp_path)
  single = make_train_data(_config(tasks, fill=0.5))
  hosts = [make_train_data(_config(tasks, fill=0.5), process_index=i, process_count=2) for i in range(2)]
  for k in range(8):
    whole, parts = single.host_examples(k), [host.host_examples(k) for host in hosts]
    ids = [set(zip(p["task"].tolist(), p["index"].tolist())) for p in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    for key in ("task", "index", "document", "piece", "pieces"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    rows = [host.host_batch(k) for host in hosts]
    single_rows = single.host_batch(k)
    assert single_rows.dropped == rows[0].dropped == rows[1].dropped == 0

    def segments(packed):
      return sorted(tuple(row[ids == s]) for row, ids in zip(packed.targets, packed.segment_ids)
                    for s in np.unique(ids[ids > 0]))

    assert segments(single_rows) and sorted(segments(rows[0]) + segments(rows[1])) == segments(single_rows)
  batch = next(hosts[1].batches(0))
  _check_layout(batch, 4, 64)


def test_token_runs_import_neither_tensorflow_nor_seqio(tmp_path):
  _write(tmp_path)
  script = textwrap.dedent(f"""
      import itertools, sys
      from motif_jax.data import DataConfig, make_train_data
      from motif_jax.data import config as c
      tasks = {{"web": c.token_files([{str(tmp_path / "web" / "*.bin")!r}], {VOCAB}, eos_id={EOS}),
               "code": c.token_files({str(tmp_path / "code.npy")!r}, {VOCAB}, dtype="uint32")}}
      mixture = c.curriculum(tasks, [(0, {{"web": 0.5, "code": 0.5}})])
      data = make_train_data(DataConfig(batch_size=4, seq_len=32, mixture=mixture))
      batches = list(itertools.islice(data.batches(5), 3))
      assert batches[2]["targets"].shape == (4, 32) and data.check_model_vocab(1024) == 1024
      data.log_metrics(8)
      loaded = [m for m in ("tensorflow", "seqio") if m in sys.modules]
      assert not loaded, loaded
      print("ok")
  """)
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_bad_token_files_fail_with_a_message_that_names_setting_file_and_fix(tmp_path):
  ids = _stream(5, 500)
  np.save(tmp_path / "int64.npy", ids)
  np.save(tmp_path / "u32.npy", ids.astype(np.uint32))
  np.save(tmp_path / "matrix.npy", ids[:400].reshape(20, 20).astype(np.uint16))
  np.save(tmp_path / "empty.npy", np.zeros(0, np.uint16))
  open(tmp_path / "empty.bin", "wb").close()
  open(tmp_path / "odd.bin", "wb").write(b"\x01\x02\x03")
  big = ids.astype(np.uint16)
  big[123] = VOCAB + 7
  big.tofile(tmp_path / "big.bin")
  (tmp_path / "ids.txt").write_text("1 2 3")
  where = r"curriculum.tasks\['web'\]: "

  def spec(name, **kwargs):
    return data_config.token_files([str(tmp_path / name)], VOCAB, **kwargs)

  cases = [
      (spec("missing/*.bin"), FileNotFoundError,
       where + r"no file matches .*missing/\*\.bin'; check the path"),
      (spec("int64.npy"), ValueError,
       where + r".*int64.npy holds int64 ids, not token_files.dtype='uint16'; save it as np.save"),
      (spec("u32.npy"), ValueError,
       where + r".*u32.npy holds uint32 ids, .*; set token_files.dtype='uint32'"),
      (spec("matrix.npy"), ValueError, where + r".*matrix.npy holds an array of shape \(20, 20\), not a 1-D"),
      (spec("empty.npy"), ValueError,
       where + r".*empty.npy holds no tokens; remove it from token_files.paths"),
      (spec("empty.bin"), ValueError, where + r".*empty.bin holds no tokens; remove it"),
      (spec("odd.bin"), ValueError, where + r".*odd.bin has 3 bytes, not a whole number of uint16 ids"),
      (spec("big.bin"), ValueError,
       where + rf".*big.bin holds token id {VOCAB + 7} \(at token 123\) >= token_files.vocab_size={VOCAB}; "
       "set vocab_size"),
      (spec("ids.txt"), ValueError,
       where + r".*ids.txt is neither .npy nor .bin; .*narrow token_files.paths"),
  ]
  for source, kind, message in cases:
    mixture = data_config.curriculum({"web": source}, [(0, {"web": 1.0})])
    with pytest.raises(kind, match=message) as raised:
      make_train_data(DataConfig(batch_size=4, seq_len=64, mixture=mixture))
    assert "\n" not in str(raised.value)


def test_bad_token_settings_fail_before_any_file_is_read(tmp_path):
  path = [str(tmp_path / "none.bin")]
  stages = [(0, {"web": 1.0})]
  cases = [
      (dict(dtype="int32"), r"token_files.dtype='int32'; choose one of \('uint16', 'uint32'\)"),
      (dict(vocab_size=100_000),
       r"token_files.vocab_size=100000 needs ids beyond dtype='uint16' .*set dtype='uint32'"),
      (dict(vocab_size=0), r"token_files.vocab_size=0; give the tokenizer's number of ids"),
      (dict(eos_id=VOCAB), rf"token_files.eos_id={VOCAB} must be an id in \[0, vocab_size={VOCAB}\)"),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=r"curriculum.tasks\['web'\]: " + message):
      data_config.curriculum({"web": data_config.token_files(path, **{"vocab_size": VOCAB, **change})},
                             stages)
  with pytest.raises(ValueError, match=r"curriculum.tasks mixes token-file tasks \['web'\] with text tasks "
                     r"\['code'\]; .*tokenize the text tasks into token files"):
    data_config.curriculum(
        {"web": data_config.token_files(path, VOCAB), "code": data_config.CorpusDomain("code")},
        [(0, {"web": 1.0, "code": 1.0})])
  with pytest.raises(ValueError, match=r"declare different vocab_size \{'a': 1000, 'b': 2000\}"):
    data_config.curriculum(
        {"a": data_config.token_files(path, VOCAB), "b": data_config.token_files(path, 2000)},
        [(0, {"a": 1.0, "b": 1.0})])
  with pytest.raises(ValueError, match=r"curriculum.vocabulary='/x/spm.model' .* remove the binding"):
    data_config.curriculum({"web": data_config.token_files(path, VOCAB)}, stages, vocabulary="/x/spm.model")


def test_a_model_vocabulary_too_small_for_the_token_files_is_refused(tmp_path):
  _, tasks = _write(tmp_path)
  data = make_train_data(_config(tasks))
  with pytest.raises(ValueError, match=r"Vocabulary size mismatch: ModelConfig.vocab_size=384 is smaller "
                     r"than the data's vocabulary \(1000 ids, padded to 1024"):
    data.check_model_vocab(384)


def test_training_on_token_files_lowers_the_loss_without_tensorflow(tmp_path):
  """The tiny model on the example gin file's two-task token-file mixture, in a fresh process."""
  rng = np.random.default_rng(6)
  for task, dtype, suffix in (("web", np.uint16, "bin"), ("code", np.uint32, "npy")):
    ids = rng.integers(4, 40, 20_000)  # few ids, so that the loss falls within a few steps
    ids[rng.random(len(ids)) < 0.02] = 1  # EOS
    if suffix == "npy":
      np.save(tmp_path / f"{task}.npy", ids.astype(dtype))
    else:
      ids.astype(dtype).tofile(tmp_path / f"{task}.bin")
  bindings = ["NUM_STEPS=6", "SEQ_LEN=64", "WARMUP_STEPS=1", "train.log_every=1",
              "train.checkpoint_every=100",
              f"WEB_TOKENS=[{str(tmp_path / 'web.bin')!r}]", f"CODE_TOKENS=[{str(tmp_path / 'code.npy')!r}]",
              "VOCAB_SIZE=256", "EOS_ID=1", "code/token_files.dtype='uint32'"]
  script = textwrap.dedent(f"""
      import json, sys
      import gin
      from motif_jax import trainer
      gin.add_config_file_search_path({REPO!r})
      gin.parse_config_files_and_bindings(
          ["gin_configs/experiments/smoke.gin", "gin_configs/data/token_files.gin"], {bindings!r})
      history = trainer.train({str(tmp_path / "run")!r})
      loaded = [m for m in ("tensorflow", "seqio") if m in sys.modules]
      print(json.dumps({{"losses": [r["train/loss"] for r in history], "loaded": loaded,
                         "web": [r["mixture/realised/web"] for r in history]}}))
  """)
  one_device = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  env = dict(os.environ, XLA_FLAGS=one_device)  # one CPU device compiles faster than the suite's 8
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  losses = result["losses"]
  print("losses", losses)
  assert len(losses) == 6 and np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0]
  assert result["loaded"] == []
  assert all(0 < share < 1 for share in result["web"])
