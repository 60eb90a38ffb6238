"""Helpers shared by the data tests: taking batches from a stream and comparing them."""

import itertools

import numpy as np

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


def take(data, start, count):
  """Batches start .. start + count - 1 of `data` (a TrainData)."""
  return list(itertools.islice(data.batches(start), count))


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
