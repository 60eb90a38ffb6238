"""Flax NNX model of Motif-2: Grouped Differential Attention and the PolyNorm-gated MLP."""

from motif_jax.model.transformer import (
    DecoderBlock,
    MotifForCausalLM,
    abstract_params,
    init_params,
    param_logical_axes,
    split_model,
)

__all__ = [
    "DecoderBlock",
    "MotifForCausalLM",
    "abstract_params",
    "init_params",
    "param_logical_axes",
    "split_model",
]
