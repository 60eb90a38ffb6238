"""User sources (text, JSON Lines, TFRecord, tfds) as indexed seqio sources; the SentencePiece tokenizer."""

import gzip
import itertools
import json

import numpy as np
import pytest

from motif_jax.data import DataConfig, make_train_data
from motif_jax.data import config as data_config

DOCS = ["first document", "zweites Dokument: äöü", "세 번째 문서", "fourth\twith a tab", "x"]


@pytest.fixture(scope="module")
def sources():
  from motif_jax.data import sources as sources_lib  # pylint: disable=import-outside-toplevel  (TF)

  return sources_lib


def _write_tfrecord(path, docs, feature="text"):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  with tf.io.TFRecordWriter(str(path)) as writer:
    for doc in docs:
      example = tf.train.Example(features=tf.train.Features(feature={
          feature: tf.train.Feature(bytes_list=tf.train.BytesList(value=[doc.encode()])),
          "id": tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))}))
      writer.write(example.SerializeToString())


def _check(source, docs):
  assert len(source) == len(docs)
  assert source.read(list(range(len(docs)))[::-1]) == docs[::-1]  # any order
  assert (source.sizes >= [len(d.encode()) for d in docs]).all()  # upper bounds of the UTF-8 sizes
  texts = [e["text"].decode() for e in source.get_dataset(shuffle=False).as_numpy_iterator()]
  assert texts == docs


def test_text_jsonl_and_tfrecord_sources(tmp_path, sources):
  (tmp_path / "a.txt").write_text("\n".join(DOCS[:3]) + "\n\n")  # a blank line is no document
  (tmp_path / "b.txt").write_text("\n".join(DOCS[3:]))
  _check(sources.open_source(data_config.TextFiles((str(tmp_path / "*.txt"),)), "t"), DOCS)
  whole = sources.open_source(data_config.TextFiles((str(tmp_path / "a.txt"),), per_line=False), "t")
  assert whole.read([0]) == ["\n".join(DOCS[:3]) + "\n\n"]

  with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
    for i, doc in enumerate(DOCS):
      f.write(json.dumps({"body": doc, "n": i}, ensure_ascii=i % 2 == 0) + "\n")
  _check(sources.open_source(data_config.JsonlFiles((str(tmp_path / "docs.jsonl"),), "body"), "j"), DOCS)

  _write_tfrecord(tmp_path / "docs.tfrecord", DOCS)
  _check(sources.open_source(data_config.TFRecordFiles((str(tmp_path / "docs.tfrecord"),)), "r"), DOCS)


def test_tfds_source(tmp_path, sources):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  tfds.dataset_builders.TfDataBuilder(
      name="motif_test_docs", config=None, version="1.0.0", data_dir=str(tmp_path),
      split_datasets={"train": tf.data.Dataset.from_tensor_slices({"text": DOCS})},
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()})).download_and_prepare()
  source = sources.open_source(data_config.TfdsDataset("motif_test_docs", str(tmp_path)), "m")
  assert sorted(source.read(range(len(source)))) == sorted(DOCS)  # tfds shuffles while preparing
  with pytest.raises(FileNotFoundError, match="curriculum.tasks\\['m2'\\]: tfds dataset 'motif_none'"):
    sources.open_source(data_config.TfdsDataset("motif_none", str(tmp_path)), "curriculum.tasks['m2']")
  with pytest.raises(ValueError, match="has splits \\['train'\\], not 'test'"):
    sources.open_source(data_config.TfdsDataset("motif_test_docs", str(tmp_path), split="test"), "m")


