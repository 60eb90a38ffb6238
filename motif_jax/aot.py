"""Ahead-of-time check: compile the training step for a TPU slice from any host, print its memory.

    python -m motif_jax.aot --gin_file=gin_configs/experiments/motif_2_12_7b.gin --topology=v5p-64

The experiment's gin file gives the model, batch, mesh and optimizer exactly as `motif_jax.train` would
use them; `--topology` names the slice (an accelerator type such as v5p-64, v5litepod-16, v6e-256,
v4-32, or a chip grid such as v5p:2x4x4). With libtpu installed (`pip install -e '.[tpu]'`), jax
describes that slice's chips without owning any, and XLA:TPU compiles the real step for them: the
layout, sharding and memory errors a pod would hit show up here first. Without libtpu it says so
and, unless --cpu_fallback=false, compiles the same step for a simulated mesh of as many CPU devices
instead: a labelled stand-in whose memory figures come from XLA:CPU, not from a TPU.
"""

from __future__ import annotations

import inspect
import math
import re

import gin
import jax
from absl import app, flags

from motif_jax import train as train_cli  # the --gin_file / --gin_param flags, defined once
from motif_jax import step_plan, trainer

TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-64, v6e-256, v5p:2x4x4, ...")
CPU_FALLBACK = flags.DEFINE_bool(
    "cpu_fallback", True, "Without libtpu, compile for as many simulated CPU devices instead.")

# generation in the accelerator type -> (jax's name for it, units the type's number counts per chip
# (TensorCores on v4 and v5p), HBM per chip in GiB from the datasheets); then the chip grid used for
# each chip count.
_GENERATIONS = {
    "v4": ("v4", 2, 32), "v5p": ("v5p", 2, 95), "v5litepod": ("v5e", 1, 16), "v5e": ("v5e", 1, 16),
    "v6e": ("v6e", 1, 32),
}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}


def parse_topology(topology: str) -> tuple[str, int, float]:
  """(jax topology name such as 'v5p:2x4x4', chip count, HBM GiB per chip) for --topology."""
  grid = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", topology)
  typed = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", topology)
  if grid:
    hbm = _GENERATIONS[grid.group(1)][2]
    return topology, math.prod(int(d) for d in grid.group(2).split("x")), hbm
  if typed:
    name, per_chip, hbm = _GENERATIONS[typed.group(1)]
    chips = int(typed.group(2)) // per_chip
    grids = _GRID_2D if name in ("v5e", "v6e") else _GRID_3D
    if chips in grids:
      return f"{name}:{grids[chips]}", chips, hbm
  raise ValueError(f"--topology={topology!r} is not a TPU slice this tool knows; use an "
                   "accelerator type (v5p-64, v5litepod-16, v6e-256, v4-32) or a chip grid "
                   "(v5p:2x4x4, v6e:16x16).")


def tpu_devices(jax_topology: str):
  """Compile-only devices of the slice, or raise RuntimeError saying why jax cannot describe it."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    return topologies.get_topology_desc(jax_topology, platform="tpu").devices
  except Exception as error:  # pylint: disable=broad-except  (libtpu missing, or refuses the grid)
    raise RuntimeError(f"{type(error).__name__}: {error}") from error


def train_settings() -> dict:
  """The keyword arguments gin passes to `trainer.train`: its bindings over its defaults."""
  bound = gin.get_bindings(trainer.train)
  settings = {name: bound.get(name, p.default)
              for name, p in inspect.signature(trainer.train).parameters.items()
              if p.kind is p.KEYWORD_ONLY}
  missing = [name for name, value in settings.items() if value is gin.REQUIRED]
  if missing:
    raise ValueError(f"The gin files bind no value for {', '.join('train.' + m for m in missing)}; "
                     "pass the experiment's gin file.")
  return settings


def compile_step(settings: dict, devices):
  """Compiles the training step over `devices`; returns (its StepPlan, the compiled executable)."""
  wanted = inspect.signature(step_plan.plan_step).parameters
  plan = step_plan.plan_step(devices=devices,
                             **{k: v for k, v in settings.items() if k in wanted})
  with jax.set_mesh(plan.mesh):
    lowered = plan.step_fn.lower(plan.abstract_state(),
                                 plan.abstract_batch(settings["batch_size"], settings["seq_len"]))
    return plan, lowered.compile()


def memory_report(compiled, hbm_gib: float | None) -> str:
  """Per-device memory of a compiled step, in GiB, with the verdict against `hbm_gib`."""
  stats = compiled.memory_analysis()
  gib = 2.0**30
  arguments, outputs = stats.argument_size_in_bytes / gib, stats.output_size_in_bytes / gib
  temporaries, aliased = stats.temp_size_in_bytes / gib, stats.alias_size_in_bytes / gib
  peak = arguments + outputs + temporaries - aliased
  lines = [f"  arguments (train state + batch) {arguments:9.3f} GiB",
           f"  outputs                         {outputs:9.3f} GiB",
           f"  temporaries                     {temporaries:9.3f} GiB",
           f"  donated (arguments reused)      {-aliased:9.3f} GiB",
           f"  peak estimate                   {peak:9.3f} GiB"]
  if hbm_gib:
    verdict = "fits" if peak <= hbm_gib else "does NOT fit"
    lines.append(f"  HBM per chip                    {hbm_gib:9.3f} GiB -> {verdict}")
  return "\n".join(lines)


def main(argv):
  del argv
  if not TOPOLOGY.value:
    raise app.UsageError("--topology is required, e.g. --topology=v5p-64.")
  jax_topology, chips, hbm = parse_topology(TOPOLOGY.value)
  gin.add_config_file_search_path(train_cli.GIN_SEARCH_PATH)
  gin.parse_config_files_and_bindings(train_cli.GIN_FILES.value, train_cli.GIN_PARAMS.value)
  settings = train_settings()
  try:
    devices = tpu_devices(jax_topology)
  except RuntimeError as error:
    print(f"Cannot compile for TPU {jax_topology} on this host: {error}\n"
          "Install libtpu (pip install -e '.[tpu]', or the libtpu version the installed jax "
          "names) to compile for the real chips.", flush=True)
    if not CPU_FALLBACK.value:
      raise SystemExit(1) from error
    jax.config.update("jax_num_cpu_devices", chips)  # before the CPU backend starts
    devices = jax.devices("cpu")
    print(f"CPU STAND-IN: compiling the same step for {chips} simulated CPU devices; memory below "
          "is XLA:CPU's, not TPU HBM.", flush=True)
    hbm = None
  try:
    plan, compiled = compile_step(settings, devices)
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise SystemExit(f"The training step does NOT fit on {TOPOLOGY.value}: {error}\nRaise "
                     "train.micro_batches, lower train.batch_size, shard more (train.mesh_shape) "
                     "or take a larger slice.") from error
  print(f"Compiled the training step of {settings['model']} for {len(devices)} "
        f"{devices[0].device_kind} devices, mesh {dict(plan.mesh.shape)}, global batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens.")
  print("Per-device memory:\n" + memory_report(compiled, hbm), flush=True)


if __name__ == "__main__":
  app.run(main)
