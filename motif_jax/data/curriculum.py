"""The curriculum: its schedule, and the mixture that gives every example slot a task, in closed form.

`Schedule.weights_at(tokens)` interpolates the stage weights. `CurriculumMixture` lays the global example
stream out batch by batch and assigns every example a task, without reading any data:

* Batch k starts at tokens seen `k * batch_tokens` (batch_tokens = global rows x seq_len) and takes
  `E(k) = round(fill * batch_tokens / (sum_d w_d(k) * example_tokens_d))` examples, so that batches stay
  full as the mixture moves between tasks of different example lengths. `I(k)`, the examples before
  batch k, is a prefix sum of E: a scan over batches in chunks, from numbers only (about 0.1 s per
  million batches), whose chunk boundaries are kept.
* The cumulative target of task d at example x is `T_d(x) = sum over earlier examples of the weight of
  their batch` (piecewise linear in x). Blocks of about `block_size` examples hold exactly
  `F_d(b + 1) - F_d(b)` examples of task d, where `F_d(b) = floor(T_d(b * block_size) + u_d)` with a
  fixed offset `u_d` in [0, 1) drawn from the seed. F_d never decreases and stays within one example of
  T_d, so every block matches the schedule to within one example per task and long-run shares are exact.
  Block b starts at example `S(b) = sum_d F_d(b)` (within a few examples of b * block_size).
* Inside a block the examples are shuffled by a Philox generator keyed by the seed, with the block index
  in its counter. So the task of example i, and its index among the examples of that task
  (`F_d(b)` plus the count earlier in the block), follow from (seed, i) alone.
"""

from __future__ import annotations

import numpy as np

from motif_jax.data.config import Curriculum

_TAG_BLOCK, _TAG_OFFSET = 1, 2  # Philox streams of this module (examples.py uses 3)
_CHUNK = 4096  # batches per chunk of the prefix sums


def philox(seed: int, tag: int, *counter: int) -> np.random.Generator:
  """A generator on Philox's counter-based stream keyed by (seed, tag), starting at `counter`."""
  key = np.array([seed % 2**64, tag], dtype=np.uint64)
  words = np.zeros(4, dtype=np.uint64)
  words[1:1 + len(counter)] = counter  # word 0 is the stream's own position
  return np.random.Generator(np.random.Philox(key=key, counter=words))


class Schedule:
  """Mixture weights over tokens seen. `weights_at(tokens)`: float64 [..., num_tasks], rows sum to 1."""

  def __init__(self, curriculum: Curriculum):
    self.names = curriculum.task_names
    self.starts = np.array([tokens for tokens, _ in curriculum.stages], dtype=np.float64)
    raw = np.array([[dict(weights).get(n, 0.0) for n in self.names] for _, weights in curriculum.stages])
    self.weights = raw / raw.sum(axis=1, keepdims=True)  # [stages, tasks]
    self.interpolation = curriculum.interpolation

  def weights_at(self, tokens) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.float64)
    stage = np.searchsorted(self.starts, tokens, side="right") - 1
    nxt = np.minimum(stage + 1, len(self.starts) - 1)
    span = self.starts[nxt] - self.starts[stage]
    u = np.where(span > 0, (tokens - self.starts[stage]) / np.where(span > 0, span, 1.0), 0.0)
    if self.interpolation == "step":
      u = np.zeros_like(u)
    elif self.interpolation == "cosine":
      u = (1.0 - np.cos(np.pi * u)) / 2.0
    u = np.clip(u, 0.0, 1.0)[..., None]
    return (1.0 - u) * self.weights[stage] + u * self.weights[nxt]

  def describe(self, tokens_per_step: int | None = None) -> str:
    """The stages as a table: start (tokens, and steps when `tokens_per_step` is given) and weights."""
    head = "stage  start tokens" + ("   (step)" if tokens_per_step else "") + "".join(
        f"  {n:>8s}" for n in self.names)
    lines = [head, f"(interpolation: {self.interpolation}; weights per example, normalised)"]
    for index, (start, row) in enumerate(zip(self.starts, self.weights)):
      step = f"  ({start / tokens_per_step:,.0f})" if tokens_per_step else ""
      lines.append(f"{index:5d}  {start:12.4g}{step}" + "".join(f"  {w:8.3f}" for w in row))
    return "\n".join(lines)