def test_source_errors_name_the_setting(tmp_path, sources):
  setting = "curriculum.tasks['web']"
  with pytest.raises(FileNotFoundError, match=r"curriculum.tasks\['web'\]: no file matches .*missing.txt"):
    sources.open_source(data_config.TextFiles((str(tmp_path / "missing.txt"),)), setting)
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
  source = sources.open_source(data_config.JsonlFiles((str(tmp_path / "bad.jsonl"),)), setting)
  assert source.read([0]) == ["fine"]
  with pytest.raises(ValueError, match="curriculum.tasks\\['web'\\]: a line of .*bad.jsonl is not a JSON "
                     "object with a string field 'text'"):
    source.read([1])
  _write_tfrecord(tmp_path / "docs.tfrecord", DOCS[:2], feature="content")
  records = sources.open_source(data_config.TFRecordFiles((str(tmp_path / "docs.tfrecord"),)), setting)
  with pytest.raises(ValueError, match="no bytes feature 'text'; it has \\['content', 'id'\\]"):
    records.read([0])
  with gzip.open(tmp_path / "zipped.tfrecord", "wb") as f:
    f.write((tmp_path / "docs.tfrecord").read_bytes())
  with pytest.raises(ValueError, match="zipped.tfrecord is GZIP-compressed"):
    sources.open_source(data_config.TFRecordFiles((str(tmp_path / "zipped.tfrecord"),)), setting)


def test_trained_sentencepiece_tokenizer_end_to_end(tmp_path):
  """Train on two user sources, load through seqio, train batches with it; Tasks agree with the pipeline."""
  import seqio  # pylint: disable=import-outside-toplevel
  from motif_jax.data import tasks, tokenizer, vocabulary  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "def", "return", "x", "+", "1", "=", "2", "\n    "]
  (tmp_path / "a.txt").write_text("\n".join(" ".join(rng.choice(words, 40)) for _ in range(300)))
  with open(tmp_path / "b.jsonl", "w") as f:
    for _ in range(300):
      f.write(json.dumps({"text": "".join(rng.choice(words, 30))}) + "\n")
  user_tasks = {"plain": data_config.TextFiles((str(tmp_path / "a.txt"),)),
                "json": data_config.JsonlFiles((str(tmp_path / "b.jsonl"),))}
  stages = [(0, {"plain": 0.5, "json": 0.5})]
  path = tokenizer.train(str(tmp_path / "spm" / "tiny"), data_config.curriculum(user_tasks, stages),
                         vocab_size=400)
  vocab = vocabulary.load_vocabulary(path)
  assert vocab.vocab_size == 400 and vocab.eos_id == 1 and vocab.tokenizer.pad_id() == 0
  text = "def f(x):\n    return x + 12 # ünïcödé"
  assert vocab.decode(vocab.encode(text)) == text  # whitespace, newlines and unseen characters survive

  mixture = data_config.curriculum(user_tasks, stages, vocabulary=path)
  data = make_train_data(DataConfig(batch_size=4, seq_len=128, mixture=mixture))
  assert data.vocab_size == 400 and data.check_model_vocab(512, shards=4) == 512
  with pytest.raises(ValueError, match="ModelConfig.vocab_size=384 is smaller than the data's vocabulary "
                     "\\(400 ids, padded to 512"):
    data.check_model_vocab(384)
  batch = next(data.batches(0))
  assert batch["targets"].max() < 400 and batch["loss_weights"].mean() > 0.9
  ds = seqio.get_dataset("motif_json", task_feature_lengths={"targets": 4096}, dataset_split="train",
                         shuffle=False, feature_converter=seqio.PassThroughFeatureConverter())
  for index, example in enumerate(itertools.islice(ds.as_numpy_iterator(), 3)):
    document = data.sources["json"].read([index])[0]
    np.testing.assert_array_equal(example["targets"], tasks.encode(vocab, document))


def test_vocabulary_padding():
  from motif_jax.data import vocabulary  # pylint: disable=import-outside-toplevel

  assert vocabulary.padded_vocab_size(259, 128) == 384
  assert vocabulary.padded_vocab_size(384, 128) == 384
  assert vocabulary.check_model_vocab(384, 259, pad_multiple=128, shards=8) == 384
