"""Training data: sources as seqio Tasks, a curriculum mixture over tokens seen, packed resumable batches.

Importing this package stays cheap (gin and numpy): TensorFlow and seqio load only when
`make_train_data` runs on text tasks, or when `motif_jax.data.tasks` or `motif_jax.data.sources` is
imported. A curriculum of pre-tokenized token files (`motif_jax.data.token_files`) needs neither.
Importing it registers the gin configurables of `motif_jax.data.config` (`curriculum`, the sources).
"""

from motif_jax.data.config import Curriculum, DataConfig
from motif_jax.data.corpus import DOMAINS, documents
from motif_jax.data.pipeline import TrainData, make_train_data

__all__ = ["DOMAINS", "Curriculum", "DataConfig", "TrainData", "documents", "make_train_data"]
