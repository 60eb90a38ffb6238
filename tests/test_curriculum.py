"""The curriculum mixture: schedule, closed-form plan, exact resume without replay, host shards, errors."""

import dataclasses

import numpy as np
import pytest

from motif_jax.data import DataConfig, make_train_data
from motif_jax.data import config as data_config
from motif_jax.data import packing, vocabulary
from motif_jax.data.examples import TaskExamples, cut
from motif_jax.data.curriculum import CurriculumMixture, Schedule
from batches import KEYS, assert_same, take  # tests/batches.py

EMBEDDED = {d: data_config.CorpusDomain(d) for d in data_config.EMBEDDED_DOMAINS}
# Three transitions inside the first ~300 batches of 8 x 256 tokens (2,048 tokens per batch).
STAGES = [(0, {"code": 0.6, "prose": 0.3, "math": 0.1}),
          (150_000, {"code": 0.1, "prose": 0.3, "math": 0.6}),
          (400_000, {"code": 0.3, "prose": 0.6, "math": 0.1}),
          (500_000, {"code": 0.2, "prose": 0.2, "math": 0.6})]


def test_schedule_interpolates_between_stage_starts():
  def weights(interpolation, tokens):
    schedule = Schedule(data_config.curriculum(
        EMBEDDED, [(0, {"code": 2, "prose": 1, "math": 1}), (100, {"prose": 1, "math": 3})],
        interpolation=interpolation))
    return schedule.weights_at(tokens)

  # Normalised stage weights; "code" is not named in the second stage, so it leaves the mixture there.
  start, end = np.array([0.5, 0.25, 0.25]), np.array([0.0, 0.25, 0.75])
  np.testing.assert_allclose(weights("linear", 0), start)
  np.testing.assert_allclose(weights("linear", 50), (start + end) / 2)
  np.testing.assert_allclose(weights("linear", [100, 1e9]), [end, end])
  np.testing.assert_allclose(weights("step", 99.9), start)
  np.testing.assert_allclose(weights("cosine", 25), start + (end - start) * (1 - np.cos(np.pi / 4)) / 2)
  assert np.allclose(weights("cosine", np.linspace(0, 200, 41)).sum(axis=1), 1.0)


def _plan(interpolation="linear", seed=0):
  schedule = Schedule(data_config.curriculum(EMBEDDED, STAGES, interpolation=interpolation))
  return CurriculumMixture(schedule, batch_tokens=2048, example_tokens=[250.0, 240.0, 200.0], fill=1.0,
                     block_size=8, seed=seed)


def test_plan_is_a_closed_form_of_the_example_index():
  plan = _plan()
  stop = plan.batch_start(300)
  tasks, index = plan.assign(0, stop)
  for task in range(3):  # each task's examples are numbered 0, 1, 2, ... in stream order
    np.testing.assert_array_equal(index[tasks == task], np.arange((tasks == task).sum()))
  for start, end in [(0, 1), (17, 18), (123, 1234), (stop - 50, stop)]:  # any span, computed afresh
    fresh_tasks, fresh_index = _plan().assign(start, end)
    np.testing.assert_array_equal(fresh_tasks, tasks[start:end])
    np.testing.assert_array_equal(fresh_index, index[start:end])
  sizes = [plan.batch_size(k) for k in range(300)]
  assert min(sizes) >= 8 and sum(sizes) == stop  # about one example per row of 256 tokens
  assert not np.array_equal(_plan(seed=1).assign(0, 500)[0], tasks[:500])


@pytest.mark.parametrize("interpolation", ["linear", "step", "cosine"])
def test_realised_shares_stay_within_3_points_in_every_200_example_window(interpolation):
  """Acceptance: every window of 200 consecutive examples, across three transitions."""
  plan = _plan(interpolation)
  batches = 400  # 819,200 tokens: past every stage start
  stop = plan.batch_start(batches)
  tasks, _ = plan.assign(0, stop)
  batch_of = np.repeat(np.arange(batches), [plan.batch_size(k) for k in range(batches)])
  scheduled = np.stack([plan.target_weights(k) for k in range(batches)])[batch_of]  # [examples, tasks]
  realised = (tasks[:, None] == np.arange(3)).astype(float)
  window = 200
  cum_real = np.cumsum(np.vstack([np.zeros(3), realised]), axis=0)
  cum_sched = np.cumsum(np.vstack([np.zeros(3), scheduled]), axis=0)
  deviation = np.abs((cum_real[window:] - cum_real[:-window]) - (cum_sched[window:] - cum_sched[:-window]))
  worst = deviation.max() / window
  print(f"{interpolation}: {stop} examples, {stop - window + 1} windows, max deviation {100 * worst:.2f} pp")
  assert worst <= 0.03
  # The long-run count of every task is within one example of its schedule.
  assert np.abs(cum_real[-1] - cum_sched[-1]).max() <= 1.0


