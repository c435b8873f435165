"""Per-host numpy batches -> global jax.Arrays on the mesh (contract section 3).

Batch rows are sharded over `activation_batch` (data x fsdp by default) and the sequence over
`activation_length` (context), as the rules table in force says. When `context` spans hosts, hosts that
hold the same rows read the same data shard (`data_shard_for_process`) and each keeps only its slice of
the sequence.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kangaroo_jax.parallel.rules import logical_to_spec, mesh_axes_for

# Logical axis names per batch key (dims beyond the listed ones are unsharded).
BATCH_AXES = {
    "input_ids": ("activation_batch", "activation_length"),
    "targets": ("activation_batch", "activation_length"),
    "loss_mask": ("activation_batch", "activation_length"),
    "positions": ("activation_batch", "activation_length"),
    "segment_ids": ("activation_batch", "activation_length"),
    "frames": ("activation_batch", None, None, None, None),
    "timestamps": ("activation_batch", None),
    "num_frames": ("activation_batch",),
}


def _sharding(mesh: Mesh, key: str, global_shape) -> NamedSharding:
  names = BATCH_AXES.get(key, ("activation_batch",) + (None,) * (len(global_shape) - 1))
  return NamedSharding(mesh, logical_to_spec(names, dict(mesh.shape), global_shape))


def _local_block(sharding: NamedSharding, global_shape, process_index: int | None = None):
  """The contiguous block (tuple of slices) of the global array whose shards live on this process."""
  if process_index is None:
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
  else:
    index_map = {
        d: i for d, i in sharding.devices_indices_map(tuple(global_shape)).items() if d.process_index == process_index
    }
  block = []
  for dim, size in enumerate(global_shape):
    starts = [idx[dim].start or 0 for idx in index_map.values()]
    stops = [size if idx[dim].stop is None else idx[dim].stop for idx in index_map.values()]
    block.append(slice(min(starts), max(stops)))
  covered = np.prod([s.stop - s.start for s in block])
  unique = {
      tuple((i[d].start or 0, global_shape[d] if i[d].stop is None else i[d].stop) for d in range(len(global_shape)))
      for i in index_map.values()
  }
  held = sum(np.prod([b - a for a, b in u]) for u in unique)
  if covered != held:
    raise ValueError(
        f"this process's devices do not hold one contiguous block of the batch ({block}); "
        "order the mesh so each host's devices are adjacent along data/fsdp and context"
    )
  return tuple(block)


def data_shard_for_process(mesh: Mesh, global_batch_size: int, process_index: int | None = None) -> tuple[int, int]:
  """(shard_index, shard_count) of the batch rows this process holds, for `make_train_iterator`."""
  shape = (global_batch_size, 1)
  s = NamedSharding(mesh, logical_to_spec(("activation_batch", None), dict(mesh.shape), shape))
  rows = _local_block(s, shape, process_index)[0]
  n = rows.stop - rows.start
  return rows.start // n, global_batch_size // n


def make_global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """host_batch: per-host arrays with B_host rows and the full sequence -> global jax.Arrays.

  The global batch has B_host * (number of distinct row groups over processes) rows; along the sequence
  each process passes only the slice its devices hold.
  """
  out = {}
  for key, x in host_batch.items():
    x = np.asarray(x)
    global_shape = (x.shape[0] * _row_factor(mesh),) + x.shape[1:]
    sharding = _sharding(mesh, key, global_shape)
    block = _local_block(sharding, global_shape)
    if block[0].stop - block[0].start != x.shape[0]:
      raise ValueError(f"{key}: this host holds rows {block[0]} of the global batch but passed {x.shape[0]} rows")
    out[key] = jax.make_array_from_process_local_data(sharding, x[(slice(None),) + block[1:]], global_shape)
  return out


def _row_factor(mesh: Mesh) -> int:
  """Into how many per-process row groups the mesh's batch axes (the rules' `activation_batch`: data x fsdp by
  default) split the global batch."""
  devices = np.asarray(mesh.devices)
  axes = [a for a in mesh_axes_for("activation_batch") if a in mesh.shape]
  total = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  names = list(mesh.axis_names)
  moved = np.moveaxis(devices, [names.index(a) for a in axes], list(range(len(axes)))).reshape(total, -1)
  me = jax.process_index()
  mine = [i for i in range(total) if any(d.process_index == me for d in moved[i])]
  return total // len(mine)
