"""Fused Grouped Differential Attention (GDA) flash kernels (docs/kernels.md; the layer: docs/model.md).

Per KV group g the layer has `S` signal query heads q1_{g,j}, one noise query head q2_g, a signal key
k1_g, a noise key k2_g and one value V_g = [v1_g, v2_g] of width 2 * head_dim. With
scale = 1 / sqrt(head_dim):

    A1_{g,j} = softmax(q1_{g,j} k1_g^T * scale)      O1_{g,j} = A1_{g,j} V_g     (signal map)
    A2_g     = softmax(q2_g    k2_g^T * scale)      O2_g     = A2_g     V_g     (noise map)

both under the causal mask and, for packed rows, the segment mask. `gda_attention` returns O1, O2,
their log-sum-exp statistics and the per-head max logits that QK-Clip needs. The model forms
(1 - lambda_init) * RMSNorm(O1 - lambda * O2) itself: that combination is elementwise on
[B, T, G, S, 2D] and XLA fuses it with the norm, while fusing it here would tie the kernel to lambda and
the norm gain and make the backward return d(lambda) as well; what the kernel saves is the softmax work
and the reads of V, and it keeps those either way.

How the kernels are built. Each softmax map is a grouped-query flash attention whose value is twice as
wide as the query/key head (`_flash_map`, one `jax.custom_vjp`): the signal map has S query heads per
key, the noise map one. Each map is computed once against the 256-wide V (not once per half of V as
four plain attention calls do). The backward recomputes the probabilities from the saved log-sum-exp:
one kernel for dq, one for dk and dv that loops over the S query heads sharing a key, so dk1 sums the
S signal heads in-kernel; dv = dv(signal map) + dv(noise map) is summed by autodiff across the two maps.
The max logits are the online softmax's final running max per query row (no extra pass over keys).

Backends (`impl`):
  "reference"   plain jnp, float32 softmax, explicit masks (`gda_attention_reference`): float32 dots at
                HIGHEST precision, the test oracle; with `exact=False`, dots in the inputs' dtype with
                float32 accumulation, as XLA runs attention (the model's attention_impl="reference").
  "pallas_tpu"  Pallas Mosaic TPU kernels, head-major layout ([B, G, H, T, D], transposed in here).
  "pallas_gpu"  Pallas GPU kernels lowered through Triton, on the caller's [B, T, G, H, D] layout (no
                copies unless T needs padding).
  "cudnn"       GPU only: four `jax.nn.dot_product_attention(implementation="cudnn")` calls
                (q1k1v1, q1k1v2, q2k2v1, q2k2v2). cuDNN cannot return max logits, so the statistics
                come from a separate XLA pass that materialises the [B, G, S+1, T, T] scores: on an
                H200 at T=4096 it cost 2.5 ms (+45% on fwd+bwd) in shared/notes/h200_baselines.md,
                and ~9 ms here with float32 HIGHEST-precision dots, since replaced by bf16 dots with
                float32 accumulation (not re-measured). Segments go through an explicit
                [B, 1, T, T] mask, which cuDNN runs much slower than its causal mask.
  "auto"        TPU -> "pallas_tpu", GPU -> "pallas_gpu", anything else -> "reference".

Sharding (`gda_attention_sharded`): every group is independent, so the batch axis B and the group axis
G (the one the `tensor` mesh axis shards) split over devices with no communication: each device runs
`gda_attention` on its rows and groups under `jax.shard_map` (`check_vma=False`: the Pallas calls declare
no varying mesh axes), and `max_logits` [G, S+1] takes a `lax.pmax` over the batch axes.

Speed (H200, 12.7B layout G=8 S=4 D=128, B=2, T=4096, bf16; bench/kernels_gda.py): the Triton kernels
run the forward in ~1.5 ms (about 340 TFLOP/s, under cuDNN's four calls at ~1.7 ms, over tokamax's two
Mosaic GPU calls at ~1.0-1.2 ms) and forward+backward in ~7.7 ms (cuDNN four calls ~5.7-6.0 ms). The
backward's gap is structural to this two-kernel Triton design: dq and dk/dv each recompute the
probabilities (7 matmuls per tile pair instead of 5) on small Triton tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully masked tiles never give inf - inf
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
IMPLS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "cudnn")


class GdaOutput(NamedTuple):
  """What `gda_attention` returns.

  signal:     [B, T, G, S, 2D] input dtype, O1 = A1 V per signal head.
  noise:      [B, T, G, 2D] input dtype, O2 = A2 V per group.
  lse_signal: [B, G, S, T] float32, natural-log log-sum-exp of each signal query row's masked logits.
  lse_noise:  [B, G, T] float32, the same for the noise map.
  max_logits: [G, S + 1] float32, per query head the max over batch and query positions of the masked
              scaled logit q.k * scale; index S (last) is the noise head. Not differentiable.
  """

  signal: jax.Array
  noise: jax.Array
  lse_signal: jax.Array
  lse_noise: jax.Array
  max_logits: jax.Array


def gda_attention(q_signal, q_noise, k_signal, k_noise, value, *, segment_ids=None, causal=True,
                  scale=None, impl="auto", block_q=None, block_k=None, block_q_dq=None,
                  block_k_dq=None, block_q_dkv=None, block_k_dkv=None, num_warps=None,
                  num_warps_dq=None, num_warps_dkv=None, num_stages=None, interpret=None,
                  exact=True) -> GdaOutput:
  """Grouped Differential Attention: both softmax maps of every KV group against the shared value.

  Args:
    q_signal: [B, T, G, S, D] signal query heads (S per group; the 12.7B: S=4, D=128).
    q_noise: [B, T, G, D] the noise query head of each group.
    k_signal: [B, T, G, D] signal key k1, shared by the group's S signal heads.
    k_noise: [B, T, G, D] noise key k2.
    value: [B, T, G, 2D] V = [v1, v2], shared by all S + 1 query heads of the group.
    segment_ids: optional int32 [B, T]. Packed rows: a query attends only keys with its segment id.
    causal: a query at position t attends only keys at positions <= t (self-attention, same T).
    scale: logit scale; default 1 / sqrt(D).
    impl: "auto" | "reference" | "pallas_tpu" | "pallas_gpu" | "cudnn" (see the module docstring).
    block_q, block_k: forward tile sizes along queries and keys (kernels only). T need not divide
      them: it is padded inside and the padding masked.
    block_q_dq, block_k_dq: dq kernel tiles (query rows per program, keys per step);
      block_q_dkv, block_k_dkv: dk/dv kernel tiles (queries per step, key rows per program).
      Defaults (forward; dq; dk/dv): GPU 128 x 128; 64 x 32; 64 x 32 (with S=1: 128 x 64; 64 x 64;
      64 x 64, dq 4 warps, dk/dv 8 warps, 3 stages), smaller for float32 inputs (Triton keeps the
      tiles in shared memory); TPU 128 x 128, backward = forward tiles.
    num_warps, num_warps_dq, num_warps_dkv: Triton warps of the forward, dq and dk/dv kernels
      (default: 8 when the kernel's float32 accumulator tile has >= 128 x 128 elements, else 4);
      num_stages: Triton pipeline stages of all three (default 2).
    interpret: run the Pallas kernels in interpret mode. Default: on when the backend does not match
      the kernel (TPU kernel -> `pltpu.InterpretParams()`, GPU kernel -> `True`).
    exact: impl="reference" only, see `gda_attention_reference`.

  Returns:
    `GdaOutput(signal, noise, lse_signal, lse_noise, max_logits)`, shapes in its docstring. Gradients
    flow to the five float inputs through `signal`, `noise` and the lse fields (impl="cudnn": through
    `signal` and `noise` only); `max_logits` is wrapped in `stop_gradient`.
  """
  _check_shapes(q_signal, q_noise, k_signal, k_noise, value, segment_ids)
  seq_len, head_dim = q_signal.shape[1], q_signal.shape[-1]
  scale = float(1.0 / math.sqrt(head_dim) if scale is None else scale)
  impl = _resolve_impl(impl)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  if impl == "reference":
    return gda_attention_reference(q_signal, q_noise, k_signal, k_noise, value,
                                   segment_ids=segment_ids, causal=causal, scale=scale, exact=exact)
  if impl == "cudnn":
    return _gda_cudnn(q_signal, q_noise, k_signal, k_noise, value, segment_ids, causal, scale)

  on_tpu = impl == "pallas_tpu"
  if interpret is None:
    backend_matches = jax.default_backend() == ("tpu" if on_tpu else "gpu")
    interpret = False if backend_matches else (pltpu.InterpretParams() if on_tpu else True)
  given = dict(block_q=block_q, block_k=block_k, block_q_dq=block_q_dq, block_k_dq=block_k_dq,
               block_q_dkv=block_q_dkv, block_k_dkv=block_k_dkv)
  defaults = _default_blocks(on_tpu, jnp.dtype(q_signal.dtype).itemsize, q_signal.shape[3],
                             block_q, block_k)
  blocks = {name: size or defaults[name] for name, size in given.items()}
  if not on_tpu:
    _check_gpu_sizes(head_dim, value.shape[-1], *blocks.values())
  padded_len = _round_up(seq_len, math.lcm(*blocks.values()))
  warps = (num_warps, num_warps_dq or defaults.get("num_warps_dq"),
           num_warps_dkv or defaults.get("num_warps_dkv"))
  cfg = _MapConfig(impl=impl, causal=causal, scale=scale, kv_len=seq_len, **blocks,
                   num_warps=warps, num_stages=num_stages or defaults.get("num_stages", 2),
                   interpret=interpret)

  pad = padded_len - seq_len
  def pad_time(x):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
  q_signal, q_noise, k_signal, k_noise, value = map(
      pad_time, (q_signal, q_noise, k_signal, k_noise, value))
  if segment_ids is not None and pad:
    segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], mode="edge")
  q_noise = q_noise[:, :, :, None, :]  # the noise map: one query head per group
  if on_tpu:  # head-major [B, G, H, T, D]: Mosaic tiles the last two dims
    q_signal, q_noise = (jnp.transpose(x, (0, 2, 3, 1, 4)) for x in (q_signal, q_noise))
    k_signal, k_noise, value = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k_signal, k_noise, value))

  signal, lse_signal, row_max_signal = _flash_map(cfg, q_signal, k_signal, value, segment_ids)
  noise, lse_noise, row_max_noise = _flash_map(cfg, q_noise, k_noise, value, segment_ids)

  if on_tpu:
    signal, noise = (jnp.transpose(x, (0, 3, 1, 2, 4)) for x in (signal, noise))
  signal = signal[:, :seq_len]
  noise = noise[:, :seq_len, :, 0]
  row_max = jnp.concatenate([row_max_signal, row_max_noise], axis=2)[..., :seq_len]  # [B, G, S+1, T]
  max_logits = lax.stop_gradient(jnp.max(row_max, axis=(0, 3)))
  return GdaOutput(signal, noise, lse_signal[..., :seq_len], lse_noise[:, :, 0, :seq_len], max_logits)


def gda_attention_sharded(q_signal, q_noise, k_signal, k_noise, value, *, mesh,
                          batch_axes=("data", "fsdp"), group_axes=("tensor",), segment_ids=None,
                          impl="auto", **kwargs) -> GdaOutput:
  """`gda_attention` with the batch B split over the mesh axes `batch_axes` and the groups G over
  `group_axes`: each device runs `gda_attention` on its rows and groups (no communication), and the
  max logits are `pmax`ed over `batch_axes`. Equal to the unsharded result.

  With no mesh, an empty one or a single device, this is `gda_attention`. impl="reference" runs the
  plain reference on the whole arrays and leaves the split to the partitioner.

  Args:
    q_signal, q_noise, k_signal, k_noise, value, segment_ids: as in `gda_attention`, with B divisible
      by the size of `batch_axes` and G by that of `group_axes`.
    mesh: a `Mesh`, the `AbstractMesh` of `jax.sharding.get_abstract_mesh()` under jit, or None.
    batch_axes, group_axes: mesh axis names; empty: that axis is not split.
    impl, kwargs: as in `gda_attention`.

  Returns:
    `GdaOutput` as from `gda_attention`: signal, noise, lse_signal and lse_noise split over
    `batch_axes` (axis 0) and `group_axes` (their G axis), max_logits [G, S + 1] over `group_axes`.
  """
  attend = functools.partial(gda_attention, impl=impl, **kwargs)
  if mesh is None or mesh.empty or mesh.size == 1 or _resolve_impl(impl) == "reference":
    return attend(q_signal, q_noise, k_signal, k_noise, value, segment_ids=segment_ids)
  batch, groups = tuple(batch_axes) or None, tuple(group_axes) or None
  batch_shards = math.prod(mesh.shape[name] for name in batch or ())
  group_shards = math.prod(mesh.shape[name] for name in groups or ())
  if q_signal.shape[0] % batch_shards or q_signal.shape[2] % group_shards:
    raise ValueError(
        f"gda_attention_sharded: q_signal {q_signal.shape} needs B divisible by {batch_shards} (mesh "
        f"axes {batch}) and G by {group_shards} (mesh axes {groups}); pad the batch or change the mesh.")
  packed = segment_ids is not None

  def per_shard(*operands):
    out = attend(*operands[:5], segment_ids=operands[5] if packed else None)
    return out._replace(max_logits=lax.pmax(out.max_logits, batch) if batch else out.max_logits)

  heads, signal = P(batch, None, groups, None), P(batch, None, groups, None, None)
  in_specs = (signal,) + (heads,) * 4 + ((P(batch, None),) if packed else ())
  out_specs = GdaOutput(signal, heads, P(batch, groups, None, None), P(batch, groups, None),
                        P(groups, None))
  operands = (q_signal, q_noise, k_signal, k_noise, value) + ((segment_ids,) if packed else ())
  return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*operands)


# ----------------------------------------------------------------------------------------------------
# Reference (pure jnp) and cuDNN composition.


def gda_attention_reference(q_signal, q_noise, k_signal, k_noise, value, *, segment_ids=None,
                            causal=True, scale=None, exact=True) -> GdaOutput:
  """Plain jnp GDA with float32 logits and softmax: materialises the [B, G, H, T, T] logits. Same
  contract as `gda_attention`; gradients come from autodiff.

  exact: True (the tests' oracle): float32 operands and HIGHEST-precision dots throughout. False: the
    dots take the inputs' dtype with float32 accumulation of the logits, and the probabilities are cast
    to the value's dtype for A V, as XLA runs attention (fast on tensor cores; the model's
    attention_impl="reference"). For float32 inputs the two differ only in the dots' precision.
  """
  head_dim = q_signal.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  mask = _reference_mask(q_signal.shape[1], segment_ids, causal)
  value_operand = value.astype(jnp.float32) if exact else value
  precision = lax.Precision.HIGHEST if exact else None

  def one_map(q, k):  # q [B, T, G, H, D], k [B, T, G, D]
    logits = _reference_logits(q, k, mask, scale, exact)  # [B, G, H, T, T]
    probs = jax.nn.softmax(logits, axis=-1).astype(value_operand.dtype)
    out = jnp.einsum("bghtu,buge->btghe", probs, value_operand, precision=precision)
    return (out.astype(value.dtype), jax.nn.logsumexp(logits, axis=-1),
            jnp.max(logits, axis=(0, 3, 4)))

  signal, lse_signal, max_signal = one_map(q_signal, k_signal)
  noise, lse_noise, max_noise = one_map(q_noise[:, :, :, None, :], k_noise)
  max_logits = lax.stop_gradient(jnp.concatenate([max_signal, max_noise], axis=1))
  return GdaOutput(signal, noise[:, :, :, 0], lse_signal, lse_noise[:, :, 0], max_logits)


def _reference_mask(seq_len, segment_ids, causal):
  """Boolean [B or 1, 1, 1, T, T] (query, key) mask, True where a query may attend a key."""
  mask = jnp.ones((1, 1, 1, seq_len, seq_len), bool)
  if causal:
    mask = mask & jnp.tril(jnp.ones((seq_len, seq_len), bool))
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, None, :, None] == segment_ids[:, None, None, None, :])
  return mask


def _reference_logits(q, k, mask, scale, exact=True):
  """Masked float32 logits [B, G, H, T, T] (-inf where masked) of q [B, T, G, H, D], k [B, T, G, D].

  exact: float32 operands at HIGHEST precision (the oracle); else the input dtype with float32
  accumulation (what the kernels compute, and fast on tensor cores)."""
  if exact:
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
  precision = lax.Precision.HIGHEST if exact else None
  logits = jnp.einsum("btghd,bugd->bghtu", q, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, logits, -jnp.inf)


def _gda_cudnn(q_signal, q_noise, k_signal, k_noise, value, segment_ids, causal, scale):
  """Four cuDNN attention calls (value halves as separate calls: cuDNN needs value dim == qk dim) plus
  an XLA pass over the scores for the lse and max-logit statistics (not differentiable here)."""
  batch, seq_len, groups, signal_heads, head_dim = q_signal.shape
  mask = None
  if segment_ids is not None:
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]
  attend = functools.partial(jax.nn.dot_product_attention, mask=mask, scale=scale,
                             is_causal=causal, implementation="cudnn")
  v1, v2 = value[..., :head_dim], value[..., head_dim:]
  q_flat = q_signal.reshape(batch, seq_len, groups * signal_heads, head_dim)
  signal = jnp.concatenate([attend(q_flat, k_signal, v1), attend(q_flat, k_signal, v2)], axis=-1)
  noise = jnp.concatenate([attend(q_noise, k_noise, v1), attend(q_noise, k_noise, v2)], axis=-1)

  ref_mask = _reference_mask(seq_len, segment_ids, causal)
  stats = []
  for q, k in ((q_signal, k_signal), (q_noise[:, :, :, None, :], k_noise)):
    logits = _reference_logits(lax.stop_gradient(q), lax.stop_gradient(k), ref_mask, scale,
                               exact=False)
    stats.append((jax.nn.logsumexp(logits, axis=-1), jnp.max(logits, axis=(0, 3, 4))))
  (lse_signal, max_signal), (lse_noise, max_noise) = stats
  return GdaOutput(signal.reshape(batch, seq_len, groups, signal_heads, 2 * head_dim), noise,
                   lse_signal, lse_noise[:, :, 0], jnp.concatenate([max_signal, max_noise], axis=1))


# ----------------------------------------------------------------------------------------------------
# One softmax map as a custom_vjp over the backend kernels.
CHECKPOINT_NAME = "gda_attention"  # the name of the forward's residuals (see _flash_map_fwd)


@dataclasses.dataclass(frozen=True)
class _MapConfig:
  """Static settings of one map's kernels. `kv_len` is the unpadded length: keys at or after it are
  padding (masked unless causal already hides them from every real query)."""

  impl: str
  causal: bool
  scale: float
  kv_len: int
  block_q: int
  block_k: int
  block_q_dq: int
  block_k_dq: int
  block_q_dkv: int
  block_k_dkv: int
  num_warps: tuple  # (forward, dq, dk/dv); None entries use the heuristic
  num_stages: int
  interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_map(cfg, q, k, v, segment_ids):
  """One grouped softmax map. GPU layout: q [B, T, G, H, D], k [B, T, G, D], v [B, T, G, E] ->
  out [B, T, G, H, E]; TPU layout: q [B, G, H, T, D], k [B, G, T, D], v [B, G, T, E] ->
  out [B, G, H, T, E]. Both also return lse and row max, float32 [B, G, H, T], natural log units."""
  return _flash_map_fwd(cfg, q, k, v, segment_ids)[0]


def _flash_map_fwd(cfg, q, k, v, segment_ids):
  forward = _tpu_forward if cfg.impl == "pallas_tpu" else _gpu_forward
  out, lse, row_max = forward(cfg, q, k, v, segment_ids)
  # Named, so that a remat policy saving CHECKPOINT_NAME keeps the kernel out of the recomputation.
  q, k, v, out, lse = (checkpoint_name(x, CHECKPOINT_NAME) for x in (q, k, v, out, lse))
  return (out, lse, row_max), (q, k, v, segment_ids, out, lse)


def _flash_map_bwd(cfg, residuals, cotangents):
  q, k, v, segment_ids, out, lse = residuals
  d_out, d_lse, _ = cotangents  # the row max is a statistic: its cotangent is dropped
  # delta_i = sum_e out_ie * d_out_ie; a cotangent on lse_i adds d_lse_i * p_ij to ds_ij, which is the
  # same as subtracting it from delta_i.
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  if cfg.impl == "pallas_tpu":
    delta = delta - d_lse
    dq, dk, dv = _tpu_backward(cfg, q, k, v, segment_ids, d_out, lse, delta)
  else:
    delta = jnp.transpose(delta, (0, 2, 3, 1)) - d_lse  # [B, T, G, H] -> [B, G, H, T]
    dq, dk, dv = _gpu_backward(cfg, q, k, v, segment_ids, d_out, lse, delta)
  return dq, dk, dv, None


_flash_map.defvjp(_flash_map_fwd, _flash_map_bwd)


# ----------------------------------------------------------------------------------------------------
# Shared kernel pieces.


def _dot(a, b, contract_a=1, contract_b=0):
  """2-D matmul with float32 accumulation; float32 operands use full precision (no TF32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _attend_mask(q_pos, k_pos, q_seg, k_seg, *, causal, kv_len):
  """True where the query at q_pos may attend the key at k_pos; None if nothing is masked.

  q_pos, k_pos: int32 position tiles of the logit tile's shape. q_seg, k_seg: segment ids that
  broadcast to it, or None. kv_len: keys at or past it are padding (None: no padding to mask)."""
  mask = None
  for term in (k_pos <= q_pos if causal else None,
               k_pos < kv_len if kv_len is not None else None,
               q_seg == k_seg if q_seg is not None else None):
    if term is not None:
      mask = term if mask is None else jnp.logical_and(mask, term)
  return mask


def _apply_mask(s, mask):
  return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _padding_kv_len(cfg, padded_len):
  """kv_len to mask, or None when no real query can see a padded key (none, or causal)."""
  return None if cfg.causal or cfg.kv_len == padded_len else cfg.kv_len


def _default_blocks(on_tpu, itemsize, signal_heads, block_q, block_k):
  """Tiles (and on GPU, Triton settings) for the arguments left None. On TPU the backward tiles
  follow the forward ones."""
  if on_tpu:
    block_q, block_k = block_q or 128, block_k or 128
    return dict(block_q=block_q, block_k=block_k, block_q_dq=block_q, block_k_dq=block_k,
                block_q_dkv=block_q, block_k_dkv=block_k)
  if itemsize <= 2 and signal_heads == 1:  # both maps one head per group (2.6B); H200 sweep
    return dict(block_q=128, block_k=64, block_q_dq=64, block_k_dq=64, block_q_dkv=64,
                block_k_dkv=64, num_warps_dq=4, num_warps_dkv=8, num_stages=3)
  if itemsize <= 2:  # tuned on an H200 (bench/kernels_gda.py --sweep)
    return dict(block_q=128, block_k=128, block_q_dq=64, block_k_dq=32, block_q_dkv=64,
                block_k_dkv=32)
  return dict(block_q=64, block_k=32, block_q_dq=32, block_k_dq=32, block_q_dkv=32,
              block_k_dkv=32)


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


# ----------------------------------------------------------------------------------------------------
# Pallas GPU (Triton) kernels, layout [B, T, G, H, D].
#
# Grids: forward and dq run one program per (query block, batch, group * head), the heaviest causal
# query blocks first; dk/dv runs one program per (key block, batch, group) and loops over the group's
# H query heads and the query blocks at or below the diagonal. Key loops split into blocks wholly below
# the diagonal (no causal mask) and blocks crossing it.


def _gpu_forward_kernel(q_ref, k_ref, v_ref, *refs, cfg, kv_len):
  """q_ref [bq, D]; k_ref [T, D]; v_ref [T, E]; optional seg_ref [T]; outputs o_ref [bq, E],
  lse_ref and max_ref [bq] (natural log units)."""
  seg_ref, (o_ref, lse_ref, max_ref) = _split_segment_ref(refs, 3)
  block_q, block_k = cfg.block_q, cfg.block_k
  num_q_blocks = pl.num_programs(0)
  q_block = num_q_blocks - 1 - pl.program_id(0)
  q_start = q_block * block_q
  q = q_ref[...]
  q_seg = None if seg_ref is None else seg_ref[pl.ds(q_start, block_q)][:, None]
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  logit_scale = cfg.scale * LOG2E  # exp2 instead of exp

  def step(j, carry, on_diagonal):
    acc, m, l = carry
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    s = _dot(q, k, 1, 1) * logit_scale
    k_seg = None if seg_ref is None else seg_ref[pl.ds(k_start, block_k)][None, :]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    s = _apply_mask(s, _attend_mask(q_pos, k_pos, q_seg, k_seg,
                                    causal=cfg.causal and on_diagonal, kv_len=kv_len))
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])
    v = v_ref[pl.ds(k_start, block_k), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_next, l * alpha + jnp.sum(p, axis=1)

  num_k_blocks = k_ref.shape[0] // block_k
  if cfg.causal:
    full_blocks = lax.div(q_start, block_k)
    end_block = lax.div(q_start + block_q + block_k - 1, block_k)
  else:
    full_blocks = end_block = num_k_blocks
  carry = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  carry = lax.fori_loop(0, full_blocks, functools.partial(step, on_diagonal=False), carry)
  acc, m, l = lax.fori_loop(full_blocks, end_block, functools.partial(step, on_diagonal=True), carry)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = (m + jnp.log2(l)) * LN2
  max_ref[...] = m * LN2


def _gpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg, kv_len):
  """q_ref [bq, D]; k_ref [T, D]; v_ref [T, E]; do_ref [bq, E]; lse_ref, delta_ref [bq]; optional
  seg_ref [T]; output dq_ref [bq, D]."""
  seg_ref, (dq_ref,) = _split_segment_ref(refs, 1)
  block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
  q_block = pl.num_programs(0) - 1 - pl.program_id(0)
  q_start = q_block * block_q
  q, d_out = q_ref[...], do_ref[...]
  lse2 = lse_ref[...][:, None] * LOG2E
  delta = delta_ref[...][:, None]
  q_seg = None if seg_ref is None else seg_ref[pl.ds(q_start, block_q)][:, None]
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  logit_scale = cfg.scale * LOG2E

  def step(j, dq, on_diagonal):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = _dot(q, k, 1, 1) * logit_scale
    k_seg = None if seg_ref is None else seg_ref[pl.ds(k_start, block_k)][None, :]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    s = _apply_mask(s, _attend_mask(q_pos, k_pos, q_seg, k_seg,
                                    causal=cfg.causal and on_diagonal, kv_len=kv_len))
    p = jnp.exp2(s - lse2)
    ds = p * (_dot(d_out, v, 1, 1) - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  num_k_blocks = k_ref.shape[0] // block_k
  if cfg.causal:
    full_blocks = lax.div(q_start, block_k)
    end_block = lax.div(q_start + block_q + block_k - 1, block_k)
  else:
    full_blocks = end_block = num_k_blocks
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = lax.fori_loop(0, full_blocks, functools.partial(step, on_diagonal=False), dq)
  dq = lax.fori_loop(full_blocks, end_block, functools.partial(step, on_diagonal=True), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _gpu_dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg, kv_len):
  """q_ref [T, H, D]; k_ref [bk, D]; v_ref [bk, E]; do_ref [T, H, E]; lse_ref, delta_ref [H, T];
  optional seg_ref [T]; outputs dk_ref [bk, D], dv_ref [bk, E], summed over the H heads."""
  seg_ref, (dk_ref, dv_ref) = _split_segment_ref(refs, 2)
  block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
  k_start = pl.program_id(0) * block_k
  k, v = k_ref[...], v_ref[...]
  k_seg = None if seg_ref is None else seg_ref[pl.ds(k_start, block_k)][:, None]
  # Tiles are transposed here: rows are keys, columns queries.
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
  logit_scale = cfg.scale * LOG2E
  num_heads = q_ref.shape[1]
  num_q_blocks = q_ref.shape[0] // block_q

  def step(i, carry, head, on_diagonal):
    dk, dv = carry
    q_start = i * block_q
    q = q_ref[pl.ds(q_start, block_q), head, :]
    d_out = do_ref[pl.ds(q_start, block_q), head, :]
    lse2 = lse_ref[head, pl.ds(q_start, block_q)][None, :] * LOG2E
    delta = delta_ref[head, pl.ds(q_start, block_q)][None, :]
    s_t = _dot(k, q, 1, 1) * logit_scale
    q_seg = None if seg_ref is None else seg_ref[pl.ds(q_start, block_q)][None, :]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 1)
    s_t = _apply_mask(s_t, _attend_mask(q_pos, k_pos, q_seg, k_seg,
                                        causal=cfg.causal and on_diagonal, kv_len=kv_len))
    p_t = jnp.exp2(s_t - lse2)
    dv = dv + _dot(p_t.astype(d_out.dtype), d_out)
    ds_t = p_t * (_dot(v, d_out, 1, 1) - delta)
    return dk + _dot(ds_t.astype(q.dtype), q), dv

  if cfg.causal:  # query blocks before first_block see none of these keys; from full_blocks on, all
    first_block = lax.div(k_start, block_q)
    full_blocks = lax.div(k_start + block_k + block_q - 1, block_q)
  else:
    first_block, full_blocks = 0, 0

  def head_step(head, carry):
    carry = lax.fori_loop(first_block, full_blocks,
                          functools.partial(step, head=head, on_diagonal=True), carry)
    return lax.fori_loop(full_blocks, num_q_blocks,
                         functools.partial(step, head=head, on_diagonal=False), carry)

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, num_heads, head_step, carry)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _split_segment_ref(refs, num_outputs):
  """Kernel refs after the fixed inputs: (optional segment-id ref, outputs)."""
  if len(refs) == num_outputs:
    return None, refs
  return refs[0], refs[1:]


