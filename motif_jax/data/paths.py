"""File lists of data sources: globs expanded, every pattern checked (no TensorFlow, no seqio)."""

from __future__ import annotations

import glob
import os
from typing import Sequence


def expand_paths(paths: Sequence[str], setting: str) -> list[str]:
  """Files matched by `paths` (globs allowed), in order; raises naming `setting` if one matches nothing."""
  files = []
  for pattern in paths:
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise FileNotFoundError(f"{setting}: no file matches {pattern!r}; check the path (globs are allowed).")
    files.extend(m for m in matched if os.path.isfile(m))
  if not files:
    raise FileNotFoundError(f"{setting}: {list(paths)} match only directories; name the files.")
  return files
