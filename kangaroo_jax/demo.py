"""`make demo`: the main job on its embedded default.

The full demo (synthetic video-QA data -> train the tiny model on CPU -> evaluate -> chat) lands
with the training issue. Until then this runs one forward pass of the tiny model on a generated
video so that a fresh install is checked end to end, and says plainly what is not there yet.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kangaroo_jax.config import preset
from kangaroo_jax.models import Kangaroo


def main() -> None:
  print("make demo: training demo not yet available (it lands with the train/ issue); "
        "running a tiny-model forward pass instead.")
  cfg = preset("tiny")
  model = Kangaroo(cfg, rngs=nnx.Rngs(0))
  frames, size = 8, cfg.vision.image_size
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(1, frames, size, size, 3)).astype(np.float32))
  timestamps = jnp.arange(frames, dtype=jnp.float32)[None] * 0.5
  num_visual = model.num_visual_tokens(frames, size, size)
  prompt = rng.integers(3, cfg.llm.vocab_size, size=12)
  input_ids = jnp.asarray(np.concatenate([[cfg.llm.bos_token_id], np.full(num_visual, cfg.visual_token_id),
                                          prompt])[None])
  start = time.perf_counter()
  logits = jax.block_until_ready(model(input_ids, video, timestamps))
  print(f"tiny Kangaroo: {frames} frames of {size}x{size} -> {num_visual} visual tokens, "
        f"sequence {input_ids.shape[1]}, logits {tuple(logits.shape)}, finite={bool(jnp.isfinite(logits).all())}, "
        f"{time.perf_counter() - start:.2f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
