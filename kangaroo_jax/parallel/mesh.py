"""Device meshes (`data, fsdp, context, tensor`), sharded initialisation and mesh/shape validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from kangaroo_jax.parallel.rules import MESH_AXES


class MeshError(ValueError):
  """A mesh that cannot be built on these devices, or that cannot split the model's shapes."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Parallelism per axis inside a slice (ICI) and across slices (DCN). One ICI axis may be -1 (fill)."""

  data: int = 1
  fsdp: int = -1
  context: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_context: int = 1
  dcn_tensor: int = 1

  def ici(self) -> tuple[int, ...]:
    return tuple(getattr(self, a) for a in MESH_AXES)

  def dcn(self) -> tuple[int, ...]:
    return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici, dcn) shapes with the -1 filled in; raises MeshError naming the axis when they do not fit."""
  ici, dcn = list(cfg.ici()), list(cfg.dcn())
  for name, v in zip(MESH_AXES, dcn):
    if v < 1:
      raise MeshError(f"MeshConfig.dcn_{name}={v}: DCN parallelism must be >= 1")
  slices = math.prod(dcn)
  if num_devices % slices:
    raise MeshError(f"{num_devices} devices cannot be split into {slices} slices (dcn_* product)")
  per_slice = num_devices // slices
  fill = [i for i, v in enumerate(ici) if v == -1]
  if len(fill) > 1:
    raise MeshError(f"only one mesh axis may be -1, got {[MESH_AXES[i] for i in fill]}")
  for name, v in zip(MESH_AXES, ici):
    if v == 0 or v < -1:
      raise MeshError(f"MeshConfig.{name}={v}: expected a positive size or -1")
  known = math.prod(v for v in ici if v != -1)
  if fill:
    if per_slice % known:
      raise MeshError(
          f"{per_slice} devices per slice are not divisible by the fixed axes "
          f"({dict((n, v) for n, v in zip(MESH_AXES, ici) if v != -1)})"
      )
    ici[fill[0]] = per_slice // known
  if math.prod(ici) != per_slice:
    raise MeshError(
        f"mesh {dict(zip(MESH_AXES, ici))} needs {math.prod(ici)} devices per slice, " f"but {per_slice} are available"
    )
  return tuple(ici), tuple(dcn)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh with Auto axis types (GSPMD propagates shardings between our constraints)."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = resolve_shape(cfg, len(devices))
  shape = tuple(i * d for i, d in zip(ici, dcn))
  if math.prod(dcn) > 1:
    if all(hasattr(d, "slice_index") for d in devices):
      grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    elif jax.process_count() > 1:
      grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, process_is_granule=True)
    else:
      grid = _blocks_as_slices(devices, ici, dcn)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
      grid = np.asarray(devices).reshape(shape)  # CPU / unknown topologies: plain order
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _blocks_as_slices(devices, ici, dcn) -> np.ndarray:
  """Single process without slice information (CPU tests): consecutive device blocks act as slices,
  with each mesh axis laid out slice-major (the DCN part outermost), as on a real multi-slice pod."""
  n = len(ici)
  grid = np.asarray(devices, dtype=object).reshape(tuple(dcn) + tuple(ici))
  grid = grid.transpose([a for i in range(n) for a in (i, n + i)])
  return grid.reshape(tuple(i * d for i, d in zip(ici, dcn)))
