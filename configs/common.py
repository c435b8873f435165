"""Shared defaults and argument parsing for the experiment configs.

`arg` is "key=value,key=value" after the config path (`configs/stage2_video_pretrain.py:mode=cpu,prev=DIR`):
  mode=full   the Kangaroo-8B shapes of that stage (TPU/GPU pod)
  mode=cpu    the same stage on the `tiny` model with small frames and sequences (laptop / CI smoke run)
  prev=DIR    the previous stage's workdir: this stage starts from DIR/export
  steps=N     override total_steps
Anything else can be overridden per field: --config.optim.lr=1e-4, --config.run.attention_impl=ring.
`model` holds shapes (a preset and overrides of it: what the export stores); `run` holds how the model runs
(kangaroo_jax.run_options.RunOptions: dtypes, attention impl and kernel, remat, vision chunks).
"""

from __future__ import annotations

import ml_collections

from kangaroo_jax.run_options import RunOptions

_BOOL = {"true": True, "false": False, "1": True, "0": False}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """ "a=1,b=x" -> ConfigDict with the types of `defaults`; unknown keys are an error."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config arg {item!r}: expected key=value")
    k, v = item.split("=", 1)
    if k not in defaults:
      raise ValueError(f"config arg {k!r}: unknown; known: {sorted(defaults)}")
    d = defaults[k]
    out[k] = _BOOL[v.lower()] if isinstance(d, bool) else type(d)(v) if d is not None else v
  return ml_collections.ConfigDict(out)


def base(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10
  c.init_from = ""
  c.export = True
  c.peak_flops_per_device = 0.0
  c.sharding_rules = ()  # ((logical axis, mesh axes), ...) over kangaroo_jax/parallel/rules.py's table
  c.max_replicated_fraction = 0.02  # of parameter bytes replicated on every device before the check speaks
  c.sharding_check = "warn"  # "warn" | "error" | "off"
  c.model = ml_collections.ConfigDict(dict(preset="kangaroo-8b", overrides={}))
  c.run = ml_collections.ConfigDict(RunOptions().to_dict())  # every field present, so --config.run.X= works
  c.mesh = ml_collections.ConfigDict(
      dict(data=1, fsdp=-1, context=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1)
  )
  c.data = ml_collections.ConfigDict(
      dict(
          source="grain",
          batch_size=256,
          seq_len=4096,
          frame_size=224,
          max_frames=16,
          num_frames=16,
          dataset="",
          tokenizer="",
          worker_count=8,
          shuffle_seed=0,
          max_skip_rate=0.05,
          tfds_data_dir="",
          tfds_mapping="",
      )
  )
  c.optim = ml_collections.ConfigDict(
      dict(
          lr=1e-4,
          warmup_steps=100,
          min_lr_ratio=0.1,
          b1=0.9,
          b2=0.95,
          eps=1e-8,
          weight_decay=0.0,
          clip_norm=1.0,
          grad_accum=1,
          trainable=(".*",),
          frozen=(),
          lr_scales=(),
          max_nonfinite=5,
      )
  )
  c.ckpt = ml_collections.ConfigDict(dict(every=500, keep=3, keep_best=1, async_save=True))
  return c


# Module groups by parameter path (train/optim.py matches these with re.fullmatch).
VISION = r"vision_tower/.*"
PROJECTOR = r"mm_projector/.*|patchify/.*"
LLM = r"llm/.*"


def stage(
    name: str,
    arg: str | None,
    *,
    frame_size: int,
    frames: int,
    seq_len: int,
    batch: int,
    lr: float,
    trainable: tuple[str, ...],
    lr_scales: tuple = (),
    steps: int,
    context: int = 1,
    attention: str = "reference",
    remat: str = "full",
    rope_theta: float | None = None,
    vision_chunk_frames: int = 0,
    ulysses_degree: int = 0,
    fsdp: int = -1,
) -> ml_collections.ConfigDict:
  """One curriculum stage. `mode=cpu` keeps the stage's structure (trainable modules, frame/sequence
  ratios, LR) on the tiny model so the whole curriculum can be run end to end on a CPU.

  rope_theta: for stages far past the released context (8192 positions at theta 500,000), a larger
  RoPE base, with max_position_embeddings raised to the stage's sequence length (as LWM raised theta
  stage by stage: 1M at 32k, 10M at 128k-256k, 50M at 1M tokens). The export's config.json carries both.
  vision_chunk_frames: frames the vision tower encodes per scan step (RunOptions.vision_chunk_frames).
  ulysses_degree: USP's all-to-all group size (attention "usp"; 0 = automatic).
  context / fsdp: mesh axis sizes; one of them may be -1 (the rest of the slice)."""
  a = parse_arg(arg, mode="full", prev="", steps=0, data="", tokenizer="")
  c = base(name)
  c.total_steps = a.steps or steps
  c.optim.lr = lr
  c.optim.trainable = trainable
  c.optim.lr_scales = lr_scales
  c.optim.warmup_steps = max(1, c.total_steps // 20)
  if a.prev:
    c.init_from = f"{a.prev}/export"
  c.data.dataset = a.data
  c.data.tokenizer = a.tokenizer
  if a.mode == "full":
    c.run.update(
        compute_dtype="bfloat16",
        remat_policy=remat,
        attention_impl=attention,
        vision_chunk_frames=vision_chunk_frames,
        ulysses_degree=ulysses_degree,
    )
    if rope_theta is not None:
      c.model.overrides["llm"] = dict(rope_theta=rope_theta, max_position_embeddings=seq_len)
    c.mesh.update(context=context, fsdp=fsdp)
    c.data.update(frame_size=frame_size, max_frames=frames, num_frames=frames, seq_len=seq_len, batch_size=batch)
  elif a.mode == "cpu":
    c.model.preset = "tiny"
    # Frames shrink with the stage's resolution (28 px at 224, 56 px at 448); sequences keep their ratio.
    small = 28 if frame_size < 448 else 56
    c.run.attention_impl = ("usp" if attention == "usp" else "ring") if context != 1 else "reference"
    c.mesh.update(fsdp=-1, context=2 if context == -1 else min(context, 2))
    c.data.update(
        source="synthetic",
        frame_size=small,
        max_frames=min(frames, 8),
        num_frames=min(frames, 8),
        seq_len=128,
        batch_size=8,
        worker_count=0,
    )
    c.log_every = 1
    c.ckpt.every = max(1, c.total_steps)
  else:
    raise ValueError(f"mode={a.mode!r}: expected 'full' or 'cpu'")
  return c