def _gpu_params(cfg, kernel, accumulator_elements):
  """Triton launch settings of kernel 0 (forward), 1 (dq) or 2 (dk/dv)."""
  num_warps = cfg.num_warps[kernel] or (8 if accumulator_elements >= 128 * 128 else 4)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def _query_block_index_maps(num_q_blocks, heads):
  """Index maps over the grid (query block i, batch b, group * heads + head gh) for query-row
  blocks [B, T, G, H, D], whole keys/values [B, T, G, D] and row statistics [B, G, H, T]. Query
  blocks run last first: under the causal mask the last rows see the most keys."""

  def q_index(i, b, gh):
    return b, num_q_blocks - 1 - i, gh // heads, gh % heads, 0

  def kv_index(i, b, gh):
    return b, 0, gh // heads, 0

  def stat_index(i, b, gh):
    return b, gh // heads, gh % heads, num_q_blocks - 1 - i

  return q_index, kv_index, stat_index


def _gpu_forward(cfg, q, k, v, segment_ids):
  batch, seq_len, groups, heads, head_dim = q.shape
  width = v.shape[-1]
  block_q = cfg.block_q
  num_q_blocks = seq_len // block_q
  q_index, kv_index, stat_index = _query_block_index_maps(num_q_blocks, heads)

  in_specs = [pl.BlockSpec((None, block_q, None, None, head_dim), q_index),
              pl.BlockSpec((None, seq_len, None, head_dim), kv_index),
              pl.BlockSpec((None, seq_len, None, width), kv_index)]
  args = [q, k, v]
  if segment_ids is not None:
    in_specs.append(pl.BlockSpec((None, seq_len), lambda i, b, gh: (b, 0)))
    args.append(segment_ids)
  stat_shape = jax.ShapeDtypeStruct((batch, groups, heads, seq_len), jnp.float32)
  stat_spec = pl.BlockSpec((None, None, None, block_q), stat_index)
  kernel = functools.partial(_gpu_forward_kernel, cfg=cfg,
                             kv_len=_padding_kv_len(cfg, seq_len))
  return pl.pallas_call(
      kernel, grid=(num_q_blocks, batch, groups * heads), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, block_q, None, None, width), q_index), stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape[:-1] + (width,), q.dtype), stat_shape, stat_shape],
      compiler_params=_gpu_params(cfg, 0, block_q * width), interpret=cfg.interpret,
      name="gda_forward",
  )(*args)


