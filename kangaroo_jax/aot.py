"""Ahead-of-time compilation for TPU slices on any host: slice names -> devices, memory and HLO facts.

With `libtpu` installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes a TPU
slice on a CPU machine and `jit(f).lower(ShapeDtypeStructs on a mesh of those devices).compile()`
runs the real TPU compiler, Mosaic kernels included. What it reports is the compiler's *plan*
(`memory_analysis()` per chip), a good fit / no-fit signal, not a measured peak.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # Cloud TPU generation as slice names spell it
  topology_prefix: str  # as `get_topology_desc` spells it
  cores_per_chip: int  # what one unit of the slice name counts (TensorCores on v4 / v5p)
  hbm_gib: float
  peak_bf16_tflops: float
  dims: int


CHIPS = {
    c.name: c
    for c in (
        Chip("v4", "v4", 2, 32, 275, 3),
        Chip("v5p", "v5", 2, 95, 459, 3),
        Chip("v5e", "v5e", 1, 16, 197, 2),
        Chip("v6e", "v6e", 1, 32, 918, 2),
    )
}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRID_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}


class TopologyError(ValueError):
  """A slice name this module cannot map to a TPU topology."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # "v5p-128"
  chip: Chip
  chips: int
  topology: str  # "v5:4x4x4"

  @property
  def hbm_bytes(self) -> int:
    return int(self.chip.hbm_gib * 2**30)


def parse_slice(name: str) -> Slice:
  """Cloud TPU slice name ("v5p-128", "v6e-8", "v4-32", "v5e-16") -> chips and topology string.

  v4 and v5p names count TensorCores (two per chip): v5p-128 is 64 chips.
  """
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise TopologyError(
        f"unknown TPU slice {name!r}; expected e.g. v5p-128, v6e-8, v5e-16, v4-32 " f"(generations: {sorted(CHIPS)})"
    )
  chip = CHIPS[m.group(1)]
  units = int(m.group(2))
  if units % chip.cores_per_chip:
    raise TopologyError(f"{name}: {chip.name} slice sizes count {chip.cores_per_chip} cores per chip")
  chips = units // chip.cores_per_chip
  grids = _GRID_3D if chip.dims == 3 else _GRID_2D
  if chips not in grids:
    raise TopologyError(
        f"{name}: {chips} chips is not a {chip.name} slice this tool knows; known chip counts: " f"{sorted(grids)}"
    )
  return Slice(name, chip, chips, f"{chip.topology_prefix}:{grids[chips]}")


def tpu_devices(slice_: Slice) -> list:
  """The slice's TPU device descriptions (needs libtpu; no TPU is needed)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  try:
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology)
  except Exception as e:  # noqa: BLE001 - the libtpu errors are many and opaque
    hint = (
        "another process has libtpu loaded; set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it"
        if "lockfile" in str(e)
        else "is libtpu installed? pip install -e '.[tpu]'"
    )
    raise TopologyError(
        f"cannot describe TPU topology {slice_.topology} ({slice_.name}): " f"{str(e).splitlines()[0]}; {hint}"
    ) from None
  return list(topo.devices)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-chip bytes of one compiled program, as the compiler planned them."""

  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @property
  def total(self) -> int:
    # Donated outputs reuse their argument buffers (alias), so they are counted once.
    return self.argument + self.output - self.alias + self.temp + self.code

  @classmethod
  def of(cls, compiled) -> "MemoryPlan":
    m = compiled.memory_analysis()
    return cls(
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.temp_size_in_bytes),
        int(m.generated_code_size_in_bytes),
    )


def attention_kernels_in(hlo_text: str) -> list[str]:
  """Fused attention kernels named in optimized HLO (Mosaic custom calls), e.g. ["splash_mha_fwd_residuals"]."""
  names = sorted(set(re.findall(r"splash_m[hq]a_[a-z_]+", hlo_text)))
  if not names and "tpu_custom_call" in hlo_text:
    names = ["tpu_custom_call"]
  return names


# The einsums of the XLA attention paths (kangaroo_jax/attention), as they appear in HLO op names.
ATTENTION_EINSUMS = (
    "bkgd,btkd->bkgt",
    "bkgt,btkd->bkgd",
    "bqkgd,btkd->bkgqt",
    "bkgqt,btkd->bqkgd",
    "bkgqd,btkd->bkgqt",
    "bkgqt,btkd->bkgqd",
    "bkgqt,bkgqd->btkd",
)


def highest_precision_f32_dots(hlo_text: str, attention_only: bool = True) -> list[str]:
  """HLO lines of float32 dots/convolutions requested at HIGHEST precision (by default: in attention only).

  Small f32 HIGHEST matmuls elsewhere are deliberate (e.g. resampling position embeddings); in
  attention they would multiply the cost of the largest matmuls at long context.
  """
  out = []
  for line in hlo_text.splitlines():
    result_type = line.split("=", 1)[-1].split("(")[0]
    if not ((" dot(" in line or " convolution(" in line) and "f32[" in result_type and "highest" in line.lower()):
      continue
    if attention_only and not any(spec in line for spec in ATTENTION_EINSUMS):
      continue
    out.append(line.strip())
  return out


def gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"
