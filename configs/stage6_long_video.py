"""Stage 6 (beyond the original): 1,024 frames at 448 px = 131,072 visual tokens per row
(135,168 with text), trained with USP over a 16-way context axis (all-to-all over heads inside pairs of
devices, a zigzag-balanced ring over the 8 pairs) and full rematerialisation. Per device 8,448 tokens
of each row, the same activation footprint as an 8k-token model; the LLM and projector train, the ViT is
frozen and encodes 1,024 frames per scan step. 135k positions are 16x the released 8,192: RoPE theta goes
from 500,000 to 10M (LWM's choice at 128k-256k) and max_position_embeddings to the row length.

Why USP 2 x 8: beyond 64k tokens per row USP is the fastest of ring / all-gather / USP in MaxText's v5p
measurements (256k: 9.34 s/step vs 10.78 for the ring); here (no TPU to time it) the compiler plans the
same memory for USP 2 x 8 as for the ring (73.2 GiB per chip on v5p-128), while Ulysses groups of 8 plan
101 GiB and do not fit (README's memory table). `--config.run.attention_impl=ring` restores
the plain ring."""

from configs.common import LLM, PROJECTOR, stage


def get_config(arg=None):
  return stage(
      "long_video",
      arg,
      frame_size=448,
      frames=1024,
      seq_len=135168,
      batch=16,
      lr=5e-6,
      trainable=(PROJECTOR, LLM),
      steps=1000,
      context=16,
      attention="usp",
      ulysses_degree=2,
      remat="full",
      rope_theta=1e7,
      vision_chunk_frames=1024,
  )
