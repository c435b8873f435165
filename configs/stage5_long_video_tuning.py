"""Stage 5, long-video tuning: 160 frames at 448 px = 20,480 visual tokens, rows of 22,528 tokens
(the original's maximum). Context parallelism over 4 devices with the all-gather kernel; the vision
tower is frozen here (its memory goes to the long sequence)."""

from configs.common import LLM, PROJECTOR, stage


def get_config(arg=None):
  return stage(
      "long_video_tuning",
      arg,
      frame_size=448,
      frames=160,
      seq_len=22528,
      batch=64,
      lr=1e-5,
      trainable=(PROJECTOR, LLM),
      steps=2000,
      context=4,
      attention="all_gather",
  )
