"""Muon for the hidden matrices, routing of every parameter to Muon or AdamW, and Parallel Muon.

Muon (docs/optimizer.md), per matrix W of shape [m, n] with gradient g:

    f = mu * f + g;  g' = g + mu * f                            (Nesterov, no bias correction)
    W  <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(m, n)) * NS(g')

built as a chain of small transforms: `optax.trace` (Nesterov momentum, float32 buffer) ->
`orthogonalize_updates` (Newton-Schulz) -> `scale_by_matrix_rms` (0.2 sqrt(max(m, n))) -> decoupled
weight decay -> learning rate.

Routing: a parameter goes to Muon when its logical axes, less the stacking axis 'layers', are two
(each layer of a [layers, m, n] stack is its own matrix) and its path names neither the token
embedding nor the LM head; everything else (embedding, lm_head, norm gains, PolyNorm weights, lambda
vectors) goes to AdamW.

Grouping and Parallel Muon: matrices of the same shape up to a transpose (for Motif-2.6B, all layers'
wq, wk, wv and wo form one group, and the w_gate, w_up and, transposed, w_down stacks another; in
Motif-2-12.7B the attention projections differ in shape and form several) are flattened into one
batch. With a `mesh`, the batch is padded to a multiple of the device count and sharded on that batch
axis over every mesh axis with the matrix dims whole, so each device orthogonalizes each of its own
whole matrices exactly once; the results are constrained back to the parameters' sharding (XLA turns
both constraints into all-to-alls). Each device runs its matrices in sequential chunks bounded by
`ns_chunk_bytes` (see `orthogonalize`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from motif_jax.optim.newton_schulz import Coeffs, newton_schulz
from motif_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec

MUON, ADAM = "muon", "adam"
STACK_AXES = ("layers",)           # leading logical axes that stack independent matrices
ADAM_PATH_KEYS = ("embedding", "lm_head")
RMS_SCALE = 0.2                    # Moonlight's update-RMS matching: 0.2 * sqrt(max(m, n))
DEFAULT_CHUNK_BYTES = 1 << 30      # Newton-Schulz's largest float32 intermediate per device


def _is_spec(x) -> bool:
  return isinstance(x, P)


def path_name(path) -> str:
  """'blocks/attn/wq' for the key path of a leaf in a nested dict."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _matrix_axes(name: str, axes: P) -> tuple:
  """The logical axes of `axes` after the leading stack axes; rejects stack axes elsewhere."""
  axes = tuple(axes)
  lead = 0
  while lead < len(axes) and axes[lead] in STACK_AXES:
    lead += 1
  rest = axes[lead:]
  if any(a in STACK_AXES for a in rest):
    raise ValueError(f"Parameter {name} has logical axes {axes}: stacking axes {STACK_AXES} must "
                     "lead; move them to the front in the model's param definition.")
  return rest


def param_label(name: str, axes: P) -> str:
  """MUON or ADAM for the parameter at path `name` with logical axes `axes`."""
  if any(key in ADAM_PATH_KEYS for key in name.split("/")):
    return ADAM
  return MUON if len(_matrix_axes(name, axes)) == 2 else ADAM


