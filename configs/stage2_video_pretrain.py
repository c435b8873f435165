"""Stage 2, video pre-training: short clips (16 frames, 224 px); projector and vision tower train,
the ViT at a tenth of the learning rate, the LLM stays frozen."""

from configs.common import PROJECTOR, VISION, stage


def get_config(arg=None):
  return stage(
      "video_pretrain",
      arg,
      frame_size=224,
      frames=16,
      seq_len=4096,
      batch=512,
      lr=2e-4,
      trainable=(PROJECTOR, VISION),
      lr_scales=((VISION, 0.1),),
      steps=20000,
  )
