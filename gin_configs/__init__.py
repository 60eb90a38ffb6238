"""The gin files of motif-jax, installed with the package so that gin_configs/... paths resolve."""
