"""Data parallelism: devices, `jax.pmap`, replication, batch sharding, multi-host start-up.

Every device-parallel detail lives here, so moving to `jax.shard_map` changes this module only.
The global batch's lanes (rows) are split into contiguous blocks: process p holds rows
[p * b / P, (p + 1) * b / P), and its local device d the d-th block of those. Per-device
arrays carry a leading device axis: <n_local, b_local, ...>.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxrnn import UserError

AXIS = "batch"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts a multi-process run with `jax.distributed` (call before any other JAX work).

  With no arguments, JAX reads the cluster from the environment (TPU VMs, SLURM, ...).
  CPU processes exchange collectives through gloo.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


@dataclasses.dataclass(frozen=True)
class Devices:
  """The local devices this process runs on, and its place among the processes."""
  local: tuple[Any, ...]
  process_index: int
  process_count: int

  @property
  def count(self) -> int:
    """Devices across all processes."""
    return len(self.local) * self.process_count

  @property
  def single(self) -> bool:
    """One device in all: `pmap` is a plain `jax.jit`."""
    return self.count == 1

  @property
  def is_main(self) -> bool:
    """The process that writes logs."""
    return self.process_index == 0


def devices(count: int = 0) -> Devices:
  """The first `count` local devices (0: all of them)."""
  local = jax.local_devices()
  if count < 0 or count > len(local):
    raise UserError(f"train.devices is {count} but this process has {len(local)} devices "
                    f"({local[0].platform}); use 0 for all of them")
  return Devices(tuple(local[:count or len(local)]), jax.process_index(), jax.process_count())


def check_divisible(size: int, devs: Devices, field: str) -> None:
  """Refuses (before any compilation) a global size the device count does not divide."""
  if size % devs.count:
    below = size - size % devs.count
    sizes = " or ".join(str(s) for s in (below, below + devs.count) if s > 0)
    raise UserError(f"{field}={size} does not split evenly over {devs.count} devices; "
                    f"use {sizes}")


def process_rows(tree: Any, devs: Devices) -> Any:
  """This process' block of the rows of every leaf <b, ...> of a global batch."""
  def rows(x):
    share = x.shape[0] // devs.process_count
    return x[devs.process_index * share:(devs.process_index + 1) * share]
  return jax.tree.map(rows, tree)


def shard(tree: Any, devs: Devices) -> Any:
  """<b_process, ...> arrays -> <n_local, b_local, ...> on this process' devices."""
  n = len(devs.local)
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devs.local), (AXIS,)), jax.P(AXIS))
  return jax.tree.map(lambda x: jax.device_put(np.reshape(x, (n, -1) + x.shape[1:]), sharding),
                      tree)


def _local_blocks(x: jax.Array) -> list[jax.Array]:
  """This process' per-device blocks of a pmap output, in device order, with no communication.

  (Indexing the global array would be a computation every process must join.)
  """
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return [s.data for s in shards]


def unshard(tree: Any) -> Any:
  """<n_local, b_local, ...> -> <b_process, ...> NumPy arrays."""
  return jax.tree.map(
      lambda x: np.concatenate([np.asarray(b) for b in _local_blocks(x)]).reshape((-1,) + x.shape[2:]),
      tree)


def replicate(tree: Any, devs: Devices) -> Any:
  """One copy of every leaf on each local device: <n_local, ...>."""
  n = len(devs.local)
  sharding = jax.NamedSharding(jax.sharding.Mesh(np.array(devs.local), (AXIS,)), jax.P(AXIS))
  return jax.tree.map(lambda x: jax.device_put(jnp.stack([x] * n), sharding), tree)


def unreplicate(tree: Any) -> Any:
  """This process' first device's copy of a replicated tree (or of per-device metrics)."""
  return jax.tree.map(lambda x: _local_blocks(x)[0][0], tree)


def all_rows(tree: Any, devs: Devices) -> Any:
  """<b_process, ...> NumPy leaves -> the global <b, ...>, gathered from every process."""
  if devs.process_count == 1:
    return tree
  return jax.tree.map(
      lambda x: np.asarray(multihost_utils.process_allgather(x)).reshape((-1,) + x.shape[1:]),
      tree)


def pmap(fn: Callable[..., Any], devs: Devices, **kwargs: Any) -> Callable[..., Any]:
  """`jax.pmap` over this process' devices, with collectives over the axis named AXIS; on one
  device in all (`devs.single`), `jax.jit` of `fn` on the one block, with the same leading
  device axis in and out. There `fn` must not need the axis: a step over one device has no
  one to average with (`train.train_step(..., across_devices=not devs.single)`).

  A pmap of one device costs about 7% of a CPU training step (88.3 against 82.0 ms, issue 24)
  in its per-call sharding and dispatch; the jitted step computes the same numbers.
  """
  if devs.single:
    def one_block(*args):
      out = fn(*jax.tree.map(lambda x: x[0], args))
      return jax.tree.map(lambda x: jnp.asarray(x)[None], out)
    return jax.jit(one_block, **kwargs)
  return jax.pmap(fn, axis_name=AXIS, devices=devs.local if devs.process_count == 1 else None,
                  **kwargs)


def row_offset(rows: int) -> jax.Array:
  """Inside `pmap`: the global index of this device's first row, for device-invariant keys."""
  return jax.lax.axis_index(AXIS) * rows


def mean(x: Any) -> Any:
  """Inside `pmap`: the average over all devices."""
  return jax.lax.pmean(x, AXIS)