def _gpu_backward(cfg, q, k, v, segment_ids, d_out, lse, delta):
  batch, seq_len, groups, heads, head_dim = q.shape
  width = v.shape[-1]
  block_q, block_k = cfg.block_q_dq, cfg.block_k_dkv  # the rows each program owns
  num_q_blocks = seq_len // block_q
  kv_len = _padding_kv_len(cfg, seq_len)
  seg_args = [] if segment_ids is None else [segment_ids]
  q_index, kv_index, stat_index = _query_block_index_maps(num_q_blocks, heads)

  dq_specs = [pl.BlockSpec((None, block_q, None, None, head_dim), q_index),
              pl.BlockSpec((None, seq_len, None, head_dim), kv_index),
              pl.BlockSpec((None, seq_len, None, width), kv_index),
              pl.BlockSpec((None, block_q, None, None, width), q_index),
              pl.BlockSpec((None, None, None, block_q), stat_index),
              pl.BlockSpec((None, None, None, block_q), stat_index)]
  dq_specs += [pl.BlockSpec((None, seq_len), lambda i, b, gh: (b, 0))] * len(seg_args)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, cfg=cfg, kv_len=kv_len),
      grid=(num_q_blocks, batch, groups * heads), in_specs=dq_specs,
      out_specs=pl.BlockSpec((None, block_q, None, None, head_dim), q_index),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_params(cfg, 1, block_q * head_dim), interpret=cfg.interpret,
      name="gda_backward_dq",
  )(q, k, v, d_out, lse, delta, *seg_args)

  def whole_q(j, b, g):
    return b, 0, g, 0, 0

  def key_block(j, b, g):
    return b, j, g, 0

  def stats(j, b, g):
    return b, g, 0, 0

  dkdv_specs = [pl.BlockSpec((None, seq_len, None, heads, head_dim), whole_q),
                pl.BlockSpec((None, block_k, None, head_dim), key_block),
                pl.BlockSpec((None, block_k, None, width), key_block),
                pl.BlockSpec((None, seq_len, None, heads, width), whole_q),
                pl.BlockSpec((None, None, heads, seq_len), stats),
                pl.BlockSpec((None, None, heads, seq_len), stats)]
  dkdv_specs += [pl.BlockSpec((None, seq_len), lambda j, b, g: (b, 0))] * len(seg_args)
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkdv_kernel, cfg=cfg, kv_len=kv_len),
      grid=(seq_len // block_k, batch, groups), in_specs=dkdv_specs,
      out_specs=[pl.BlockSpec((None, block_k, None, head_dim), key_block),
                 pl.BlockSpec((None, block_k, None, width), key_block)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_gpu_params(cfg, 2, block_k * (head_dim + width)),
      interpret=cfg.interpret, name="gda_backward_dkdv",
  )(q, k, v, d_out, lse, delta, *seg_args)
  return dq, dk, dv


def _check_gpu_sizes(head_dim, width, *blocks):
  for name, size in [("head_dim", head_dim), ("value width", width)] + [("block", b) for b in blocks]:
    if size < 16 or size & (size - 1):
      raise ValueError(f"impl='pallas_gpu' needs powers of two >= 16 for head dims and blocks "
                       f"(Triton tiles); got {name}={size}. Use impl='reference' or 'cudnn' instead.")


# ----------------------------------------------------------------------------------------------------
# Pallas TPU (Mosaic) kernels, layout [B, G, H, T, D].
#
# Grids follow the usual TPU flash pattern: the last grid axis is the reduction (key blocks for the
# forward and dq, (head, query block) for dk/dv), accumulated in VMEM scratch and written at its last
# step. Tiles above the causal diagonal are skipped with `pl.when`, and their index maps repeat the
# previous block so that no DMA is issued for them.


def _tpu_forward_kernel(q_ref, k_ref, v_ref, *refs, cfg, kv_len):
  """q_ref [bq, D]; k_ref [bk, D]; v_ref [bk, E]; optional q_seg_ref [bq, 1], k_seg_ref [1, bk];
  outputs o_ref [bq, E], lse_ref, max_ref [bq, 1]; scratch m, l [bq, 1], acc [bq, E]."""
  q_seg_ref, k_seg_ref, (o_ref, lse_ref, max_ref, m_ref, l_ref, acc_ref) = _split_tpu_refs(refs, 6)
  block_q, block_k = cfg.block_q, cfg.block_k
  q_block, k_block = pl.program_id(3), pl.program_id(4)

  @pl.when(k_block == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(_tpu_tile_visible(cfg, q_block, block_q, k_block, block_k))
  def _step():
    s = _dot(q_ref[...], k_ref[...], 1, 1) * cfg.scale
    s = _apply_mask(s, _tpu_mask(cfg, kv_len, q_block, k_block, s.shape, q_seg_ref, k_seg_ref))
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
    m_ref[...] = m_next

  @pl.when(k_block == pl.num_programs(4) - 1)
  def _finish():
    o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])
    max_ref[...] = m_ref[...]


