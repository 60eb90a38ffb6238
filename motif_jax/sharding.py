"""The device mesh, logical-axis rules and the checks that reject impossible layouts before compiling.

Parameters and main activations carry logical axis names (`embed`, `mlp`, `q_heads`, ...). A rule
table maps each name to a mesh axis (or several, or none). The mesh always has the three axes
`('data', 'fsdp', 'tensor')`; a size of -1 takes the devices the other axes leave.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (a name, a tuple of names, or None for replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("o_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("head_dim", None),
    ("polynorm", None),
    ("act_length", None),
    ("act_embed", None),
    ("act_groups", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """Replaces one -1 in a `(data, fsdp, tensor)` shape by what the device count leaves."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}.")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape={shape}: at most one axis may be -1 ('the rest').")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape={shape}: sizes must be positive or -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape={shape}: the fixed axes ({known} devices) do not divide the "
                       f"{num_devices} available devices; change mesh_shape.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  total = math.prod(shape)
  if total > num_devices:
    raise ValueError(f"mesh_shape={shape} needs {total} devices but only {num_devices} are available; "
                     "shrink mesh_shape or use -1 for one axis.")
  return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with axes ('data', 'fsdp', 'tensor') of Auto type."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  device_array = np.asarray(devices[: math.prod(shape)]).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> P:
  """PartitionSpec of a tensor whose dimensions carry `logical_axes`; a mesh axis is used at most once."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    if name is not None and name not in table:
      raise ValueError(f"Logical axis {name!r} has no sharding rule; add it to the rules "
                       f"(known: {sorted(table)}).")
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(logical_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for a pytree whose leaves are PartitionSpecs of logical names."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(spec, rules)), logical_tree,
                      is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None) -> jax.Array:
  """`with_sharding_constraint` by logical names, under the mesh set by `jax.set_mesh`; else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))


def mesh_axes(logical: str, rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to, e.g. ('data', 'fsdp') for 'batch'."""
  target = logical_to_spec((logical,), rules)[0]
  return (target,) if isinstance(target, str) else tuple(target or ())


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, seq] input array."""
  return NamedSharding(mesh, logical_to_spec(("batch", "act_length"), rules))


def validate_layout(cfg, mesh: Mesh, global_batch: int, rules: Rules = DEFAULT_RULES) -> None:
  """Raises ValueError naming the setting when `cfg` cannot be laid out on `mesh` with these rules."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

  def ways(logical):
    return math.prod(sizes[n] for n in mesh_axes(logical, rules))

  checks = (
      ("ModelConfig.num_kv_groups", cfg.num_kv_groups, "q_heads",
       "heads shard by KV group over the tensor axis"),
      ("ModelConfig.num_kv_groups", cfg.num_kv_groups, "kv_heads", "key/value heads shard by group"),
      ("ModelConfig.intermediate_size", cfg.intermediate_size, "mlp", "the MLP width shards"),
      ("ModelConfig.vocab_size", cfg.vocab_size, "vocab", "the vocabulary shards"),
      ("ModelConfig.hidden_size", cfg.hidden_size, "embed", "the hidden width shards"),
      ("global batch_size", global_batch, "batch", "batch rows shard over data x fsdp"),
  )
  for setting, value, logical, why in checks:
    n = ways(logical)
    if value % n:
      raise ValueError(
          f"{setting}={value} is not divisible by {n}, the mesh size of logical axis {logical!r} "
          f"(mesh {sizes}; {why}). Change {setting} or the mesh_shape / sharding rules.")
