"""Stage 1, image pre-training: align the projector to the frozen EVA02 + Llama-3 on image-text pairs.

Images are 1-frame videos (padded to 2) at low resolution; only the projector trains, so the
optimizer state is that of ~21M parameters. (Per-stage recipe of the paper is not released: docs/model.md section 3.)
"""

from configs.common import PROJECTOR, stage


def get_config(arg=None):
  return stage(
      "image_pretrain",
      arg,
      frame_size=224,
      frames=2,
      seq_len=1024,
      batch=1024,
      lr=1e-3,
      trainable=(PROJECTOR,),
      steps=20000,
  )