class CurriculumMixture:
  """The global example stream of a run, batch by batch; every query is pure arithmetic on the seed.

  batch_tokens: global rows x seq_len, the tokens seen per batch.
  example_tokens: float [num_tasks], the mean tokens of one example of each task.
  """

  def __init__(self, schedule: Schedule, *, batch_tokens: int, example_tokens, fill: float,
               block_size: int, seed: int):
    self.schedule = schedule
    self.num_tasks = len(schedule.names)
    self.batch_tokens = int(batch_tokens)
    self.example_tokens = np.asarray(example_tokens, dtype=np.float64)
    self.fill = float(fill)
    self.block_size = int(block_size)
    self.seed = int(seed)
    self.offsets = philox(self.seed, _TAG_OFFSET).random(self.num_tasks)  # u_d in [0, 1)
    # I and T at the first batch of every chunk of _CHUNK batches, found by a scan from batch 0 (numbers
    # only); a chunk's batches are recomputed from its first one when asked for, always the same way.
    self._chunk_starts = [0]  # I(c * _CHUNK)
    self._chunk_targets = [np.zeros(self.num_tasks)]  # T(I(c * _CHUNK))
    self._chunks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  # -- batches --------------------------------------------------------------------------------------

  def _chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts [C + 1], weights [C, tasks], targets [C + 1, tasks]) of the chunk's C batches.

    starts[j] = I(k) and targets[j] = T(I(k)) for batch k = chunk * C + j (one past the end included);
    weights[j] = w(k).
    """
    while len(self._chunk_starts) <= chunk:
      self._extend()
    if chunk not in self._chunks:
      if len(self._chunks) >= 4:
        del self._chunks[next(iter(self._chunks))]
      self._chunks[chunk] = self._compute(chunk)
    return self._chunks[chunk]

  def _extend(self) -> None:
    """One more step of the scan: the first batch of the next chunk."""
    starts, _, targets = self._compute(len(self._chunk_starts) - 1)
    self._chunk_starts.append(int(starts[-1]))
    self._chunk_targets.append(targets[-1])

  def _compute(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = np.arange(chunk * _CHUNK, (chunk + 1) * _CHUNK)
    weights = self.schedule.weights_at(batches * float(self.batch_tokens))
    counts = np.maximum(1, np.rint(self.fill * self.batch_tokens / (weights @ self.example_tokens)))
    counts = counts.astype(np.int64)
    starts = np.concatenate([[self._chunk_starts[chunk]], self._chunk_starts[chunk] + np.cumsum(counts)])
    targets = np.cumsum(np.vstack([self._chunk_targets[chunk], counts[:, None] * weights]), axis=0)
    return starts, weights, targets

  def batch_start(self, batch: int) -> int:
    """I(batch): the number of examples in batches 0 .. batch - 1."""
    return int(self._chunk(batch // _CHUNK)[0][batch % _CHUNK])

  def batch_size(self, batch: int) -> int:
    """E(batch): the number of examples (all processes together) in `batch`."""
    starts = self._chunk(batch // _CHUNK)[0]
    return int(starts[batch % _CHUNK + 1] - starts[batch % _CHUNK])

  def target_weights(self, batch: int) -> np.ndarray:
    """w(batch): the scheduled weights [num_tasks] at the tokens seen when `batch` starts."""
    return self._chunk(batch // _CHUNK)[1][batch % _CHUNK].copy()

  # -- examples -------------------------------------------------------------------------------------

  def _cumulative_target(self, examples: np.ndarray) -> np.ndarray:
    """T(x) [len(x), num_tasks]: the scheduled number of examples of each task among the first x."""
    while self._chunk_starts[-1] <= examples.max():
      self._extend()
    chunk_of = np.searchsorted(self._chunk_starts, examples, side="right") - 1
    result = np.empty((len(examples), self.num_tasks))
    for chunk in np.unique(chunk_of):
      mask = chunk_of == chunk
      starts, weights, targets = self._chunk(int(chunk))
      batch = np.searchsorted(starts, examples[mask], side="right") - 1
      result[mask] = targets[batch] + (examples[mask] - starts[batch])[:, None] * weights[batch]
    return result

  def _block_floor(self, blocks: np.ndarray) -> np.ndarray:
    """F(b) [len(b), num_tasks], int64: the examples of each task in blocks 0 .. b - 1."""
    return np.floor(self._cumulative_target(blocks * self.block_size) + self.offsets).astype(np.int64)

  def _block_of(self, example: int) -> int:
    block = example // self.block_size
    while self._block_floor(np.array([block])).sum() > example:
      block -= 1
    while self._block_floor(np.array([block + 1])).sum() <= example:
      block += 1
    return block

  def assign(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Tasks and per-task indices of the global examples start .. stop - 1.

    Returns (task int32 [n], index int64 [n]): example i is example `index` of task `task`, counting
    that task's examples from the start of the run.
    """
    if stop <= start:
      return np.zeros(0, np.int32), np.zeros(0, np.int64)
    first, last = self._block_of(start), self._block_of(stop - 1)
    floors = self._block_floor(np.arange(first, last + 2))  # [blocks + 1, tasks]
    counts = np.diff(floors, axis=0)
    tasks = np.concatenate([
        philox(self.seed, _TAG_BLOCK, block).permutation(np.repeat(np.arange(self.num_tasks), row))
        for block, row in zip(range(first, last + 1), counts)]).astype(np.int32)
    one_hot = tasks[:, None] == np.arange(self.num_tasks)
    earlier = np.cumsum(one_hot, axis=0) - one_hot  # same-task examples before each, within the span
    index = floors[0][tasks] + earlier[np.arange(len(tasks)), tasks]
    skip = start - int(floors[0].sum())
    return tasks[skip:skip + stop - start], index[skip:skip + stop - start]

  def task_counts(self, start: int, stop: int) -> np.ndarray:
    """int64 [num_tasks]: how many of the global examples start .. stop - 1 each task fills."""
    tasks, _ = self.assign(start, stop)
    return np.bincount(tasks, minlength=self.num_tasks)
