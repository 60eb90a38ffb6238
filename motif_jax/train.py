"""Training entry point: `python -m motif_jax.train --gin_file=... [--gin_param=...] --workdir=DIR`.

Gin files are applied in order, then the bindings; the operative config is written to DIR/config.gin.
A run resumes from DIR by itself.
"""

import os

import gin
from absl import app, flags, logging

from motif_jax import trainer

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files, applied in order.")
GIN_PARAMS = flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. train.num_steps=100.")
WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and logs; a run resumes from it.")

# gin files name each other relative to the repository root (`include 'gin_configs/base.gin'`).
GIN_SEARCH_PATH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  if not WORKDIR.value:
    raise app.UsageError("--workdir is required: checkpoints and logs go there, and a run resumes "
                         "from it.")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  gin.add_config_file_search_path(GIN_SEARCH_PATH)
  gin.parse_config_files_and_bindings(GIN_FILES.value, GIN_PARAMS.value)
  os.makedirs(WORKDIR.value, exist_ok=True)
  with open(os.path.join(WORKDIR.value, "config.gin"), "w", encoding="utf-8") as f:
    f.write(gin.config_str())
  trainer.train(WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
