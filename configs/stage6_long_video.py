"""Stage 6 (beyond the original): 1,024 frames at 448 px = 131,072 visual tokens per row
(135,168 with text), trained with zigzag-balanced ring attention over a 16-way context axis and
full rematerialisation. Per device the ring holds 8,448 tokens of each row, the same activation
footprint as an 8k-token model; the LLM and projector train, the ViT is frozen and encodes 1,024 frames
per scan step. 135k positions are 16x the released 8,192: RoPE theta goes from 500,000 to 10M (LWM's
choice at 128k-256k) and max_position_embeddings to the row length."""

from configs.common import LLM, PROJECTOR, stage


def get_config(arg=None):
  return stage("long_video", arg, frame_size=448, frames=1024, seq_len=135168, batch=16, lr=5e-6,
               trainable=(PROJECTOR, LLM), steps=1000, context=16, attention="ring", remat="full", rope_theta=1e7,
               vision_chunk_frames=1024)
