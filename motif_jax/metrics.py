"""The FLOP model behind MFU, and the writers that report training metrics.

FLOP convention (stated in every log line as `flops=causal-half`):
- Matmuls: 2 FLOPs per multiply-add of every projection (q, k, v, o, gate, up, down) and the LM
  head; the embedding lookup costs nothing.
- Attention: both GDA maps counted. Per layer and query token, each of the
  `groups * (signal_per_group + 1)` query heads computes scores against `seq` keys over `head_dim`
  and mixes a `2 * head_dim` value: 2 * seq * 3 * head_dim FLOPs per head, halved for causal masking.
- Training = 3 x forward (the backward pass costs twice the forward); recomputation under remat is
  not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import json
import time

from etils import epath

from motif_jax.configs import ModelConfig

FLOP_CONVENTION = "causal-half"

# Dense bf16 peak per device, FLOP/s, from the vendors' datasheets.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """Datasheet bf16 peak of a `jax.Device.device_kind`, or None when unknown (e.g. CPU)."""
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
    if name.lower() in device_kind.lower():
      return flops
  return None


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token under the convention in this module's docstring."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  projections = d * (cfg.num_query_heads * hd + 2 * 2 * cfg.num_kv_groups * hd)  # q, k, v
  projections += cfg.num_signal_heads * cfg.value_dim * d  # o
  projections += 3 * d * f  # gate, up, down
  attention = 0.5 * 2 * seq_len * 3 * hd * cfg.num_query_heads
  per_layer = 2 * projections + attention
  return cfg.num_layers * per_layer + 2 * d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 3 * forward_flops_per_token(cfg, seq_len)


class MetricWriter:
  """Writes scalars to the console, a JSONL file and TensorBoard event files in `logdir`.

  `logdir` is a local path or a gs:// bucket path (TensorBoard files there need the
  google-cloud-storage package). Only the process that owns it writes; callers create it on
  process 0 alone.
  """

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter

    path = epath.Path(logdir)
    path.mkdir(parents=True, exist_ok=True)
    self._tensorboard = SummaryWriter(logdir)
    self._jsonl = (path / "metrics.jsonl").open("a", encoding="utf-8")

  def write(self, step: int, scalars: dict[str, float], console: str | None = None) -> None:
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    if console:
      print(console, flush=True)

  def close(self) -> None:
    self._tensorboard.close()
    self._jsonl.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"
