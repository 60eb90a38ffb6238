"""Fused `PolyNorm(gate) * up` for the Motif-2 MLP: reference, Pallas TPU and GPU kernels, custom VJP, sharding.

    PolyNorm(z) = w0 * N(z^3) + w1 * N(z^2) + w2 * N(z) + b,    N(u) = u / sqrt(mean(u^2, last axis) + eps)

computed in float32 (the `* up` product too) and cast to the input dtype once (docs/model.md; the kernels:
docs/kernels.md).

Inside the kernels the polynomial is indexed by power k = 0..3 of z:
  * coef [4] = (b, w2, w1, w0), the coefficient of z^k;
  * row statistics are [rows, 4] float32, column k for power k:
      power sums  s_k = sum_f (z^k)^2              (column 0 unused, 0)
      inv_rms     r_k = 1 / sqrt(s_k / F + eps)    (r_0 = 1: the bias is not normalised)
      grad sums   c_k = sum_f dp * z^k             with dp = dout * up
so that, per row, with a_k = coef_k * r_k:

    out   = up * sum_k a_k z^k
    d up  = dout * sum_k a_k z^k
    d z   = sum_{k>=1} k a_k z^(k-1) (dp - (r_k^2 c_k / F) z^k)      (chain rule through N, then z -> z^k)
    d coef_k = sum over rows of r_k c_k

Both passes need a full-row reduction (s or c) before the elementwise part, so each is split into a statistics
kernel and an apply kernel that takes the statistics as input; the unsharded path runs a fused kernel doing both
per row block. When the feature axis is split over devices (`mul_polynorm_sharded` with more than one device on
its axis), the partial sums are `psum`med over that axis between the two kernels. The backward recomputes the
powers of z; its residuals are gate, up, coef and inv_rms [rows, 4] (the three inverse RMS values per row, plus
the constant r_0 = 1).

TPU (Mosaic): a program takes a [block_rows, F] block into VMEM and does both passes on it.

GPU, two kernel families:
  * Mosaic GPU (Hopper and newer; rows of a multiple of 256 features, three rows of inputs within 200 KiB):
    a CUDA block (one warpgroup) per row. TMA copies the row's inputs into shared memory in parts, one
    barrier each, so the first pass starts on the first part while the rest arrives; the first pass reads
    shared memory for the row sums, the second reads it again and writes the outputs in place over the
    inputs, and TMA sends each part back as soon as it is written. Each input crosses HBM once, each output
    once: on an H200, [8192, 16384] bfloat16 forward 0.197 ms, forward+backward 0.529 ms, 4.1 TB/s
    (bench/kernels_polynorm.py; the Triton kernels take 0.210 and 0.604 ms).
  * Triton: a program takes one row and walks it twice in chunks of block_cols; the second walk re-reads the
    row from L2 (with a single chunk, each input is read once). The first walk's loads ask L2 to keep their
    lines (evict_last), the second walk's loads and every store ask it to drop theirs first (evict_first).
    It takes any width, and runs the sharded path's statistics and apply kernels; on an H200 its backward
    reaches 87-91% of a Pallas copy (0.38-0.40 ms at [8192, 16384]).
"pallas_gpu" runs Mosaic GPU where it fits and Triton elsewhere (and in interpret mode); "pallas_mosaic_gpu" and
"pallas_triton" pick one.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "pallas_mosaic_gpu", "pallas_triton")
NUM_POWERS = 4  # z^0 (bias) .. z^3


# ----------------------------------------------------------------------------------------------- reference


def mul_polynorm_reference(gate, up, weight, bias, *, eps: float = 1e-6):
  """PolyNorm(gate) * up in plain jnp; the test oracle.

  Args:
    gate, up: [..., features], same dtype.
    weight: [3] = (w0, w1, w2), the weights of N(z^3), N(z^2), N(z).
    bias: [1].
  Returns:
    [..., features] in gate's dtype.
  """
  z = gate.astype(jnp.float32)

  def normalise(u):
    return u * lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + eps)

  poly = (weight[0] * normalise(z * z * z) + weight[1] * normalise(z * z) + weight[2] * normalise(z)
          + bias[0])
  return (poly * up.astype(jnp.float32)).astype(gate.dtype)


# --------------------------------------------------- row math, shared by all kernels (all float32)
# z, dp: a block of rows of the features, or a chunk of them: [n, f] on TPU, [f] (one row) on GPU. A row
# statistic is a tuple of four per-row columns, k = 0..3: [n, 1] arrays on TPU, scalars on GPU.


def _row_sum(x):
  """Sum over the features: [n, f] -> [n, 1]; [f] -> scalar."""
  return jnp.sum(x, axis=-1, keepdims=x.ndim == 2)


def _power_terms(z):
  """(z^k)^2 for k = 1..3; their row sums are the power sums s_1..s_3."""
  z2 = z * z
  z4 = z2 * z2
  return z2, z4, z4 * z2


def _power_sums(s1, s2, s3):
  """The four power-sum columns; column 0 is 0."""
  return jnp.zeros_like(s1), s1, s2, s3


def _inv_rms(s1, s2, s3, features: int, eps: float):
  """Full-row power sums -> inverse RMS of z^k over `features`; column 0 is 1 (the bias is not normalised)."""
  return (jnp.ones_like(s1), *(lax.rsqrt(s * (1.0 / features) + eps) for s in (s1, s2, s3)))


def _grad_terms(z, dp):
  """dp * z^k for k = 0..3; their row sums are the grad sums c_0..c_3."""
  dpz = dp * z
  dpz2 = dpz * z
  return dp, dpz, dpz2, dpz2 * z


def _polynomial(z, scale):
  """sum_k scale_k z^k (Horner), scale_k = coef_k r_k."""
  s0, s1, s2, s3 = scale
  return s0 + z * (s1 + z * (s2 + z * s3))


def _grad_coefficients(coef, inv_rms, grad_sums, features: int):
  """-> columns a_k = coef_k r_k and a_k e_k with e_k = r_k^2 c_k / F (c: full-row grad sums)."""
  scale = tuple(c * r for c, r in zip(coef, inv_rms))
  scale_e = tuple(a * r * r * c * (1.0 / features) for a, r, c in zip(scale, inv_rms, grad_sums))
  return scale, scale_e


def _polynomial_grad(z, dp, scale, scale_e):
  """d loss / d z for out = up * PolyNorm(z), given dp = dout * up and the `_grad_coefficients` columns.

  dz = sum_k k a_k z^(k-1) (dp - e_k z^k), expanded in z:
  dz = dp (a1 + 2 a2 z + 3 a3 z^2) - z (a1 e1 + 2 a2 e2 z^2 + 3 a3 e3 z^4).
  """
  _, a1, a2, a3 = scale
  _, ae1, ae2, ae3 = scale_e
  z2 = z * z
  return dp * (a1 + z * (2.0 * a2 + 3.0 * a3 * z)) - z * (ae1 + z2 * (2.0 * ae2 + 3.0 * ae3 * z2))


# ---------------------------------------------------------------------------- how a kernel sees its rows
# A kernel handles its rows in `num_chunks` chunks of features. Arrays are [rows, features] (gate, up, dout,
# out, dgate, dup), row statistics [rows, 4] (read and written as four columns), or coef [4]. `_call` gives
# each kernel trace a fresh view; with a single chunk the view reads each input once for both passes.


class _View:
  """What the kernels need from a backend: chunked float32 loads and stores, and row-statistics I/O."""

  num_chunks = 1

  def __init__(self):
    self._loaded = {}

  def load(self, ref, chunk, read_again: bool = False):
    """ref's chunk `chunk` in float32; with one chunk, read once per kernel.

    read_again: this kernel reads the chunk again later (its second walk), so the GPU keeps it in L2.
    """
    if self.num_chunks > 1:
      return self._load(ref, chunk, read_again).astype(jnp.float32)
    if id(ref) not in self._loaded:
      self._loaded[id(ref)] = self._load(ref, 0, read_again).astype(jnp.float32)
    return self._loaded[id(ref)]


class _TpuBlock(_View):
  """Mosaic TPU: the BlockSpecs bring a [block_rows, features] block into VMEM; one chunk, the full row.
  Row statistics are [block_rows, 4] blocks, split into columns with a select and a lane sum."""

  @staticmethod
  def _power_ids():
    return lax.broadcasted_iota(jnp.int32, (1, NUM_POWERS), 1)

  def _load(self, ref, chunk, read_again):
    del chunk, read_again
    return ref[...]

  def store(self, ref, chunk, value):
    del chunk
    ref[...] = value.astype(ref.dtype)

  def load_stats(self, ref):
    stats, power_ids = ref[...], self._power_ids()
    return tuple(jnp.sum(jnp.where(power_ids == k, stats, 0.0), axis=1, keepdims=True) for k in range(NUM_POWERS))

  def store_stats(self, ref, columns):
    power_ids = self._power_ids()
    ref[...] = sum(jnp.where(power_ids == k, col, 0.0) for k, col in enumerate(columns))


def _load_row_stats(ref, row):
  """Row `row` of row statistics [rows, 4] (a GPU kernel's whole array) -> four scalars."""
  return tuple(ref[row, k] for k in range(NUM_POWERS))


def _store_row_stats(ref, row, columns):
  """Four scalars -> row `row` of row statistics [rows, 4]."""
  for k, col in enumerate(columns):
    ref[row, k] = col


class _GpuRow(_View):
  """Triton: refs are whole arrays; program i takes row i and walks its features in chunks of block_cols (a
  power of two), masking the ragged last chunk. Row statistics are scalars."""

  def __init__(self, features: int, block_cols: int, row=None):
    super().__init__()
    self.features, self.block_cols, self.row = features, block_cols, row
    self.num_chunks = pl.cdiv(features, block_cols)

  def for_program(self):
    """A copy for this program (program_id is read at the kernel's top level, outside any loop)."""
    return _GpuRow(self.features, self.block_cols, row=pl.program_id(0))

  def _columns(self, chunk):
    cols = chunk * self.block_cols + jnp.arange(self.block_cols)
    return cols, (cols < self.features if self.features % self.block_cols else None)

  def _load(self, ref, chunk, read_again):
    cols, mask = self._columns(chunk)
    policy = "evict_last" if read_again and self.num_chunks > 1 else "evict_first"
    if mask is None:
      return plgpu.load(ref.at[self.row, cols], eviction_policy=policy)
    return plgpu.load(ref.at[self.row, cols], mask=mask, other=0.0, eviction_policy=policy)

  def store(self, ref, chunk, value):
    cols, mask = self._columns(chunk)
    plgpu.store(ref.at[self.row, cols], value.astype(ref.dtype), mask=mask, eviction_policy="evict_first")

  def load_stats(self, ref):
    return _load_row_stats(ref, self.row)

  def store_stats(self, ref, columns):
    _store_row_stats(ref, self.row, columns)


def _row_sums(view, fn):
  """Row sums of the terms fn(j) over all chunks j (summed elementwise across chunks, reduced once)."""
  terms = fn(0)
  if view.num_chunks > 1:
    terms = lax.fori_loop(1, view.num_chunks, lambda j, acc: tuple(a + t for a, t in zip(acc, fn(j))), terms)
  return tuple(_row_sum(t) for t in terms)


def _for_chunks(view, fn):
  """fn(j) for every chunk j."""
  if view.num_chunks == 1:
    fn(0)
    return

  def body(j, carry):
    fn(j)
    return carry

  lax.fori_loop(0, view.num_chunks, body, 0)


# ---------------------------------------------------------------------------------------------- kernels


def _coef_columns(coef_ref):
  """coef [4] (SMEM on TPU) -> four scalars."""
  return tuple(coef_ref[k] for k in range(NUM_POWERS))


def _power_sums_kernel(gate_ref, sums_ref, *, view):
  """Partial (over this device's features) power sums of each row -> sums [rows, 4]."""
  view.store_stats(sums_ref, _power_sums(*_row_sums(view, lambda j: _power_terms(view.load(gate_ref, j)))))


def _forward_kernel(coef_ref, gate_ref, up_ref, *refs, view, features, eps, fused):
  """out = PolyNorm(gate) * up.

  fused: refs = (out, inv_rms); the row statistics are computed here (the row is complete) and stored.
  else:  refs = (inv_rms, out); inv_rms [rows, 4] is an input.
  """
  if fused:
    out_ref, inv_rms_ref = refs
    inv_rms = _inv_rms(*_row_sums(view, lambda j: _power_terms(view.load(gate_ref, j, read_again=True))),
                       features, eps)
    view.store_stats(inv_rms_ref, inv_rms)
  else:
    inv_rms_ref, out_ref = refs
    inv_rms = view.load_stats(inv_rms_ref)
  scale = tuple(c * r for c, r in zip(_coef_columns(coef_ref), inv_rms))

  def apply(j):
    view.store(out_ref, j, _polynomial(view.load(gate_ref, j), scale) * view.load(up_ref, j))

  _for_chunks(view, apply)


def _chunk_grad_terms(view, gate_ref, up_ref, dout_ref, j, read_again=False):
  load = functools.partial(view.load, chunk=j, read_again=read_again)
  return _grad_terms(load(gate_ref), load(dout_ref) * load(up_ref))


def _grad_sums_kernel(gate_ref, up_ref, dout_ref, grad_sums_ref, *, view):
  """Partial (over this device's features) sums c_k = sum dout * up * z^k of each row -> [rows, 4]."""
  grad_sums = _row_sums(view, functools.partial(_chunk_grad_terms, view, gate_ref, up_ref, dout_ref))
  view.store_stats(grad_sums_ref, grad_sums)


def _backward_kernel(coef_ref, gate_ref, up_ref, dout_ref, inv_rms_ref, *refs, view, features, fused):
  """dgate, dup from dout.

  fused: refs = (dgate, dup, grad_sums); the grad sums are computed here (the row is complete) and stored.
  else:  refs = (grad_sums, dgate, dup); grad_sums [rows, 4] (full-row, after the psum) is an input.
  """
  if fused:
    dgate_ref, dup_ref, grad_sums_ref = refs
    grad_sums = _row_sums(view, functools.partial(_chunk_grad_terms, view, gate_ref, up_ref, dout_ref,
                                                  read_again=True))
    view.store_stats(grad_sums_ref, grad_sums)
  else:
    grad_sums_ref, dgate_ref, dup_ref = refs
    grad_sums = view.load_stats(grad_sums_ref)
  scale, scale_e = _grad_coefficients(_coef_columns(coef_ref), view.load_stats(inv_rms_ref), grad_sums, features)

  def apply(j):
    z, up, dout = view.load(gate_ref, j), view.load(up_ref, j), view.load(dout_ref, j)
    view.store(dup_ref, j, dout * _polynomial(z, scale))
    view.store(dgate_ref, j, _polynomial_grad(z, dout * up, scale, scale_e))

  _for_chunks(view, apply)


# ------------------------------------------------------------------------------------------ pallas calls


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one kernel path. features: the FULL length of the normalised axis (all shards)."""

  impl: str  # "pallas_tpu" | "pallas_triton" | "pallas_mosaic_gpu"
  eps: float
  features: int
  interpret: bool = False
  block_rows: int | None = None
  block_cols: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None


def _tpu_block_rows(cfg: _Config, rows: int, features: int, dtype) -> int:
  """Rows per TPU block: about 2^17 elements, a multiple of the sublane tile, or all rows."""
  sublanes = 8 if jnp.dtype(dtype).itemsize >= 4 else 16
  block_rows = cfg.block_rows or max(sublanes, (2**17 // features) // sublanes * sublanes)
  return rows if rows <= block_rows else block_rows


def _gpu_view(cfg: _Config, features: int) -> _GpuRow:
  """Columns per chunk: a power of two, 4096 by default (with 8 warps and 2 stages, the best of the sweep in
  bench/kernels_polynorm.py on an H200 over [8192, 16384] and [16384, 8192] bfloat16, forward + backward)."""
  padded = pl.next_power_of_2(features)
  return _GpuRow(features, min(cfg.block_cols or 4096, padded))


def _gpu_num_warps(cfg: _Config, view: _GpuRow, name: str) -> int:
  """Warps per program: cfg.num_warps, else 8, but 16 for the forward over more than two chunks (on an H200
  at [8192, 16384] bfloat16 the forward took 0.211 ms with 16 warps against 0.227 ms with 8; the backward
  ran best with 8 at both benchmark shapes)."""
  if cfg.num_warps:
    return cfg.num_warps
  return 16 if name == "polynorm_forward" and view.num_chunks > 2 else 8


def _call(cfg: _Config, kernel, gate, inputs, out_shapes, name: str):
  """Runs `kernel(*input_refs, *output_refs, view=...)` over blocks of the rows of `gate` [rows, features],
  as the Pallas kernel `name` (the name profiles and jaxprs show).

  inputs and out_shapes are arrays / jax.ShapeDtypeStructs [rows, features] (features local to this device),
  row statistics [rows, 4], or coef [4].
  """
  rows, features = gate.shape
  if cfg.impl == "pallas_tpu":
    block_rows = _tpu_block_rows(cfg, rows, features, gate.dtype)

    def spec(x):
      if x.ndim == 1:  # coef, read as scalars
        return pl.BlockSpec(memory_space=pltpu.SMEM)
      return pl.BlockSpec((block_rows, x.shape[1]), lambda i: (i, 0))

    return pl.pallas_call(
        lambda *refs: kernel(*refs, view=_TpuBlock()),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[spec(x) for x in inputs],
        out_specs=[spec(x) for x in out_shapes],
        out_shape=out_shapes,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",),
                                             vmem_limit_bytes=48 * 2**20),
        interpret=pltpu.InterpretParams() if cfg.interpret else False, name=name,
    )(*inputs)
  view = _gpu_view(cfg, features)
  return pl.pallas_call(
      lambda *refs: kernel(*refs, view=view.for_program()),
      grid=(rows,),
      out_shape=out_shapes,
      compiler_params=plgpu.CompilerParams(num_warps=_gpu_num_warps(cfg, view, name),
                                           num_stages=cfg.num_stages or 2),
      interpret=cfg.interpret, name=name,
  )(*inputs)


def _stats_shape(rows: int):
  return jax.ShapeDtypeStruct((rows, NUM_POWERS), jnp.float32)


def _power_sums_call(cfg: _Config, gate):
  """gate [rows, f] -> power sums [rows, 4] over these f features (partial when the features are sharded)."""
  (sums,) = _call(cfg, _power_sums_kernel, gate, [gate], [_stats_shape(gate.shape[0])],
                  "polynorm_power_sums")
  return sums


def _forward_call(cfg: _Config, gate, up, coef, inv_rms=None):
  """gate, up [rows, f]; coef [4] -> out [rows, f], inv_rms [rows, 4].

  Without inv_rms the row statistics are computed in the kernel (f must be the full row); with it, only applied.
  """
  rows = gate.shape[0]
  if cfg.impl == "pallas_mosaic_gpu":  # whole rows only (see _resolve_impl)
    kernel = functools.partial(_mosaic_forward_kernel, eps=cfg.eps)
    return _mosaic_call(cfg, kernel, coef, (gate, up), (), 1, "polynorm_forward_mosaic_gpu")
  kernel = functools.partial(_forward_kernel, features=cfg.features, eps=cfg.eps, fused=inv_rms is None)
  out_shape = jax.ShapeDtypeStruct(gate.shape, gate.dtype)
  if inv_rms is None:
    return tuple(_call(cfg, kernel, gate, [coef, gate, up], [out_shape, _stats_shape(rows)],
                       "polynorm_forward"))
  (out,) = _call(cfg, kernel, gate, [coef, gate, up, inv_rms], [out_shape], "polynorm_forward")
  return out, inv_rms


def _grad_sums_call(cfg: _Config, gate, up, dout):
  """gate, up, dout [rows, f] -> grad sums [rows, 4] over these f features (partial when sharded)."""
  (sums,) = _call(cfg, _grad_sums_kernel, gate, [gate, up, dout], [_stats_shape(gate.shape[0])],
                  "polynorm_grad_sums")
  return sums


def _backward_call(cfg: _Config, gate, up, dout, coef, inv_rms, grad_sums=None):
  """gate, up, dout [rows, f]; coef [4]; inv_rms [rows, 4] -> dgate, dup [rows, f], grad_sums [rows, 4].

  Without grad_sums they are computed in the kernel (f must be the full row); with them, only applied.
  """
  if cfg.impl == "pallas_mosaic_gpu":  # whole rows only (see _resolve_impl)
    return _mosaic_call(cfg, _mosaic_backward_kernel, coef, (gate, up, dout), (inv_rms,), 2,
                        "polynorm_backward_mosaic_gpu")
  kernel = functools.partial(_backward_kernel, features=cfg.features, fused=grad_sums is None)
  grads_shape = [jax.ShapeDtypeStruct(gate.shape, gate.dtype), jax.ShapeDtypeStruct(up.shape, up.dtype)]
  inputs = [coef, gate, up, dout, inv_rms]
  if grad_sums is None:
    return tuple(_call(cfg, kernel, gate, inputs, grads_shape + [_stats_shape(gate.shape[0])],
                       "polynorm_backward"))
  dgate, dup = _call(cfg, kernel, gate, inputs + [grad_sums], grads_shape, "polynorm_backward")
  return dgate, dup, grad_sums


def _coef_grad(inv_rms, grad_sums):
  """d coef [4] = sum over rows of r_k c_k; inv_rms, grad_sums [rows, 4]."""
  return jnp.sum(inv_rms * grad_sums, axis=0)


# ----------------------------------------------------------------- Mosaic GPU: the row in shared memory
# Rows are viewed as [rows, lines, 256] (a TMA box spans at most 256 elements per dimension); a row's inputs
# sit in shared memory as [lines, 256] buffers, copied in `parts` transfers of part_lines lines, and the
# registers take chunk_lines lines at a time (8 x 256 = 16 values per thread of the warpgroup).

MOSAIC_LANES = 256
MOSAIC_SMEM_BYTES = 200 * 2**10  # the backward's three rows of inputs (an H100/H200 block has 227 KiB)
_MOSAIC_PARTS = 4  # at most; on an H200, 1 to 8 parts and 4 to 16 lines per chunk all ran within 2%
_MOSAIC_CHUNK_LINES = 8  # at most


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, at_most + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class _MosaicPlan:
  """How a Mosaic GPU kernel splits a row of `features` = lines * 256."""

  features: int

  @property
  def lines(self) -> int:
    return self.features // MOSAIC_LANES

  @property
  def parts(self) -> int:
    return _largest_divisor(self.lines, _MOSAIC_PARTS)

  @property
  def part_lines(self) -> int:
    return self.lines // self.parts

  @property
  def chunk_lines(self) -> int:
    return _largest_divisor(self.part_lines, _MOSAIC_CHUNK_LINES)

  def part(self, p: int):
    return pl.ds(p * self.part_lines, self.part_lines)

  def chunk(self, p: int, j):
    """Chunk j of part p, as an index of a [lines, 256] buffer."""
    return pl.ds(p * self.part_lines + j * self.chunk_lines, self.chunk_lines), slice(None)


def _mosaic_gpu_unfit(features: int, dtype, interpret: bool) -> str | None:
  """Why the Mosaic GPU kernels cannot take rows of `features` of `dtype` here, or None if they can."""
  if features % MOSAIC_LANES:
    return f"features={features} is not a multiple of {MOSAIC_LANES}"
  if 3 * features * jnp.dtype(dtype).itemsize > MOSAIC_SMEM_BYTES:
    return f"three rows of {features} {jnp.dtype(dtype).name} exceed {MOSAIC_SMEM_BYTES} bytes of shared memory"
  if not interpret and jax.default_backend() == "gpu":
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    if float(capability) < 9.0:
      return f"it needs a Hopper or newer GPU (TMA), found compute capability {capability}"
  return None


def _mosaic_load_row(row, plan: _MosaicPlan, rows_hbm, smem, barriers):
  """Starts the TMA copies of row `row` of each [rows, lines, 256] input into its [lines, 256] buffer; part p
  of every input arrives on barriers[p]."""
  for p in range(plan.parts):
    for src, dst in zip(rows_hbm, smem):
      plmgpu.copy_gmem_to_smem(src.at[row, plan.part(p)], dst.at[plan.part(p)], barriers.at[p])


def _mosaic_row_sums(plan: _MosaicPlan, smem, barriers, terms_fn, num_terms: int):
  """Row sums of the num_terms arrays terms_fn(*chunk values of each buffer in smem, float32), summed
  elementwise over the chunks and reduced once; waits for each part of the row as it comes."""
  acc = (jnp.zeros((plan.chunk_lines, MOSAIC_LANES), jnp.float32),) * num_terms
  for p in range(plan.parts):
    plmgpu.barrier_wait(barriers.at[p])

    def step(j, acc, p=p):
      terms = terms_fn(*(ref[plan.chunk(p, j)].astype(jnp.float32) for ref in smem))
      return tuple(a + t for a, t in zip(acc, terms))

    acc = lax.fori_loop(0, plan.part_lines // plan.chunk_lines, step, acc)
  return tuple(jnp.sum(a) for a in acc)


def _mosaic_apply(row, plan: _MosaicPlan, smem, apply_fn, outputs):
  """Writes apply_fn(*chunk values of each buffer, float32) in place, output i over smem[slot_i], and sends each
  part to row `row` of its [rows, lines, 256] output by TMA once written. outputs: ((slot, output ref), ...)."""
  for p in range(plan.parts):

    def step(j, carry, p=p):
      values = apply_fn(*(ref[plan.chunk(p, j)].astype(jnp.float32) for ref in smem))
      for (slot, _), value in zip(outputs, values):
        smem[slot][plan.chunk(p, j)] = value.astype(smem[slot].dtype)
      return carry

    lax.fori_loop(0, plan.part_lines // plan.chunk_lines, step, 0)
    plmgpu.commit_smem()
    for slot, out_hbm in outputs:
      plmgpu.copy_smem_to_gmem(smem[slot].at[plan.part(p)], out_hbm.at[row, plan.part(p)])
  plmgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the buffers must outlive the copies that read them


def _mosaic_forward_kernel(coef_hbm, gate_hbm, up_hbm, out_hbm, inv_rms_hbm, gate_smem, up_smem, barriers, *,
                           plan, eps):
  """out = PolyNorm(gate) * up for one row, written over up in shared memory; inv_rms [rows, 4]."""
  row, smem = lax.axis_index("rows"), (gate_smem, up_smem)
  _mosaic_load_row(row, plan, (gate_hbm, up_hbm), smem, barriers)
  inv_rms = _inv_rms(*_mosaic_row_sums(plan, (gate_smem,), barriers, _power_terms, 3), plan.features, eps)
  _store_row_stats(inv_rms_hbm, row, inv_rms)
  scale = tuple(c * r for c, r in zip(_coef_columns(coef_hbm), inv_rms))
  _mosaic_apply(row, plan, smem, lambda z, up: (_polynomial(z, scale) * up,), ((1, out_hbm),))


def _mosaic_backward_kernel(coef_hbm, gate_hbm, up_hbm, dout_hbm, inv_rms_hbm, dgate_hbm, dup_hbm, grad_sums_hbm,
                            gate_smem, up_smem, dout_smem, barriers, *, plan):
  """dgate (over gate) and dup (over up) for one row; grad sums [rows, 4]."""
  row, smem = lax.axis_index("rows"), (gate_smem, up_smem, dout_smem)
  _mosaic_load_row(row, plan, (gate_hbm, up_hbm, dout_hbm), smem, barriers)
  grad_sums = _mosaic_row_sums(plan, smem, barriers, lambda z, up, dout: _grad_terms(z, dout * up),
                               NUM_POWERS)
  _store_row_stats(grad_sums_hbm, row, grad_sums)
  inv_rms = _load_row_stats(inv_rms_hbm, row)
  scale, scale_e = _grad_coefficients(_coef_columns(coef_hbm), inv_rms, grad_sums, plan.features)

  def apply(z, up, dout):
    return _polynomial_grad(z, dout * up, scale, scale_e), dout * _polynomial(z, scale)

  _mosaic_apply(row, plan, smem, apply, ((0, dgate_hbm), (1, dup_hbm)))


def _mosaic_call(cfg: _Config, kernel, coef, row_inputs, stats_inputs, num_row_outputs: int, name: str):
  """Runs `kernel(coef, *row_inputs, *stats_inputs, *row outputs, stats output, *buffers, barriers, plan=...)`
  with a CUDA block per row, as the Mosaic GPU kernel `name`.

  row_inputs: [rows, features] arrays, each given a [lines, 256] shared-memory buffer; stats_inputs: [rows, 4].
  Returns num_row_outputs arrays [rows, features] in row_inputs[0]'s dtype, then row statistics [rows, 4].
  """
  rows, features = row_inputs[0].shape
  plan = _MosaicPlan(features)
  lines = (rows, plan.lines, MOSAIC_LANES)
  outs = plmgpu.kernel(
      functools.partial(kernel, plan=plan),
      out_type=[jax.ShapeDtypeStruct(lines, row_inputs[0].dtype)] * num_row_outputs + [_stats_shape(rows)],
      scratch_types=[plmgpu.SMEM(lines[1:], x.dtype) for x in row_inputs]
      + [plmgpu.Barrier(num_arrivals=len(row_inputs), num_barriers=plan.parts)],
      grid=(rows,), grid_names=("rows",), kernel_name=name,
      interpret=plmgpu.InterpretGPUParams() if cfg.interpret else None,
  )(coef, *(x.reshape(lines) for x in row_inputs), *stats_inputs)
  return (*(out.reshape(rows, features) for out in outs[:-1]), outs[-1])

# ---------------------------------------------------------------------------------- custom VJP, unsharded


CHECKPOINT_NAME = "polynorm"  # the name of the output and custom_vjp residuals (gate, up, statistics)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mul_polynorm_rows(cfg: _Config, gate, up, coef):
  """gate, up [rows, features]; coef [4] -> [rows, features]."""
  return _forward_call(cfg, gate, up, coef)[0]


def _mul_polynorm_rows_fwd(cfg, gate, up, coef):
  out, inv_rms = _forward_call(cfg, gate, up, coef)
  return checkpoint_name(out, CHECKPOINT_NAME), _named_residuals(gate, up, coef, inv_rms)


def _named_residuals(*residuals):
  """The residuals, named CHECKPOINT_NAME so that a remat policy can keep them (no recomputation);
  the forward's output carries the name too (the down projection's backward reads it)."""
  return tuple(checkpoint_name(x, CHECKPOINT_NAME) for x in residuals)


def _mul_polynorm_rows_bwd(cfg, residuals, dout):
  gate, up, coef, inv_rms = residuals
  dgate, dup, grad_sums = _backward_call(cfg, gate, up, dout, coef, inv_rms)
  return dgate, dup, _coef_grad(inv_rms, grad_sums)


_mul_polynorm_rows.defvjp(_mul_polynorm_rows_fwd, _mul_polynorm_rows_bwd)


# ------------------------------------------------------------------------------------- custom VJP, sharded


@dataclasses.dataclass(frozen=True)
class _Layout:
  """gate/up [batch, ..., features]: batch split over batch_axes, features over axis, the rest replicated."""

  mesh: jax.sharding.Mesh
  axis: str
  batch_axes: tuple[str, ...]
  ndim: int
  split: bool  # features split over more than one device: statistics kernels, psum, then apply kernels

  @property
  def data_spec(self):
    return P(self.batch_axes, *([None] * (self.ndim - 2)), self.axis)

  @property
  def stats_spec(self):
    return P(self.batch_axes, *([None] * (self.ndim - 2)), None)


def _rows(x):
  return x.reshape(-1, x.shape[-1])


def _sharded_forward(cfg: _Config, layout: _Layout, gate, up, coef):
  """-> out [..., features] and inv_rms [..., 4], sharded by layout."""

  def local(gate, up, coef):
    if layout.split:
      sums = lax.psum(_power_sums_call(cfg, _rows(gate)), layout.axis)
      inv_rms = lax.rsqrt(sums * (1.0 / cfg.features) + cfg.eps).at[:, 0].set(1.0)  # as _inv_rms, per column
      out, _ = _forward_call(cfg, _rows(gate), _rows(up), coef, inv_rms)
    else:
      out, inv_rms = _forward_call(cfg, _rows(gate), _rows(up), coef)
    return out.reshape(gate.shape), inv_rms.reshape(*gate.shape[:-1], NUM_POWERS)

  return jax.shard_map(local, mesh=layout.mesh, in_specs=(layout.data_spec, layout.data_spec, P()),
                       out_specs=(layout.data_spec, layout.stats_spec), check_vma=False)(gate, up, coef)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mul_polynorm_sharded(cfg: _Config, layout: _Layout, gate, up, coef):
  return _sharded_forward(cfg, layout, gate, up, coef)[0]


def _mul_polynorm_sharded_fwd(cfg, layout, gate, up, coef):
  out, inv_rms = _sharded_forward(cfg, layout, gate, up, coef)
  return checkpoint_name(out, CHECKPOINT_NAME), _named_residuals(gate, up, coef, inv_rms)


def _mul_polynorm_sharded_bwd(cfg, layout, residuals, dout):
  gate, up, coef, inv_rms = residuals

  def local(gate, up, dout, coef, inv_rms):
    rows, inv_rms = (_rows(gate), _rows(up), _rows(dout)), _rows(inv_rms)
    if layout.split:
      grad_sums = lax.psum(_grad_sums_call(cfg, *rows), layout.axis)
      dgate, dup, _ = _backward_call(cfg, *rows, coef, inv_rms, grad_sums)
    else:
      dgate, dup, grad_sums = _backward_call(cfg, *rows, coef, inv_rms)
    row_coef_grads = (inv_rms * grad_sums).reshape(*gate.shape[:-1], NUM_POWERS)
    return dgate.reshape(gate.shape), dup.reshape(up.shape), row_coef_grads

  data, stats = layout.data_spec, layout.stats_spec
  dgate, dup, row_coef_grads = jax.shard_map(
      local, mesh=layout.mesh, in_specs=(data, data, data, P(), stats), out_specs=(data, data, stats),
      check_vma=False)(gate, up, dout, coef, inv_rms)
  return dgate, dup, jnp.sum(_rows(row_coef_grads), axis=0)


_mul_polynorm_sharded.defvjp(_mul_polynorm_sharded_fwd, _mul_polynorm_sharded_bwd)


# ------------------------------------------------------------------------------------------------ public


def _resolve_impl(caller: str, impl: str, gate, interpret: bool, split: bool = False, **triton_options) -> str:
  """impl -> "reference", "pallas_tpu", "pallas_triton" or "pallas_mosaic_gpu" for rows of gate [..., features].

  "auto" goes by jax.default_backend(); "pallas_gpu" takes Mosaic GPU where it fits (whole rows, see
  _mosaic_gpu_unfit) and Triton elsewhere, and in interpret mode: Mosaic GPU's interpret mode runs through
  ordered IO callbacks, which remat cannot differentiate and which fail when several devices run a kernel at
  once. split: the features are split over devices (the kernels see partial rows).
  """
  if impl not in IMPLS:
    raise ValueError(f"{caller}: impl={impl!r}; choose one of {IMPLS}")
  if impl == "auto":
    impl = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "reference")
  if impl not in ("pallas_gpu", "pallas_mosaic_gpu"):
    return impl
  unfit = ("the features are split over devices (it holds whole rows)" if split
           else _mosaic_gpu_unfit(gate.shape[-1], gate.dtype, interpret))
  if impl == "pallas_gpu":
    return "pallas_triton" if unfit or interpret else "pallas_mosaic_gpu"
  if unfit:
    raise ValueError(f"{caller}: impl='pallas_mosaic_gpu' cannot run here: {unfit}; use impl='pallas_gpu', "
                     "which falls back to the Triton kernels")
  if given := sorted(name for name, value in triton_options.items() if value is not None):
    raise ValueError(f"{caller}: {', '.join(given)} tune the Triton kernels; impl='pallas_mosaic_gpu' takes none")
  return impl


def _coef(weight, bias):
  """weight [3] = (w0, w1, w2), bias [1] -> coef [4] = (b, w2, w1, w0), float32."""
  return jnp.concatenate([bias.reshape(1), weight.reshape(3)[::-1]]).astype(jnp.float32)


def _check_inputs(gate, up, weight, bias):
  if gate.shape != up.shape or gate.dtype != up.dtype:
    raise ValueError(f"mul_polynorm: gate {gate.shape} {gate.dtype} and up {up.shape} {up.dtype} must match")
  if gate.ndim < 2:
    raise ValueError(f"mul_polynorm: gate must be [..., features] with at least 2 dims, got {gate.shape}")
  if weight.shape != (3,) or bias.shape != (1,):
    raise ValueError(f"mul_polynorm: weight must be [3] and bias [1], got {weight.shape} and {bias.shape}")


def mul_polynorm(gate, up, weight, bias, *, eps: float = 1e-6, impl: str = "auto", interpret: bool = False,
                 block_rows: int | None = None, block_cols: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None):
  """PolyNorm(gate) * up, fused, with a custom VJP; the mean runs over the whole last axis of this array.

  Args:
    gate, up: [..., features], same dtype (bfloat16 or float32); leading dims are flattened to rows.
    weight: [3] = (w0, w1, w2) for N(z^3), N(z^2), N(z); bias: [1]. Float32.
    eps: added to the mean square.
    impl: "reference" (jnp), "pallas_tpu" (Mosaic TPU), "pallas_mosaic_gpu" (Mosaic GPU, Hopper and newer,
      features a multiple of 256 and 3 * features * itemsize <= 200 KiB), "pallas_triton" (Triton, any GPU and
      width), "pallas_gpu" (Mosaic GPU where it fits, else Triton; Triton in interpret mode), or "auto": by
      jax.default_backend() (tpu -> pallas_tpu, gpu -> pallas_gpu, else reference).
    interpret: run the Pallas kernel in interpret mode (Triton: plain interpret; TPU: pltpu.InterpretParams();
      Mosaic GPU: plmgpu.InterpretGPUParams()).
    block_rows: TPU only; rows per kernel block (a multiple of 8, 16 for bf16). The GPU kernels take a row per
      program.
    block_cols, num_warps, num_stages: Triton only; the column chunk (a power of two, default 4096), the warps
      per program (8; 16 for the forward of rows over 8192 wide) and the software-pipelining stages (2).
  Returns:
    [..., features] in gate's dtype. Differentiable in gate, up, weight and bias.
  """
  _check_inputs(gate, up, weight, bias)
  impl = _resolve_impl("mul_polynorm", impl, gate, interpret, block_cols=block_cols, num_warps=num_warps,
                       num_stages=num_stages)
  if impl == "reference":
    return mul_polynorm_reference(gate, up, weight, bias, eps=eps)
  cfg = _Config(impl=impl, eps=eps, features=gate.shape[-1], interpret=interpret, block_rows=block_rows,
                block_cols=block_cols, num_warps=num_warps, num_stages=num_stages)
  out = _mul_polynorm_rows(cfg, _rows(gate), _rows(up), _coef(weight, bias))
  return out.reshape(gate.shape)


def mul_polynorm_sharded(gate, up, weight, bias, *, mesh: jax.sharding.Mesh | None, axis: str = "tensor",
                         batch_axes: tuple[str, ...] = ("data", "fsdp"), eps: float = 1e-6, impl: str = "auto",
                         interpret: bool = False, split: bool | None = None, block_rows: int | None = None,
                         block_cols: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
  """`mul_polynorm` with the feature axis sharded over mesh axis `axis` and the first axis over `batch_axes`.

  Each device runs the statistics kernel on its features, the per-row sums of z^2, z^4, z^6 are psummed over
  `axis`, then the apply kernel normalises; the backward does the same with the grad sums. Equal to the
  unsharded result. When `axis` has one device, the rows are whole and each device runs the fused kernels of
  `mul_polynorm` instead. With no mesh, an empty one or a single device (and `split` not True), this is
  `mul_polynorm`. impl="reference" runs the plain reference and lets the partitioner reduce the mean; with
  features split, "pallas_gpu" runs the Triton kernels.

  Args:
    gate, up: [batch, ..., features]; batch divisible by the size of batch_axes, features by that of axis.
    weight [3], bias [1]: replicated.
    mesh: a `Mesh`, the `AbstractMesh` of `jax.sharding.get_abstract_mesh()` under jit, or None; axis,
      batch_axes: its axis names.
    split: run the statistics and apply kernels with the psum between them; None (the default): when `axis` has
      more than one device. True on one device tests and times that path there. Other arguments as in
      `mul_polynorm`.
  Returns:
    [batch, ..., features] in gate's dtype, sharded like gate.
  """
  _check_inputs(gate, up, weight, bias)
  kernel_options = dict(block_rows=block_rows, block_cols=block_cols, num_warps=num_warps, num_stages=num_stages)
  if mesh is None or mesh.empty or (mesh.size == 1 and not split):
    return mul_polynorm(gate, up, weight, bias, eps=eps, impl=impl, interpret=interpret, **kernel_options)
  split = mesh.shape[axis] > 1 if split is None else split
  impl = _resolve_impl("mul_polynorm_sharded", impl, gate, interpret, split, block_cols=block_cols,
                       num_warps=num_warps, num_stages=num_stages)
  if impl == "reference":
    return mul_polynorm_reference(gate, up, weight, bias, eps=eps)
  batch_axes = tuple(batch_axes)
  batch_shards = math.prod(mesh.shape[name] for name in batch_axes)
  if gate.shape[0] % batch_shards or gate.shape[-1] % mesh.shape[axis]:
    raise ValueError(
        f"mul_polynorm_sharded: gate {gate.shape} needs its first dim divisible by {batch_shards} "
        f"(mesh axes {batch_axes}) and its last by {mesh.shape[axis]} (mesh axis {axis!r}); pad the batch or "
        "change the mesh")
  cfg = _Config(impl=impl, eps=eps, features=gate.shape[-1], interpret=interpret, **kernel_options)
  layout = _Layout(mesh=mesh, axis=axis, batch_axes=batch_axes, ndim=gate.ndim, split=split)
  return _mul_polynorm_sharded(cfg, layout, gate, up, _coef(weight, bias))
