"""Stage 4, instruction tuning at 448 px with up to 64 frames (~8.7k tokens); everything trains,
the ViT at a tenth of the learning rate."""

from configs.common import LLM, PROJECTOR, VISION, stage


def get_config(arg=None):
  return stage(
      "instruction",
      arg,
      frame_size=448,
      frames=64,
      seq_len=10240,
      batch=128,
      lr=2e-5,
      trainable=(PROJECTOR, VISION, LLM),
      lr_scales=((VISION, 0.1),),
      steps=8000,
  )
