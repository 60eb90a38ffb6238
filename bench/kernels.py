"""Kernel benchmarks on the accelerator: `python bench/kernels.py polynorm|gda [options]`.

Each subcommand prints a table and writes JSON next to it (into $OUT when set, else the working directory).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBCOMMANDS = {"polynorm": "bench.kernels_polynorm", "gda": "bench.kernels_gda"}


def main(argv):
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    raise SystemExit(f"usage: python bench/kernels.py {{{'|'.join(SUBCOMMANDS)}}} [options]")
  module = __import__(SUBCOMMANDS[argv[1]], fromlist=["main"])
  module.main(argv[2:])


if __name__ == "__main__":
  main(sys.argv)
