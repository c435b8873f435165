"""Stage 7 (beyond LongVILA's 2M-token runs per 256 GPUs, on one TPU slice): 8,192 frames at 448 px =
1,048,576 visual tokens per row (1,052,672 with text), one row per step, the row split over every chip of
the slice (context = all chips, fsdp 1; parameters and optimiser state are sharded over context too).

Attention is USP: Ulysses all-to-all over the 8 KV heads inside groups of 8 chips, zigzag ring attention
over the groups (on 64 chips: 8 x 8, 16,448 tokens per chip). Full rematerialisation; the ViT is frozen
and encodes 1,024 frames per scan step (16 per chip on 64 chips). RoPE theta 50M with
max_position_embeddings = the row length, LWM's choice at 1M tokens.

Smallest slices the compiler plans it on: README's memory table (python -m train.compile --config
configs/stage7_million.py --topology v5p-128)."""

from configs.common import LLM, PROJECTOR, stage

FRAMES = 8192
VISUAL_TOKENS = FRAMES // 2 * 256  # 2-frame groups of 16x16 tokens at 448 px
SEQ_LEN = VISUAL_TOKENS + 4096


def get_config(arg=None):
  return stage(
      "million",
      arg,
      frame_size=448,
      frames=FRAMES,
      seq_len=SEQ_LEN,
      batch=1,
      lr=2e-6,
      trainable=(PROJECTOR, LLM),
      steps=200,
      context=-1,
      fsdp=1,
      attention="usp",
      ulysses_degree=8,
      remat="full",
      rope_theta=5e7,
      vision_chunk_frames=1024,
  )
