"""Pre-tokenized token files as a curriculum source: flat streams of token ids, memory-mapped.

    curriculum.tasks = {'web': @web/token_files()}
    web/token_files.paths = ['/data/web/*.bin']   # globs allowed
    web/token_files.dtype = 'uint16'              # 'uint32' for more than 65,536 ids
    web/token_files.eos_id = 0                    # None: no document boundaries in the streams
    web/token_files.vocab_size = 50304

A file is a 1-D stream of token ids: `.npy` (`np.save` of a uint16/uint32 array of `dtype`) or raw `.bin`
(the ids back to back in this machine's byte order, e.g. `np.asarray(ids, np.uint16).tofile('x.bin')`).
Files are memory-mapped and never read whole: opening a source scans each file once, in chunks, for its
largest id (checked against `vocab_size`) and its EOS positions; a batch then reads only its pieces.

Documents: with `eos_id`, a document ends after every EOS (keeping it) and at the end of its file;
without it, each file is cut into row-long documents of `seq_len` tokens (the last of a file shorter).
Documents never span files. From there on they are examples as text documents are (examples.py), with
exact token counts as their sizes: so the plan, the resume and the host slices are those of text.

Importing this module needs only numpy: no TensorFlow, no seqio.
"""

from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np
from absl import logging

from motif_jax.data import config, examples
from motif_jax.data.paths import expand_paths

SCAN_TOKENS = 1 << 24  # tokens per chunk when scanning a file (32 MiB of uint16)
OPEN_FILES = 64  # memory maps a source keeps open (the least recently used is closed first)
SUFFIXES = (".npy", ".bin")


class TokenFileSource:
  """The documents of one `token_files` task, addressable by index (as sources.IndexedSource, for ids).

  sizes: int64 [documents], exact token counts (each document's EOS included).
  `piece(document, piece, pieces)` reads one example's tokens; `read(ids)` whole documents.
  """

  def __init__(self, spec: config.TokenFiles, seq_len: int, setting: str):
    self.spec, self.setting = spec, setting
    self.dtype = np.dtype(spec.dtype)
    self.files = expand_paths(spec.paths, setting)
    self._maps: collections.OrderedDict = collections.OrderedDict()  # file -> memory map
    spans = [self._index(f, seq_len) for f in range(len(self.files))]
    self.file_of = np.concatenate([np.full(len(s), f, np.int32) for f, (s, _) in enumerate(spans)])
    self.starts = np.concatenate([s for s, _ in spans])  # int64 [documents], offsets in their file
    self.sizes = np.concatenate([e for _, e in spans]) - self.starts
    self.tokens = int(self.sizes.sum())
    self.description = (f"{setting} (token files {list(spec.paths)}: {len(self.files)} files, "
                        f"{self.tokens:,} tokens)")
    self.reads = 0  # documents or pieces read

  def __len__(self) -> int:
    return len(self.sizes)

  # -- opening and indexing -------------------------------------------------------------------------

  def _fail(self, path: str, problem: str, fix: str) -> ValueError:
    return ValueError(f"{self.setting}: {path} {problem}; {fix}.")

  def _open(self, path: str) -> np.ndarray:
    """The file's ids as a read-only memory map [tokens], checked for format, dtype, rank and emptiness."""
    write = f"write it with np.asarray(ids, np.{self.dtype}).tofile(path) (.bin) or np.save (.npy)"
    if path.endswith(".npy"):
      try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
      except (ValueError, OSError) as e:
        raise self._fail(path, f"is not a readable .npy array ({e})", write) from e
      if tokens.ndim != 1:
        raise self._fail(path, f"holds an array of shape {tokens.shape}, not a 1-D stream",
                         f"save the ids flat: np.save(path, ids.reshape(-1).astype(np.{self.dtype}))")
      if tokens.dtype != self.dtype:
        fix = (f"set token_files.dtype='{tokens.dtype}'" if tokens.dtype.name in config.TOKEN_DTYPES
               and tokens.dtype.isnative else f"save it as np.save(path, ids.astype(np.{self.dtype}))")
        held = tokens.dtype.name if tokens.dtype.isnative else tokens.dtype.str
        raise self._fail(path, f"holds {held} ids, not token_files.dtype='{self.dtype}'", fix)
    elif path.endswith(".bin"):
      size = os.path.getsize(path)
      if size % self.dtype.itemsize:
        raise self._fail(path, f"has {size} bytes, not a whole number of {self.dtype} ids "
                         f"({self.dtype.itemsize} bytes each)", "check token_files.dtype against the writer")
      tokens = np.memmap(path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
    else:
      raise self._fail(path, f"is neither {' nor '.join(SUFFIXES)}",
                       "token_files reads .npy arrays and raw .bin streams: narrow token_files.paths to them")
    if not len(tokens):
      raise self._fail(path, "holds no tokens", "remove it from token_files.paths (or the glob) or fill it")
    return tokens

  def _tokens(self, file: int) -> np.ndarray:
    """The memory map of file `file`, opened on first use (at most OPEN_FILES stay open)."""
    if file not in self._maps:
      if len(self._maps) >= OPEN_FILES:
        self._maps.popitem(last=False)
      self._maps[file] = self._open(self.files[file])
    self._maps.move_to_end(file)
    return self._maps[file]

  def _index(self, file: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 of the file's documents; checks every id against vocab_size on the way."""
    path, tokens = self.files[file], self._tokens(file)
    eos, vocab_size = self.spec.eos_id, self.spec.vocab_size
    breaks = []
    for offset in range(0, len(tokens), SCAN_TOKENS):
      chunk = np.asarray(tokens[offset:offset + SCAN_TOKENS])
      if int(chunk.max()) >= vocab_size:
        at = offset + int(np.argmax(chunk >= vocab_size))
        raise self._fail(path, f"holds token id {int(tokens[at])} (at token {at:,}) >= "
                         f"token_files.vocab_size={vocab_size}",
                         "set vocab_size to the tokenizer's number of ids, or check dtype")
      if eos is not None:
        breaks.append(np.flatnonzero(chunk == eos) + offset)
    size = len(tokens)
    if eos is None:
      starts = np.arange(0, size, seq_len, dtype=np.int64)
      return starts, np.minimum(starts + seq_len, size)
    ends = np.concatenate(breaks).astype(np.int64) + 1
    if not len(ends):
      logging.warning("%s: %s holds no eos_id=%d; it is read as one document.", self.setting, path, eos)
    if not len(ends) or ends[-1] != size:
      ends = np.append(ends, size)
    return np.concatenate([[0], ends[:-1]]).astype(np.int64), ends

  # -- reading --------------------------------------------------------------------------------------

  def _span(self, document: int, start: int, stop: int) -> np.ndarray:
    """int32 [stop - start]: tokens start .. stop - 1 of `document`."""
    offset = int(self.starts[document])
    return np.asarray(self._tokens(int(self.file_of[document]))[offset + start:offset + stop], np.int32)

  def piece(self, document: int, piece: int, pieces: int) -> np.ndarray:
    """int32 [n]: piece `piece` of `pieces` of `document` (examples.piece_span), read from its file."""
    self.reads += 1
    return self._span(document, *examples.piece_span(self.sizes[document], piece, pieces))

  def read(self, ids: Sequence[int]) -> list[np.ndarray]:
    """The documents at `ids` (any order, repeats allowed), each int32 [size]."""
    self.reads += len(ids)
    return [self._span(int(i), 0, int(self.sizes[i])) for i in ids]
