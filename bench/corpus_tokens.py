"""Writes the embedded corpus as byte-level token files: `python bench/corpus_tokens.py OUT_DIR`.

One flat uint16 stream per domain (OUT_DIR/code.bin, prose.bin, math.bin): every document's UTF-8
bytes as ids byte + 3 followed by the EOS id 1, the ids seqio's ByteVocabulary gives, so a run on
these files sees the same tokens as the smoke run sees through seqio. It needs only numpy: the token
files are the data for machines without TensorFlow (the GPU checks, `gin_configs/experiments/
motif_2_6b_one_gpu.gin`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402  (after the path set-up above)

from motif_jax.data import corpus  # noqa: E402

BYTE_OFFSET, EOS_ID = 3, 1  # seqio.ByteVocabulary: pad 0, EOS 1, unknown 2, then the 256 bytes


def domain_tokens(domain: str) -> np.ndarray:
  """uint16 [tokens]: the domain's documents, each as byte ids then EOS, in corpus order."""
  pieces = []
  for text in corpus.documents(domain):
    pieces.append(np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16) + BYTE_OFFSET)
    pieces.append(np.array([EOS_ID], np.uint16))
  return np.concatenate(pieces)


def main(argv):
  if len(argv) != 1:
    raise SystemExit("usage: python bench/corpus_tokens.py OUT_DIR")
  os.makedirs(argv[0], exist_ok=True)
  for domain in corpus.DOMAINS:
    tokens = domain_tokens(domain)
    path = os.path.join(argv[0], f"{domain}.bin")
    tokens.tofile(path)
    print(f"{path}: {tokens.size:,} tokens")


if __name__ == "__main__":
  main(sys.argv[1:])
