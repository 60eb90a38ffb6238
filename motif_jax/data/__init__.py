"""Training data: the embedded offline corpus, its seqio Tasks, and packed batches for the trainer.

Importing this package stays cheap: TensorFlow and seqio load only when `make_train_data` runs (or when
`motif_jax.data.tasks` is imported directly).
"""

from motif_jax.data.corpus import DOMAINS, documents
from motif_jax.data.pipeline import DataConfig, TrainData, make_train_data

__all__ = ["DOMAINS", "DataConfig", "TrainData", "documents", "make_train_data"]