def _tpu_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg, kv_len):
  """q_ref [bq, D]; k_ref [bk, D]; v_ref [bk, E]; do_ref [bq, E]; lse_ref, delta_ref [bq, 1]; optional
  segment refs; output dq_ref [bq, D]; scratch dq_acc [bq, D]."""
  q_seg_ref, k_seg_ref, (dq_ref, dq_acc) = _split_tpu_refs(refs, 2)
  block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
  q_block, k_block = pl.program_id(3), pl.program_id(4)

  @pl.when(k_block == 0)
  def _init():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(_tpu_tile_visible(cfg, q_block, block_q, k_block, block_k))
  def _step():
    k = k_ref[...]
    s = _dot(q_ref[...], k, 1, 1) * cfg.scale
    s = _apply_mask(s, _tpu_mask(cfg, kv_len, q_block, k_block, s.shape, q_seg_ref, k_seg_ref))
    p = jnp.exp(s - lse_ref[...])
    ds = p * (_dot(do_ref[...], v_ref[...], 1, 1) - delta_ref[...])
    dq_acc[...] += _dot(ds.astype(k.dtype), k)

  @pl.when(k_block == pl.num_programs(4) - 1)
  def _finish():
    dq_ref[...] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)


def _tpu_dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg, kv_len):
  """Grid (B, G, key block, head, query block). q_ref [bq, D]; k_ref [bk, D]; v_ref [bk, E];
  do_ref [bq, E]; lse_ref, delta_ref [bq, 1]; optional segment refs; outputs dk_ref [bk, D],
  dv_ref [bk, E], summed over heads and query blocks in scratch dk_acc, dv_acc."""
  q_seg_ref, k_seg_ref, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_tpu_refs(refs, 4)
  block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
  k_block, head, q_block = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((head == 0) & (q_block == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(_tpu_tile_visible(cfg, q_block, block_q, k_block, block_k))
  def _step():
    q, d_out = q_ref[...], do_ref[...]
    s = _dot(q, k_ref[...], 1, 1) * cfg.scale  # [bq, bk]
    s = _apply_mask(s, _tpu_mask(cfg, kv_len, q_block, k_block, s.shape, q_seg_ref, k_seg_ref))
    p = jnp.exp(s - lse_ref[...])
    dv_acc[...] += _dot(p.astype(d_out.dtype), d_out, 0, 0)
    ds = p * (_dot(d_out, v_ref[...], 1, 1) - delta_ref[...])
    dk_acc[...] += _dot(ds.astype(q.dtype), q, 0, 0)

  @pl.when((head == pl.num_programs(3) - 1) & (q_block == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _tpu_tile_visible(cfg, q_block, block_q, k_block, block_k):
  """Whether any query of the tile may see any key of it (False above the causal diagonal)."""
  if not cfg.causal:
    return True
  return k_block * block_k <= q_block * block_q + block_q - 1


def _tpu_mask(cfg, kv_len, q_block, k_block, shape, q_seg_ref, k_seg_ref):
  """Mask of the [bq, bk] logit tile (q_block, k_block), or None."""
  q_pos = q_block * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = k_block * shape[1] + lax.broadcasted_iota(jnp.int32, shape, 1)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  k_seg = None if k_seg_ref is None else k_seg_ref[...]
  return _attend_mask(q_pos, k_pos, q_seg, k_seg, causal=cfg.causal, kv_len=kv_len)


def _split_tpu_refs(refs, num_rest):
  """Kernel refs after the fixed inputs: (q_seg_ref, k_seg_ref or Nones, the rest)."""
  if len(refs) == num_rest:
    return None, None, refs
  return refs[0], refs[1], refs[2:]


def _tpu_segment_args(segment_ids, block_q, block_k, q_axis, k_axis):
  """Segment ids as [B, T, 1] (query tiles) and [B, 1, T] (key tiles), with their BlockSpecs."""
  if segment_ids is None:
    return [], []
  specs = [pl.BlockSpec((None, block_q, 1), lambda *ids: (ids[0], q_axis(*ids), 0)),
           pl.BlockSpec((None, 1, block_k), lambda *ids: (ids[0], 0, k_axis(*ids)))]
  return [segment_ids[:, :, None], segment_ids[:, None, :]], specs


def _tpu_last_visible_k(cfg, q_block, block_q, k_block, block_k):
  """Key block to fetch at grid step k_block: past the diagonal, repeat the last visible one."""
  if not cfg.causal:
    return k_block
  return jnp.minimum(k_block, lax.div(q_block * block_q + block_q - 1, block_k))


def _tpu_first_visible_q(cfg, q_block, block_q, k_block, block_k):
  """Query block to fetch at grid step q_block: before the diagonal, the first visible one."""
  if not cfg.causal:
    return q_block
  return jnp.maximum(q_block, lax.div(k_block * block_k, block_q))


def _tpu_forward(cfg, q, k, v, segment_ids):
  batch, groups, heads, seq_len, head_dim = q.shape
  width = v.shape[-1]
  block_q, block_k = cfg.block_q, cfg.block_k

  def kv_block(b, g, h, i, j):
    return _tpu_last_visible_k(cfg, i, block_q, j, block_k)

  seg_args, seg_specs = _tpu_segment_args(segment_ids, block_q, block_k,
                                          lambda b, g, h, i, j: i, kv_block)
  q_spec = pl.BlockSpec((None, None, None, block_q, head_dim), lambda b, g, h, i, j: (b, g, h, i, 0))
  stat_spec = pl.BlockSpec((None, None, None, block_q, 1), lambda b, g, h, i, j: (b, g, h, i, 0))
  stat_shape = jax.ShapeDtypeStruct((batch, groups, heads, seq_len, 1), jnp.float32)
  out, lse, row_max = pl.pallas_call(
      functools.partial(_tpu_forward_kernel, cfg=cfg, kv_len=_padding_kv_len(cfg, seq_len)),
      grid=(batch, groups, heads, seq_len // block_q, seq_len // block_k),
      in_specs=[q_spec,
                pl.BlockSpec((None, None, block_k, head_dim),
                             lambda b, g, h, i, j: (b, g, kv_block(b, g, h, i, j), 0)),
                pl.BlockSpec((None, None, block_k, width),
                             lambda b, g, h, i, j: (b, g, kv_block(b, g, h, i, j), 0))] + seg_specs,
      out_specs=[pl.BlockSpec((None, None, None, block_q, width),
                              lambda b, g, h, i, j: (b, g, h, i, 0)), stat_spec, stat_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape[:-1] + (width,), q.dtype), stat_shape, stat_shape],
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, width), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret, name="gda_forward",
  )(q, k, v, *seg_args)
  return out, lse[..., 0], row_max[..., 0]


def _tpu_backward(cfg, q, k, v, segment_ids, d_out, lse, delta):
  args = (q, k, v, d_out, lse[..., None], delta[..., None])
  return (_tpu_dq(cfg, segment_ids, *args),) + _tpu_dkdv(cfg, segment_ids, *args)


def _tpu_dq(cfg, segment_ids, q, k, v, d_out, lse, delta):
  """dq with grid (B, G, H, query block, key block)."""
  batch, groups, heads, seq_len, head_dim = q.shape
  width = v.shape[-1]
  block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
  kv_len = _padding_kv_len(cfg, seq_len)

  def dq_k(b, g, h, i, j):
    return _tpu_last_visible_k(cfg, i, block_q, j, block_k)

  def q_tile(last):
    return pl.BlockSpec((None, None, None, block_q, last), lambda b, g, h, i, j: (b, g, h, i, 0))

  def k_tile(last):
    return pl.BlockSpec((None, None, block_k, last), lambda b, g, h, i, j: (b, g, dq_k(b, g, h, i, j), 0))

  seg_args, seg_specs = _tpu_segment_args(segment_ids, block_q, block_k,
                                          lambda b, g, h, i, j: i, dq_k)
  return pl.pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg, kv_len=kv_len),
      grid=(batch, groups, heads, seq_len // block_q, seq_len // block_k),
      in_specs=[q_tile(head_dim), k_tile(head_dim), k_tile(width), q_tile(width), q_tile(1),
                q_tile(1)] + seg_specs,
      out_specs=q_tile(head_dim),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret, name="gda_backward_dq",
  )(q, k, v, d_out, lse, delta, *seg_args)


def _tpu_dkdv(cfg, segment_ids, q, k, v, d_out, lse, delta):
  """(dk, dv) with grid (B, G, key block, head, query block): heads and query blocks reduced."""
  batch, groups, heads, seq_len, head_dim = q.shape
  width = v.shape[-1]
  block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
  kv_len = _padding_kv_len(cfg, seq_len)

  def dkdv_q(b, g, j, h, i):
    return _tpu_first_visible_q(cfg, i, block_q, j, block_k)

  def q_tile_t(last):
    return pl.BlockSpec((None, None, None, block_q, last),
                        lambda b, g, j, h, i: (b, g, h, dkdv_q(b, g, j, h, i), 0))

  def k_tile_t(last):
    return pl.BlockSpec((None, None, block_k, last), lambda b, g, j, h, i: (b, g, j, 0))

  seg_args, seg_specs = _tpu_segment_args(segment_ids, block_q, block_k, dkdv_q,
                                          lambda b, g, j, h, i: j)
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkdv_kernel, cfg=cfg, kv_len=kv_len),
      grid=(batch, groups, seq_len // block_k, heads, seq_len // block_q),
      in_specs=[q_tile_t(head_dim), k_tile_t(head_dim), k_tile_t(width), q_tile_t(width),
                q_tile_t(1), q_tile_t(1)] + seg_specs,
      out_specs=[k_tile_t(head_dim), k_tile_t(width)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32),
                      pltpu.VMEM((block_k, width), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=cfg.interpret, name="gda_backward_dkdv",
  )(q, k, v, d_out, lse, delta, *seg_args)
  return dk, dv


# ----------------------------------------------------------------------------------------------------
# Argument checks.


def _resolve_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: expected one of {IMPLS}.")
  if impl != "auto":
    return impl
  return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "reference")


def _check_shapes(q_signal, q_noise, k_signal, k_noise, value, segment_ids):
  if q_signal.ndim != 5:
    raise ValueError(f"q_signal must be [B, T, G, S, D]; got shape {q_signal.shape}.")
  batch, seq_len, groups, _, head_dim = q_signal.shape
  expected = {"q_noise": (batch, seq_len, groups, head_dim),
              "k_signal": (batch, seq_len, groups, head_dim),
              "k_noise": (batch, seq_len, groups, head_dim)}
  for name, x in (("q_noise", q_noise), ("k_signal", k_signal), ("k_noise", k_noise)):
    if x.shape != expected[name]:
      raise ValueError(f"{name} must be [B, T, G, D] = {expected[name]}; got {x.shape}.")
  if value.shape[:3] != (batch, seq_len, groups) or value.ndim != 4:
    raise ValueError(f"value must be [B, T, G, 2D] with B, T, G = {(batch, seq_len, groups)}; "
                     f"got {value.shape}.")
  if segment_ids is not None and segment_ids.shape != (batch, seq_len):
    raise ValueError(f"segment_ids must be [B, T] = {(batch, seq_len)}; got {segment_ids.shape}.")
