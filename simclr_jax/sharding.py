"""Devices, meshes and processes: one `data` axis over every device of every process.

SimCLR is data-parallel: parameters and optimizer state are replicated, the batch is split along
the mesh axis `data`. The same code runs on one CPU, 8 fake CPU devices, a GPU node or a TPU pod
slice; only `initialize_distributed` knows about processes.
"""
import os
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

DATA_AXIS = "data"

# Environment variables that say "this process is one of several" on the schedulers JAX
# auto-detects (SLURM, Open MPI, Cloud TPU pod slices). A single process never needs
# `jax.distributed`.
_MULTI_PROCESS_ENV = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
}


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, force: bool = False) -> bool:
  """Calls `jax.distributed.initialize` when launched as several processes; True if it did.

  Explicit arguments (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) win;
  otherwise SLURM, Open MPI and multi-host TPU slices are detected from their environment and
  JAX fills in the rest; `force` initializes with JAX's own cluster detection (e.g. on a TPU VM
  whose environment does not name the other workers). Must run before anything touches a device.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  explicit = (coordinator_address, num_processes, process_id)
  detected = [name for name, is_multi in _MULTI_PROCESS_ENV.items()
              if os.environ.get(name) and is_multi(os.environ[name])]
  if all(value is None for value in explicit) and not detected and not force:
    return False
  if any(value is not None for value in explicit) and None in explicit and not (detected or force):
    raise ValueError(
        "multi-process launch needs all of coordinator_address, num_processes and process_id "
        f"(got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
        f"process_id={process_id!r}) unless a SLURM/MPI/TPU environment supplies them")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def create_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.NamedSharding(mesh, jax.P())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.NamedSharding(mesh, jax.P(DATA_AXIS))


def to_host(tree: Any) -> Any:
  """Fully replicated or process-spanning arrays as NumPy on every process."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)



def shard_step(step_on_shard: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """jit(shard_map(step_on_shard)): (state, global batch) -> (state, metrics); state donated.

  `step_on_shard(state, images, indices, labels)` sees one device's share of the batch and the
  replicated state, and returns the new state and replicated metrics; its collectives use
  DATA_AXIS. No pmean of gradients is needed: for replicated parameters, shard_map's autodiff
  already sums their gradient over devices.
  """
  batch_spec, replicated_spec = jax.P(DATA_AXIS), jax.P()
  sharded = jax.shard_map(step_on_shard, mesh=mesh,
                          in_specs=(replicated_spec, batch_spec, batch_spec, batch_spec),
                          out_specs=(replicated_spec, replicated_spec))

  def step(state, batch):
    return sharded(state, batch["image"], batch["index"], batch["label"])

  return jax.jit(step, donate_argnums=0)


def vary_over_data(tree: Any) -> Any:
  """Every leaf of a replicated tree cast to vary over DATA_AXIS (inside `shard_map`).

  shard_map's autodiff sums a replicated parameter's gradient over the devices where the
  parameter first meets per-device values. With a bfloat16 compute dtype that is after the
  model's cast of the float32 kernel, so the sum would run in bfloat16; casting the float32
  parameters first keeps every gradient sum in float32, as the official code's.
  """
  return jax.tree.map(lambda x: jax.lax.pcast(x, DATA_AXIS, to="varying"), tree)
