"""Packing one batch's examples into a fixed number of rows, independently of every other batch.

`pack(examples, rows, seq_len)` places whole examples first-fit in decreasing order of length, then
splits the examples that fit nowhere whole across the remaining gaps, largest gap first (each part is a
segment of its own, with positions from 0), and drops what is left once every row is full. Examples
longer than a row are first cut into row-long parts. The result depends only on this batch's examples,
which is what lets a run resume at any batch without packing the batches before it.

Rows are laid out as seqio's packing lays them out: `targets` with `segment_ids` 1, 2, ... per row
(0 on padding) and `positions` restarting at 0 in every segment; padding only at the end of a row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class PackedRows:
  """targets, segment_ids, positions: int32 [rows, seq_len]; dropped: tokens that did not fit."""

  targets: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  dropped: int


def pack(examples: Sequence[np.ndarray], rows: int, seq_len: int) -> PackedRows:
  """Packs int32 token arrays into [rows, seq_len] (see the module docstring)."""
  parts = [e[i:i + seq_len] for e in examples for i in range(0, len(e), seq_len)]
  lengths = np.array([len(p) for p in parts], dtype=np.int64)
  free = np.full(rows, seq_len, dtype=np.int64)
  placed: list[list[np.ndarray]] = [[] for _ in range(rows)]
  unplaced = []
  for i in np.argsort(-lengths, kind="stable"):
    if lengths[i] == 0:
      continue
    fits = free >= lengths[i]
    if fits.any():
      row = int(np.argmax(fits))
      placed[row].append(parts[i])
      free[row] -= lengths[i]
    else:
      unplaced.append(parts[i])
  dropped = 0
  for rest in unplaced:
    while len(rest) and free.max() > 0:
      row = int(np.argmax(free))
      placed[row].append(rest[:free[row]])
      free[row] -= len(placed[row][-1])
      rest = rest[len(placed[row][-1]):]
    dropped += len(rest)

  targets = np.zeros((rows, seq_len), np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  positions = np.zeros((rows, seq_len), np.int32)
  for row, segments in enumerate(placed):
    if not segments:
      continue
    sizes = [len(s) for s in segments]
    used = sum(sizes)
    targets[row, :used] = np.concatenate(segments)
    segment_ids[row, :used] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    starts = np.repeat(np.cumsum([0] + sizes[:-1]), sizes)
    positions[row, :used] = np.arange(used) - starts
  return PackedRows(targets, segment_ids, positions, dropped)