def test_a_task_a_stage_does_not_name_is_not_drawn_there():
  """A domain can enter the schedule late and leave it: no draws while its weight is 0."""
  stages = [(0, {"code": 1.0, "prose": 1.0}), (100_000, {"prose": 1.0, "math": 1.0}),
            (200_000, {"code": 1.0, "prose": 1.0})]
  schedule = Schedule(data_config.curriculum(EMBEDDED, stages, interpolation="step"))
  plan = CurriculumMixture(schedule, batch_tokens=2048, example_tokens=[250.0, 240.0, 200.0], fill=1.0,
                           block_size=8, seed=0)
  code, math = 0, 2  # EMBEDDED_DOMAINS order
  spans = {"before": (0, 48), "math stage": (49, 97), "after": (98, 150)}  # batches; 2,048 tokens each
  counts = {name: plan.task_counts(plan.batch_start(a), plan.batch_start(b))
            for name, (a, b) in spans.items()}
  assert counts["before"][math] == 0 and counts["before"][code] > 0
  assert counts["math stage"][code] == 0 and counts["math stage"][math] > 0
  assert counts["after"][math] == 0 and counts["after"][code] > 0


def test_task_examples_cover_every_piece_once_per_epoch():
  sizes = np.array([10, 700, 300, 1, 2000])
  stream = TaskExamples(sizes, tokens_per_byte=1.0, seq_len=256, seed=3, task=1)
  assert stream.per_epoch == 1 + 3 + 2 + 1 + 8
  document, piece, pieces = stream.locate(np.arange(3 * stream.per_epoch))
  for epoch in range(3):
    span = slice(epoch * stream.per_epoch, (epoch + 1) * stream.per_epoch)
    got = sorted(zip(document[span].tolist(), piece[span].tolist()))
    assert got == [(d, p) for d in range(5) for p in range(stream.pieces[d])]
  assert not np.array_equal(document[:stream.per_epoch], document[stream.per_epoch:2 * stream.per_epoch])
  tokens = np.arange(1000)
  np.testing.assert_array_equal(np.concatenate([cut(tokens, p, 3) for p in range(3)]), tokens)


def test_pack_keeps_every_token_that_fits_and_drops_only_overflow():
  rng = np.random.default_rng(0)
  examples = [rng.integers(3, 200, n).astype(np.int32) for n in (100, 60, 40, 250, 30, 300)]
  rows = packing.pack(examples, rows=4, seq_len=256)  # 780 tokens into 1,024 slots: all fit
  assert rows.dropped == 0
  kept = rows.targets[rows.segment_ids > 0]
  assert sorted(kept.tolist()) == sorted(np.concatenate(examples).tolist())
  full = packing.pack(examples, rows=2, seq_len=256)  # 512 slots
  assert full.dropped == 780 - 512 and (full.segment_ids > 0).all()
  for row in range(2):  # positions restart at every segment
    seg, pos = full.segment_ids[row], full.positions[row]
    starts = np.flatnonzero(np.diff(seg, prepend=0))
    for begin, end in zip(starts, list(starts[1:]) + [256]):
      np.testing.assert_array_equal(pos[begin:end], np.arange(end - begin))


# --- Through the pipeline ------------------------------------------------------------------------------

def _write_sources(tmp_path):
  """A text file and a JSON Lines file of numbered documents of varied length."""
  import json  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
  def doc(i):
    return f"doc {i}: " + " ".join(rng.choice(words, int(rng.integers(5, 120))))
  (tmp_path / "notes.txt").write_text("\n".join(doc(i) for i in range(150)) + "\n")
  with open(tmp_path / "web.jsonl", "w") as f:
    for i in range(200):
      f.write(json.dumps({"id": i, "text": doc(1000 + i)}) + "\n")
  return {"notes": data_config.TextFiles((str(tmp_path / "*.txt"),)),
          "web": data_config.JsonlFiles((str(tmp_path / "web.jsonl"),))}


def _fresh_tasks(names):
  """Forgets registered Tasks, so that the next TrainData opens (and counts reads of) new sources."""
  import seqio  # pylint: disable=import-outside-toplevel

  for name in names:
    if f"motif_{name}" in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(f"motif_{name}")


