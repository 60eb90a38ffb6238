"""One task's example stream: its documents cut into pieces of about a row, in a new order every epoch.

An example is a piece of a document. Document r is cut into `pieces[r] = ceil(tokens_r / seq_len)`
pieces, where tokens_r is estimated *before reading it* from its size bound and the task's tokens per
byte: `tokens_r = tokens_per_byte * sizes[r] + added_tokens` (1 for text: the EOS the tokenizer appends;
token files give exact token counts with tokens_per_byte 1 and added_tokens 0). Once read and tokenized
(T tokens with EOS), piece p of n holds tokens [floor(p T / n), floor((p + 1) T / n)) (`piece_span`):
nearly equal pieces, each about a row long or less.

Epoch e of the task is a permutation of all its pieces (Philox keyed by the seed, with the task and the
epoch in its counter), so neighbouring examples come from different documents. Example j of the task is
found by arithmetic: epoch j // M (M = pieces per epoch), its permuted piece, then a binary search of the
documents' running piece counts. No document is read to locate an example.
"""

from __future__ import annotations

import numpy as np

from motif_jax.data import curriculum

_TAG = 3  # the Philox stream of epoch permutations (curriculum.py uses 1 and 2)


class TaskExamples:
  """Example index -> (document, piece, pieces) for one task; see the module docstring.

  sizes: int64 [documents], upper bounds of the documents' UTF-8 sizes (or their exact token counts).
  tokens_per_byte: the task's tokens per byte of `sizes` (measured on a sample of its documents).
  added_tokens: tokens every document gets beyond `tokens_per_byte * sizes` (1: the EOS of tokenization).
  """

  def __init__(self, sizes: np.ndarray, *, tokens_per_byte: float, seq_len: int, seed: int, task: int,
               added_tokens: float = 1.0):
    self.tokens_per_byte = tokens_per_byte
    estimated = tokens_per_byte * np.asarray(sizes, dtype=np.float64) + added_tokens
    self.pieces = np.maximum(1, np.ceil(estimated / seq_len)).astype(np.int64)  # [documents]
    self.ends = np.cumsum(self.pieces)  # [documents]: pieces of documents 0 .. r
    self.per_epoch = int(self.ends[-1])
    self.mean_tokens = float(estimated.sum() / self.per_epoch)  # estimated tokens per example
    self.seed, self.task = seed, task
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    """int64 [per_epoch]: the pieces of `epoch` in their order (piece ids count through the documents)."""
    if epoch not in self._orders:
      if len(self._orders) >= 2:  # readers move forward; keep the current epoch and the next
        del self._orders[min(self._orders)]
      self._orders[epoch] = curriculum.philox(self.seed, _TAG, epoch, self.task).permutation(self.per_epoch)
    return self._orders[epoch]

  def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For example indices int64 [n]: (document, piece, pieces), each int64 [n]."""
    index = np.asarray(index, dtype=np.int64)
    ids = np.empty_like(index)
    epochs = index // self.per_epoch
    for epoch in np.unique(epochs):
      mask = epochs == epoch
      ids[mask] = self._order(int(epoch))[index[mask] - epoch * self.per_epoch]
    document = np.searchsorted(self.ends, ids, side="right")
    return document, ids - (self.ends[document] - self.pieces[document]), self.pieces[document]


def piece_span(size: int, piece: int, pieces: int) -> tuple[int, int]:
  """[start, stop): where piece `piece` of `pieces` nearly equal pieces of `size` tokens lies."""
  size, piece, pieces = int(size), int(piece), int(pieces)
  return piece * size // pieces, (piece + 1) * size // pieces


def cut(tokens: np.ndarray, piece: int, pieces: int) -> np.ndarray:
  """Piece `piece` of `pieces` nearly equal pieces of `tokens` [T]."""
  start, stop = piece_span(len(tokens), piece, pieces)
  return tokens[start:stop]
