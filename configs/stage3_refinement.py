"""Stage 3, pre-training refinement on the curated subset: higher resolution (336 px), 32 frames,
the LLM joins at a low learning rate."""

from configs.common import LLM, PROJECTOR, VISION, stage


def get_config(arg=None):
  return stage(
      "refinement",
      arg,
      frame_size=336,
      frames=32,
      seq_len=8192,
      batch=256,
      lr=5e-5,
      trainable=(PROJECTOR, VISION, LLM),
      lr_scales=((VISION, 0.1), (LLM, 0.4)),
      steps=10000,
  )