def test_resume_at_k_reads_only_the_batches_from_k(tmp_path):
  """Acceptance: batches from k equal the uninterrupted run's, reading no document of batches < k."""
  tasks = _write_sources(tmp_path)
  cfg = DataConfig(batch_size=8, seq_len=128, seed=5, mixture=data_config.curriculum(
      tasks, [(0, {"notes": 0.7, "web": 0.3}), (20_000, {"notes": 0.2, "web": 0.8})]))
  k, m = 60, 3
  _fresh_tasks(tasks)
  straight = make_train_data(cfg)
  expected = take(straight, 0, k + m)
  straight_reads = sum(source.reads for source in straight.sources.values())

  _fresh_tasks(tasks)
  resumed = make_train_data(cfg)
  read = []
  for name, source in resumed.sources.items():
    original = source.read
    def recording(ids, name=name, original=original):
      read.extend((name, i) for i in ids)
      return original(ids)
    source.read = recording
  assert_same(take(resumed, k, m), expected[k:])

  slack = 8  # batches the background pipeline may have prepared beyond the m taken
  needed = set()
  for batch in range(k, k + m + slack):
    found = resumed.host_examples(batch)
    needed |= {(resumed.task_names[t], int(d)) for t, d in zip(found["task"], found["document"])}
  print(f"resume at {k}: read {len(read)} documents; the straight run read {straight_reads} "
        f"(its construction included)")
  assert set(read) <= needed and len(read) == len(set(read))
  assert len(read) * 5 < straight_reads


def test_two_hosts_split_the_single_host_stream():
  """Acceptance: shards 0 and 1 of 2 get disjoint examples whose union is the single-host stream."""
  mixture = dataclasses.replace(data_config.PRESETS["motif_embedded"], fill=0.6)  # nothing dropped
  single = make_train_data(DataConfig(batch_size=8, seq_len=256, seed=2, mixture=mixture))
  hosts = [make_train_data(DataConfig(batch_size=8, seq_len=256, seed=2, mixture=mixture),
                           process_index=i, process_count=2) for i in range(2)]
  for batch in range(6):
    whole = single.host_examples(batch)
    parts = [host.host_examples(batch) for host in hosts]
    ids = [set(zip(p["task"].tolist(), p["index"].tolist())) for p in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    for key in ("task", "index", "document", "piece"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    # The tokens themselves: the two hosts' rows hold exactly the single host's tokens.
    rows = [host.host_batch(batch) for host in hosts]
    single_rows = single.host_batch(batch)
    assert single_rows.dropped == rows[0].dropped == rows[1].dropped == 0
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([r.targets[r.segment_ids > 0] for r in rows]), minlength=259),
        np.bincount(single_rows.targets[single_rows.segment_ids > 0], minlength=259))
  batch = next(hosts[1].batches(0))
  assert all(batch[key].shape == (4, 256) for key in KEYS)


def test_log_metrics_report_target_and_realised_shares():
  mixture = data_config.curriculum(EMBEDDED, STAGES)
  data = make_train_data(DataConfig(batch_size=8, seq_len=256, mixture=mixture))
  for position in (1, 50, 150, 300):
    metrics = data.log_metrics(position)
    assert sorted(metrics) == sorted(f"mixture/{kind}/{name}" for kind in ("target", "realised")
                                     for name in ("code", "prose", "math"))
    target = np.array([metrics[f"mixture/target/{n}"] for n in data.task_names])
    np.testing.assert_allclose(target, data.plan.target_weights(position - 1))
    realised = np.array([metrics[f"mixture/realised/{n}"] for n in data.task_names])
    assert realised.sum() == pytest.approx(1.0)
  assert metrics["mixture/realised/math"] == pytest.approx(0.6, abs=0.03)  # position 300: the last stage


def test_packing_efficiency_at_2048_on_the_embedded_corpus():
  """Acceptance: >= 90% non-padding tokens at sequence length 2048."""
  data = make_train_data(DataConfig(batch_size=16, seq_len=2048))
  used = dropped = 0
  for batch in range(12):
    rows = data.host_batch(batch)
    used, dropped = used + int((rows.segment_ids > 0).sum()), dropped + rows.dropped
  efficiency = used / (12 * 16 * 2048)
  print(f"packing efficiency at 2048: {100 * efficiency:.1f}%, "
        f"dropped {100 * dropped / (used + dropped):.2f}%")
  assert efficiency >= 0.9


