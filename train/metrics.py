"""Training FLOPs from the model's shapes, MFU, and the metric writers (TensorBoard, console, progress bar).

FLOP counting (stated in the README):
  * every matmul kernel (params named `*kernel`, incl. the vision patch embedding and `lm_head`)
    costs 2 x its size per token passing through it; embedding lookups, norms, activations and the
    parameter-free patchify average are not counted;
  * tokens per module: LLM = non-padding tokens, projector = visual tokens, vision tower = patches
    (+ CLS) of the frames actually used (unused frame slots are padding, i.e. waste);
  * attention scores and values: 4 x len^2 x (heads x head_dim) per layer and segment; halved for the
    causal LLM (packed segments counted separately), full for the bidirectional vision tower;
  * training = forward x (1 + [a module upstream is trainable: activation grads] + [the module itself
    is trainable: weight grads]), so a trained module costs 3x forward (the usual 6N) and a frozen
    vision tower at the input costs 1x.
MFU = model FLOPs per second per device / the device's peak dense bf16 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np

from kangaroo_jax.config import KangarooConfig

# Peak dense bf16 FLOP/s per device (vendor figures; TPU per chip).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}
MODULES = ("vision_tower", "patchify", "mm_projector", "llm")  # input -> output order


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
  if override:
    return override
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None  # CPU and unknown kinds: no MFU (TFLOP/s is still reported)


@dataclasses.dataclass(frozen=True)
class FlopModel:
  """Per-token forward FLOPs of each module's matmuls, and the attention shapes."""

  kernel_flops: dict  # module -> 2 * sum of kernel sizes
  factors: dict  # module -> forward multiplier for training (1, 2 or 3)
  llm_layers: int
  llm_attn_width: int  # heads * head_dim
  vision_layers: int
  vision_width: int
  patches_per_frame: int  # incl. CLS
  visual_tokens_per_frame: float

  @classmethod
  def build(
      cls, cfg: KangarooConfig, param_shapes: dict[str, tuple], trainable: set[str], frame_size: int
  ) -> "FlopModel":
    kernel = {m: 0 for m in MODULES}
    for path, shape in param_shapes.items():
      if path.endswith("kernel") and len(shape) >= 2:
        kernel[path.split("/")[0]] += 2 * math.prod(shape)
    factors, upstream = {}, False
    for m in MODULES:
      own = any(p.split("/")[0] == m for p in trainable)
      factors[m] = 1 + int(upstream) + int(own)
      upstream = upstream or own
    gh, gw = cfg.vision.grid_for(frame_size, frame_size)
    per_group = cfg.projector.tokens_per_group(gh, gw)
    return cls(
        kernel_flops=kernel,
        factors=factors,
        llm_layers=cfg.llm.num_layers,
        llm_attn_width=cfg.llm.num_heads * cfg.llm.head_dim,
        vision_layers=cfg.vision.num_layers,
        vision_width=cfg.vision.width,
        patches_per_frame=gh * gw + 1,
        visual_tokens_per_frame=per_group / cfg.projector.frames_per_group,
    )

  def train_flops(self, tokens: float, segment_len_sq: float, frames: float) -> float:
    """Model FLOPs of one training step over `tokens` non-padding tokens, sum of squared segment
    lengths `segment_len_sq`, and `frames` used frames."""
    p = self.patches_per_frame
    vision = frames * (p * self.kernel_flops["vision_tower"] + self.vision_layers * 4 * p * p * self.vision_width)
    projector = frames * self.visual_tokens_per_frame * self.kernel_flops["mm_projector"]
    llm = tokens * self.kernel_flops["llm"] + self.llm_layers * 4 * self.llm_attn_width * segment_len_sq / 2
    f = self.factors
    return vision * f["vision_tower"] + projector * f["mm_projector"] + llm * f["llm"]


def batch_stats(host_batch: dict[str, np.ndarray]) -> tuple[float, float, float]:
  """(non-padding tokens, sum of squared segment lengths, used frames) of a host batch."""
  segs = host_batch["segment_ids"]
  tokens = float((segs > 0).sum())
  sq = 0.0
  for row in segs:
    counts = np.bincount(row[row > 0])
    sq += float((counts.astype(np.float64) ** 2).sum())
  return tokens, sq, float(host_batch["num_frames"].sum())


def data_totals(local: dict[str, float], shard: int) -> dict[str, float]:
  """The data iterator's counters (`data/seen`, `data/skipped/<reason>`) summed over the data shards.

  Every process must call this at the same step (an all-gather when there are several). Processes that
  read the same shard (context spanning hosts) count the same samples, so each shard is counted once.
  """
  keys = sorted(k for k in local if k != "data/skip_rate")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    mine = np.asarray([shard] + [local[k] for k in keys], np.int32)
    per_shard: dict[int, np.ndarray] = {}
    for row in np.asarray(multihost_utils.process_allgather(mine)):
      per_shard.setdefault(int(row[0]), row[1:])
    totals = dict(zip(keys, (float(v) for v in np.sum(list(per_shard.values()), axis=0))))
  else:
    totals = {k: float(local[k]) for k in keys}
  skipped = sum(v for k, v in totals.items() if k.startswith("data/skipped/"))
  totals["data/skipped_total"] = skipped
  totals["data/skip_rate"] = skipped / max(totals.get("data/seen", 0.0), 1.0)
  return totals


def describe_skips(totals: dict[str, float]) -> str:
  """ "3 of 40 samples skipped (bad_video 1, missing_video 1, too_long 1)" or "0 of 40 samples skipped"."""
  reasons = {k.rsplit("/", 1)[1]: int(v) for k, v in totals.items() if k.startswith("data/skipped/") and v}
  detail = f" ({', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))})" if reasons else ""
  return f"{int(totals['data/skipped_total'])} of {int(totals.get('data/seen', 0))} samples skipped{detail}"


class Writer:
  """TensorBoard event files in WORKDIR/tb and a console line, on process 0 only."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool):
    self.enabled = enabled
    self.tb = None
    self.bar = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.bar = tqdm(
        total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False, disable=None
    )  # None: no bar when stderr is not a terminal (logs stay clean)

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    for k, v in values.items():
      if v is not None:
        self.tb.add_scalar(k, float(v), step)

  def console(self, step: int, total: int, values: dict) -> None:
    if not self.enabled:
      return
    parts = [f"step {step}/{total}"]
    fmt = [
        ("loss", "loss {:.4f}"),
        ("lr", "lr {:.2e}"),
        ("grad_norm", "gnorm {:.3f}"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("frames_per_s", "{:,.1f} frames/s"),
        ("step_time_s", "{:.3f} s/step"),
        ("tflops_per_device", "{:.3f} TFLOP/s/dev"),
        ("mfu", "MFU {:.1%}"),
        ("skipped", "{:.0f} non-finite steps skipped"),
    ]
    for k, f in fmt:
      if values.get(k) is not None:
        parts.append(f.format(values[k]))
    if values.get("data"):  # only once something was dropped: a clean run keeps a short line
      parts.append(f"data: {values['data']}")
    line = " | ".join(parts)
    if self.bar is not None and not self.bar.disable:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def text(self, line: str) -> None:
    if self.enabled:
      (self.bar.write if self.bar is not None and not self.bar.disable else print)(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


class Timer:
  """Wall time between log points, excluding the first (compiling) step from the rate."""

  def __init__(self):
    self.t = time.perf_counter()

  def lap(self) -> float:
    now = time.perf_counter()
    dt, self.t = now - self.t, now
    return dt
