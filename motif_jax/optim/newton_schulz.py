"""Quintic Newton-Schulz orthogonalization, the core of Muon (docs/optimizer.md).

For a matrix `X` with SVD `U S V^T`, the iteration drives every singular value towards about 1, giving
roughly `U V^T` (Muon's update direction). One step is

    A = X X^T;  B = b A + c A A;  X = a X + B X

with coefficients `(a, b, c)` that may change from step to step. The input is scaled by its Frobenius
norm first (so every singular value is at most 1) and turned wide (rows <= cols), which makes the
Gram matrix `A` the smaller one.
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

Triple = tuple[float, float, float]
Coeffs = Union[str, Triple, Sequence[Triple]]

# Keller Jordan's quintic, the same triple at every step.
CLASSIC_COEFFS: Triple = (3.4445, -4.7750, 2.0315)
# Per-step tuned triples published with Dion (optax's 'dion' preset): 5 steps.
DION_COEFFS: tuple[Triple, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
COEFF_SETS = {"classic": CLASSIC_COEFFS, "dion": DION_COEFFS}

NORM_EPS = 1e-7


def resolve_coeffs(coeffs: Coeffs, steps: int) -> tuple[Triple, ...]:
  """The `(a, b, c)` triple of every step: a name from COEFF_SETS, one triple, or one triple per step.

  A single triple is repeated `steps` times; a per-step set must have exactly `steps` triples.
  """
  if isinstance(coeffs, str):
    if coeffs not in COEFF_SETS:
      raise ValueError(f"ns_coeffs={coeffs!r} is not a known coefficient set; choose one of "
                       f"{sorted(COEFF_SETS)} or pass (a, b, c) or one such triple per step.")
    coeffs = COEFF_SETS[coeffs]
  if steps < 1:
    raise ValueError(f"ns_steps={steps} must be at least 1.")
  if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
    return (tuple(float(c) for c in coeffs),) * steps
  table = tuple(tuple(float(c) for c in triple) for triple in coeffs)
  if any(len(triple) != 3 for triple in table):
    raise ValueError(f"ns_coeffs={coeffs!r}: every entry must be an (a, b, c) triple.")
  if len(table) != steps:
    raise ValueError(f"ns_coeffs has {len(table)} per-step triples but ns_steps={steps}; set "
                     f"ns_steps={len(table)} or pass a single (a, b, c) triple.")
  return table


def newton_schulz(x: jax.Array, *, steps: int = 5, coeffs: Coeffs = "classic",
                  dtype=jnp.bfloat16) -> jax.Array:
  """Approximately orthogonalizes each matrix of `x`.

  x: [..., rows, cols]; leading axes are a batch of independent matrices. Returns the same shape and
  dtype. Matmul operands are cast to `dtype` (bfloat16 by default) and accumulate in float32
  (`preferred_element_type`); the Frobenius scaling (norm + 1e-7) is computed in float32.
  """
  table = resolve_coeffs(coeffs, steps)
  out_dtype = x.dtype
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
  x = (x32 / (norm + NORM_EPS)).astype(dtype)

  def mm(lhs, rhs, spec):
    if jax.default_backend() == "cpu":
      # XLA:CPU cannot run some bf16 x bf16 -> f32 dots; the upcast operands give the same products.
      lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)

  for a, b, c in table:
    gram = mm(x, x, "...ik,...jk->...ij")                        # [..., rows, rows]
    gram_c = gram.astype(dtype)
    poly = b * gram + c * mm(gram_c, gram_c, "...ik,...kj->...ij")
    x = (a * x.astype(jnp.float32) + mm(poly.astype(dtype), x, "...ik,...kj->...ij")).astype(dtype)
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(out_dtype)


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
  """FLOPs of `newton_schulz` on one [rows, cols] matrix, m = min(rows, cols), n = max.

  Per step: X X^T (2 m^2 n) + A A (2 m^3) + B X (2 m^2 n) in matmuls, plus 3 m^2 + 2 m n elementwise
  (the cost model of Motif's Parallel Muon scheduler).
  """
  m, n = min(rows, cols), max(rows, cols)
  return steps * (4 * m * m * n + 2 * m**3 + 3 * m * m + 2 * m * n)