def test_bad_configuration_fails_with_a_message_that_names_it(tmp_path):
  """Acceptance: weights not positive, unknown task, stages out of order, vocabulary, missing file."""
  good = {"code": 1.0, "prose": 1.0, "math": 1.0}
  cases = [
      ([(0, dict(good, math=-0.5))],
       "stages\\[0\\] weight of task 'math' is -0.5; weights must be finite and > 0"),
      ([(0, good), (1e6, dict(good, math=0.0))],
       "stages\\[1\\] weight of task 'math' is 0.0; .* omit it from that stage"),
      ([(0, dict(good, math=float("nan")))], "stages\\[0\\] weight of task 'math' is nan"),
      ([(0, {})], "stages\\[0\\] weights no task"),
      ([(0, dict(good, maths=1.0))], "unknown task\\(s\\) \\['maths'\\]"),
      ([(0, good), (5e6, good), (1e6, good)],
       "Stages out of order: curriculum.stages\\[2\\] starts at 1e\\+06"),
      ([(10, good)], "the first stage must start at 0"),
      ([(0, {"code": 1.0, "prose": 1.0}), (1e6, {"prose": 1.0})],
       "Task\\(s\\) \\['math'\\] appear in no stage"),
  ]
  for stages, message in cases:
    with pytest.raises(ValueError, match=message):
      data_config.curriculum(EMBEDDED, stages)
  with pytest.raises(ValueError, match="curriculum.interpolation='quadratic'"):
    data_config.curriculum(EMBEDDED, [(0, good)], interpolation="quadratic")
  with pytest.raises(ValueError, match="unknown embedded corpus domain 'poetry'"):
    data_config.curriculum({"poetry": data_config.CorpusDomain("poetry")}, [(0, {"poetry": 1.0})])
  with pytest.raises(ValueError, match="DataConfig.mixture='no_such_mixture'"):
    make_train_data(DataConfig(batch_size=4, seq_len=64, mixture="no_such_mixture"))

  missing = data_config.curriculum({"web": data_config.JsonlFiles((str(tmp_path / "nope" / "*.jsonl"),))},
                                   [(0, {"web": 1.0})])
  with pytest.raises(FileNotFoundError, match=r"curriculum.tasks\['web'\]: no file matches .*nope"):
    make_train_data(DataConfig(batch_size=4, seq_len=64, mixture=missing))
  no_model = dataclasses.replace(data_config.PRESETS["motif_embedded"], vocabulary=str(tmp_path / "x.model"))
  with pytest.raises(FileNotFoundError, match=r"curriculum.vocabulary=.*x.model.*no such SentencePiece"):
    make_train_data(DataConfig(batch_size=4, seq_len=64, mixture=no_model))

  with pytest.raises(ValueError, match="Vocabulary size mismatch: ModelConfig.vocab_size=256 is smaller "
                     "than the data's vocabulary \\(259 ids, padded to 384"):
    vocabulary.check_model_vocab(256, 259, pad_multiple=128)
  with pytest.raises(ValueError, match="ModelConfig.vocab_size=400 is not a multiple of 128"):
    vocabulary.check_model_vocab(400, 259, pad_multiple=128, shards=4)
  assert vocabulary.check_model_vocab(384, 259, pad_multiple=128, shards=8) == 384
  assert vocabulary.check_model_vocab(768, 259, pad_multiple=128, shards=3) == 384  # larger: a warning


def test_setting_errors_of_the_batch_layout():
  with pytest.raises(ValueError, match="batch_size=10 must be a positive multiple of process_count=4"):
    make_train_data(DataConfig(batch_size=10, seq_len=64), process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=2"):
    make_train_data(DataConfig(batch_size=4, seq_len=64), process_index=2, process_count=2)


@pytest.mark.slow
def test_training_reports_the_mixture_and_checks_the_vocabulary(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  def run(workdir, *bindings):
    bindings = ["NUM_STEPS=3", "SEQ_LEN=64", "WARMUP_STEPS=1", "train.log_every=1", *bindings]
    command = [sys.executable, "-m", "motif_jax.train", f"--workdir={workdir}",
               "--gin_file=gin_configs/experiments/curriculum_smoke.gin"]
    command += [f"--gin_param={b}" for b in bindings]
    return subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=600)

  done = run(tmp_path / "run")
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "run" / "logs" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  for record in records:
    for kind in ("target", "realised"):
      shares = [record[f"mixture/{kind}/{name}"] for name in ("prose", "code", "math")]
      assert sum(shares) == pytest.approx(1.0)
  assert records[0]["mixture/target/prose"] == pytest.approx(0.5)  # the first stage
  failed = run(tmp_path / "bad", "train.model_overrides={'vocab_size': 256}")
  assert failed.returncode != 0
  assert "Vocabulary size mismatch: ModelConfig.vocab_size=256 is smaller" in failed.stderr