def routing_labels(logical_axes):
  """Tree like the params with MUON / ADAM leaves (for `optax.partition`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, axes: param_label(path_name(path), axes), logical_axes, is_leaf=_is_spec)


def describe_routing(params, logical_axes) -> str:
  """A table of every parameter, its shape and its optimizer (params may be abstract)."""
  flat_axes = dict((path_name(p), a) for p, a in
                   jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_spec)[0])
  rows, totals = [], {MUON: [0, 0], ADAM: [0, 0]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_name(path)
    label = param_label(name, flat_axes[name])
    shape = tuple(leaf.shape)
    if label == MUON:
      count = math.prod(shape[:-2])
      detail = f"Muon   {count} x {shape[-2]}x{shape[-1]}"
    else:
      count = 1
      detail = "AdamW"
    totals[label][0] += count
    totals[label][1] += math.prod(shape)
    rows.append((name, str(list(shape)), detail))
  width = max(len(r[0]) for r in rows)
  lines = [f"Optimizer routing: Muon {totals[MUON][0]} matrices / {totals[MUON][1]:,} params; "
           f"AdamW {totals[ADAM][1]:,} params"]
  lines += [f"  {n:<{width}}  {s:<18} {d}" for n, s, d in sorted(rows)]
  return "\n".join(lines)


def _wide(x: jax.Array) -> jax.Array:
  """x: [..., m, n] -> [..., min, max]: the transpose of a tall matrix (NS(X^T) = NS(X)^T)."""
  return jnp.swapaxes(x, -1, -2) if x.shape[-2] > x.shape[-1] else x


def _names(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(names: tuple[str, ...]):
  return None if not names else names[0] if len(names) == 1 else names


def _reshard_path(spec: P, shape: tuple[int, ...], mesh: Mesh) -> list[P]:
  """Shardings that take a wide [B, m, n] batch from its parameters' layout to whole matrices per
  device, one mesh-axis move at a time (each step a local slice or one all-to-all).

  `spec` is the layout of one [*stack, rows, cols] parameter (stack axes unsharded). Returns
  [P(None, r, c), P(free, r, c), P(free + r, None, c), P(free + r + c, None, None)] where `free` are the
  mesh axes the parameter is replicated over; the last entry shards B over every mesh axis.
  """
  dims = tuple(spec) + (None,) * (len(shape) - len(spec))
  rows, cols = _names(dims[-2]), _names(dims[-1])
  if shape[-2] > shape[-1]:
    rows, cols = cols, rows
  free = tuple(a for a in mesh.axis_names if a not in rows + cols)
  return [P(None, _spec_entry(rows), _spec_entry(cols)),
          P(_spec_entry(free), _spec_entry(rows), _spec_entry(cols)),
          P(_spec_entry(free + rows), None, _spec_entry(cols)),
          P(_spec_entry(free + rows + cols), None, None)]


def chunk_layout(count: int, rows: int, cols: int, *, shards: int, chunk_bytes: int | None):
  """(chunks, per_chunk): how `count` [rows, cols] matrices spread over `shards` devices run NS.

  Each device holds ceil(count / shards) matrices and orthogonalizes them `per_chunk` at a time, in
  `chunks` sequential chunks, so that a float32 [per_chunk, rows, cols] array (Newton-Schulz's largest
  intermediate) stays within `chunk_bytes` (None: one chunk). Chunks are made even, so padding adds
  fewer than `chunks` matrices per device.
  """
  local = -(-count // shards)
  fit = local if chunk_bytes is None else max(1, chunk_bytes // (4 * rows * cols))
  chunks = -(-local // fit)
  return chunks, -(-local // chunks)


def orthogonalize(leaves: dict[str, jax.Array], param_specs: dict[str, P] | None, *, steps: int,
                  coeffs: Coeffs, dtype, mesh: Mesh | None,
                  chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> dict[str, jax.Array]:
  """Newton-Schulz of every matrix of every leaf; each leaf is [*stack, m, n] -> same shape, float32.

  Leaves whose matrices have the same shape up to a transpose share one batch [B, m, n] (m <= n).
  With a mesh (and `param_specs`, the leaves' PartitionSpecs), the batch is resharded from the
  parameter layout to one sharded over all mesh axes on B, so every device orthogonalizes its own
  whole matrices, once; the result is resharded back the same way. Each device runs its matrices in
  sequential chunks (`chunk_layout`) so that Newton-Schulz's working set stays near `chunk_bytes`
  whatever the model's size; the batch is padded with zero matrices to shards x chunks x per_chunk.
  """
  groups: dict[tuple[int, int], list[str]] = {}
  for name, x in leaves.items():
    groups.setdefault(tuple(sorted(x.shape[-2:])), []).append(name)
  shards = 1 if mesh is None else mesh.size

  def constrain(x, spec):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def chunk_ns(chunk, spread=None):                                    # [shards, per_chunk, m, n]
    if spread is not None:  # the shards axis over the mesh axes that whole matrices spread over
      chunk = constrain(chunk, P(spread))
    return newton_schulz(chunk, steps=steps, coeffs=coeffs, dtype=dtype)

  out = {}
  for (m, n), names in groups.items():
    pieces = [_wide(leaves[name].astype(dtype)) for name in names]
    pieces = [p.reshape(-1, m, n) for p in pieces]
    sizes = [p.shape[0] for p in pieces]
    chunks, per_chunk = chunk_layout(sum(sizes), m, n, shards=shards, chunk_bytes=chunk_bytes)
    batch = jnp.concatenate(pieces, axis=0)                            # [B, m, n]
    batch = jnp.pad(batch, ((0, shards * chunks * per_chunk - batch.shape[0]), (0, 0), (0, 0)))
    spread = None
    if mesh is not None:
      path = _reshard_path(param_specs[names[0]], leaves[names[0]].shape, mesh)
      for spec in path:                                                # to whole matrices
        batch = constrain(batch, spec)
      spread = path[-1][0]
    # Device d holds the contiguous rows [d, chunks, per_chunk]; the map runs one chunk per device
    # at a time: [chunks, shards, per_chunk, m, n], the shards axis sharded over the whole mesh.
    batch = batch.reshape(shards, chunks, per_chunk, m, n).swapaxes(0, 1)
    if chunks == 1:
      ortho = chunk_ns(batch[0], spread)
    else:
      ortho = jax.lax.map(functools.partial(chunk_ns, spread=spread), batch).swapaxes(0, 1)
    ortho = ortho.reshape(-1, m, n)
    if mesh is not None:
      for spec in reversed(path):                                      # and back
        ortho = constrain(ortho, spec)
    start = 0
    for name, size in zip(names, sizes):
      shape = leaves[name].shape
      piece = ortho[start:start + size].reshape(*shape[:-2], m, n)
      start += size
      piece = jnp.swapaxes(piece, -1, -2) if shape[-2] > shape[-1] else piece
      if mesh is not None:
        piece = constrain(piece, param_specs[name])
      out[name] = piece.astype(jnp.float32)
  return out


def orthogonalize_updates(logical_axes, *, ns_steps: int = 5, ns_coeffs: Coeffs = "classic",
                          ns_dtype=jnp.bfloat16,
                          ns_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, mesh: Mesh | None = None,
                          rules: Rules = DEFAULT_RULES) -> optax.GradientTransformation:
  """Replaces each [*stack, m, n] update by NS(update), float32, same shape; stateless.

  `logical_axes` (a tree of PartitionSpecs covering the params) gives, with `rules` and `mesh`, the
  sharding the orthogonalized updates are constrained back to (Parallel Muon when `mesh` is given).
  `ns_chunk_bytes` bounds Newton-Schulz's working set per device (see `orthogonalize`).
  """
  param_specs = None
  if mesh is not None:
    param_specs = {path_name(p): logical_to_spec(a, rules) for p, a in
                   jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_spec)[0]}

  def update_fn(updates, state, params=None):
    del params
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    names = [path_name(p) for p, _ in flat]
    ortho = orthogonalize(dict(zip(names, (x for _, x in flat))), param_specs, steps=ns_steps,
                          coeffs=ns_coeffs, dtype=ns_dtype, mesh=mesh, chunk_bytes=ns_chunk_bytes)
    return jax.tree_util.tree_unflatten(treedef, [ortho[n] for n in names]), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_muon(logical_axes, *, momentum: float = 0.95, ns_steps: int = 5,
                  ns_coeffs: Coeffs = "classic", ns_dtype=jnp.bfloat16,
                  ns_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, mesh: Mesh | None = None,
                  rules: Rules = DEFAULT_RULES) -> optax.GradientTransformation:
  """Nesterov momentum (no bias correction) then Newton-Schulz, for trees of [*stack, m, n] leaves.

  `optax.trace(momentum, nesterov=True)` with a float32 buffer (f = mu f + g; g' = g + mu f) chained
  before `orthogonalize_updates`, which takes the other arguments. The state is the trace's
  `(TraceState(trace), EmptyState())`.
  """
  return optax.chain(
      optax.trace(decay=momentum, nesterov=True, accumulator_dtype=jnp.float32),
      orthogonalize_updates(logical_axes, ns_steps=ns_steps, ns_coeffs=ns_coeffs, ns_dtype=ns_dtype,
                            ns_chunk_bytes=ns_chunk_bytes, mesh=mesh, rules=rules))


# Ours: optax 0.2.8's equivalent (scale_by_shape, consistent_rms) is private to optax.contrib._muon.
def scale_by_matrix_rms(rms: float = RMS_SCALE) -> optax.GradientTransformation:
  """Scales each [*stack, m, n] update by `rms * sqrt(max(m, n))` (update RMS like AdamW's)."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * (rms * math.sqrt(max(u.shape[-2:]))), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def matrix_muon(learning_rate: optax.ScalarOrSchedule, *, logical_axes, weight_decay: float = 0.1,
                momentum: float = 0.95, ns_steps: int = 5, ns_coeffs: Coeffs = "classic",
                ns_dtype=jnp.bfloat16, ns_chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
                mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> optax.GradientTransformation:
  """The full Muon update for Muon-routed leaves: `-lr * (0.2 sqrt(max(m,n)) NS(g') + wd * W)`."""
  return optax.chain(
      scale_by_muon(logical_axes, momentum=momentum, ns_steps=ns_steps, ns_coeffs=ns_coeffs,
                    ns_dtype=ns_dtype, ns_chunk_bytes=ns_chunk_bytes, mesh=mesh, rules=rules),
      scale_by_matrix_rms(),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
