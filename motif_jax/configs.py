"""Model configurations of the Motif-2 family and their exact parameter counts.

A `ModelConfig` is a frozen description of one architecture (docs/model.md). Presets are looked
up by name with `get_model_config`; `count_params` counts parameters from the model's abstract
initialisation (`jax.eval_shape`), so no memory is allocated even for the 12.7B model.
"""

from __future__ import annotations

import dataclasses
import math

ATTENTION_IMPLS = ("reference", "pallas", "cudnn")
MLP_IMPLS = ("reference", "pallas")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention", "kernels")
PALLAS_BACKENDS = ("auto", "tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Motif-2 decoder.

  Attention heads come in `num_kv_groups` groups; each group has `signal_heads_per_group` signal query
  heads and one noise query head, one signal and one noise key head, and a value pair that together is
  `2 * head_dim` wide. `signal_heads_per_group=4` is the 12.7B's 4:1 GDA; `1` is the original
  Differential Transformer of the 2.6B.
  """

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_kv_groups: int
  signal_heads_per_group: int
  head_dim: int = 128
  tie_embeddings: bool = False
  rope_theta: float = 1e6
  norm_eps: float = 1e-6
  attention_norm_eps: float = 1e-5
  lambda_init_std: float = 0.1
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  attention_impl: str = "reference"
  mlp_impl: str = "reference"
  remat_policy: str = "full"
  # True: the blocks run as one `lax.scan` over the stacked layers (compile time independent of depth).
  # False: an unrolled loop over per-layer slices; longer compiles, but each layer's residuals stay
  # separate buffers instead of being copied into and out of [layers, ...] stacks.
  scan_layers: bool = True
  # Which Pallas kernels "pallas" means: "auto" (by backend: TPU or GPU; CPU falls back to the
  # reference), "tpu" or "gpu"; `pallas_interpret` runs them in interpret mode (tests on CPU).
  pallas_backend: str = "auto"
  pallas_interpret: bool = False

  def __post_init__(self):
    checks = (
        ("attention_impl", self.attention_impl, ATTENTION_IMPLS),
        ("mlp_impl", self.mlp_impl, MLP_IMPLS),
        ("remat_policy", self.remat_policy, REMAT_POLICIES),
        ("pallas_backend", self.pallas_backend, PALLAS_BACKENDS),
    )
    for field, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"ModelConfig.{field}={value!r} is not one of {allowed}.")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_kv_groups",
                  "signal_heads_per_group", "head_dim"):
      if getattr(self, field) <= 0:
        raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}.")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings.")

  @property
  def num_signal_heads(self) -> int:
    return self.num_kv_groups * self.signal_heads_per_group

  @property
  def num_noise_heads(self) -> int:
    return self.num_kv_groups

  @property
  def num_query_heads(self) -> int:
    return self.num_signal_heads + self.num_noise_heads

  @property
  def value_dim(self) -> int:
    """Width of the value each map reads: the concatenated value pair."""
    return 2 * self.head_dim

  @property
  def pallas_impl(self) -> str:
    """The kernels' `impl` argument for "pallas": "auto", "pallas_tpu" or "pallas_gpu"."""
    return "auto" if self.pallas_backend == "auto" else f"pallas_{self.pallas_backend}"

  def lambda_init(self, layer_index):
    """lambda_init of the 0-based layer index, as the released weights expect (docs/model.md)."""
    import jax.numpy as jnp  # local: configs stay importable without jax

    return 0.8 - 0.6 * jnp.exp(-0.3 * (layer_index - 1))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


_PRESETS = {
    "tiny": ModelConfig(
        name="tiny", vocab_size=384, hidden_size=128, intermediate_size=512, num_layers=2,
        num_kv_groups=2, signal_heads_per_group=2, head_dim=32, tie_embeddings=False,
        rope_theta=1e4, param_dtype="float32", compute_dtype="float32"),
    "motif-2.6b": ModelConfig(
        name="motif-2.6b", vocab_size=219_520, hidden_size=2048, intermediate_size=8192,
        num_layers=32, num_kv_groups=8, signal_heads_per_group=1, head_dim=128,
        tie_embeddings=True, rope_theta=5e5),
    "motif-2-12.7b": ModelConfig(
        name="motif-2-12.7b", vocab_size=219_520, hidden_size=4096, intermediate_size=16384,
        num_layers=40, num_kv_groups=8, signal_heads_per_group=4, head_dim=128,
        tie_embeddings=False, rope_theta=1e6),
}


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def get_model_config(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name` with any field overridden, e.g. `get_model_config("tiny", num_layers=4)`."""
  if name not in _PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {preset_names()}.")
  return _PRESETS[name].replace(**overrides)


def count_params(cfg: ModelConfig) -> int:
  """Exact parameter count, from the abstract parameters of `MotifForCausalLM` (no memory used)."""
  from motif_jax.model import abstract_params  # local: the model imports this module

  return sum(math.prod(leaf.shape) for leaf in _leaves(abstract_params(cfg)))


def _leaves(tree):
  import jax

  return jax.tree_util.tree_leaves(tree)
