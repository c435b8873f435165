"""chat(): multi-turn KV-cache reuse, images, errors, streaming, and the chat CLI (tiny model, CPU)."""

import dataclasses
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import kangaroo_jax
from kangaroo_jax.data.prompt import encode_conversation
from kangaroo_jax.data.tiny_tokenizer import build_chat_sentencepiece
from kangaroo_jax.data.video import VideoError
from kangaroo_jax.inference.chat import Chat
from kangaroo_jax.inference.loading import load_for_inference
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.pretrained import from_pretrained, save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [
    "What happens in the video? The kangaroo jumps over the fence.",
    "Question: what colour is the car?\nOptions:\n(A) red\n(B) blue\n(C) green\n(D) black",
    "Answer with the option's letter from the given choices directly.",
    "<vi_start> <eof> <eov> <vi_end>",
]
NUM_FRAMES = 4  # tiny preset at 56 px: 2 frame groups x 4 visual tokens


def write_video(path: str, frames: int = 12, size: int = 64, fps: int = 4) -> str:
  """A small mpeg4 file whose frames get brighter over time."""
  with av.open(path, "w") as c:
    s = c.add_stream("mpeg4", rate=fps)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    for i in range(frames):
      img = np.full((size, size, 3), (i * 20) % 256, np.uint8)
      img[: size // 2, :, 0] = 255 - img[: size // 2, :, 0]
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return path


def tiny_tokenizer_dir(folder: str) -> str:
  build_chat_sentencepiece(CORPUS * 10, folder, 360)
  return folder


def tiny_config(tokenizer):
  cfg = kangaroo_jax.preset("tiny")
  return cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=tokenizer.vocab_size))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  d = tmp_path_factory.mktemp("chat")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  model = Kangaroo(tiny_config(load_tokenizer(tok_dir)), rngs=nnx.Rngs(0))
  ckpt = save_pretrained(model, tok_dir, str(d / "ckpt"))
  video = write_video(str(d / "clip.mp4"))
  image = str(d / "photo.png")
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 70, 3), dtype=np.uint8)).save(image)
  return dict(ckpt=ckpt, video=video, image=image, dir=d)


@pytest.fixture(scope="module")
def loaded(assets):
  return from_pretrained(assets["ckpt"])


GREEDY = dict(num_frames=NUM_FRAMES, max_new_tokens=8, do_sample=False)


def test_follow_up_reuses_cache_and_equals_full_conversation(assets, loaded):
  model, tok = loaded
  a1, h1 = model.chat(video_path=assets["video"], query="What happens in the video?", history=None, **GREEDY)
  chat = model.chat_session()
  assert chat.last_prefill_tokens == len(h1.session.cache_ids) - 7  # prompt only: 7 tokens fed back in decode
  loads = chat.video_loads
  a2, h2 = model.chat(video_path=assets["video"], query="What colour is the car?", history=h1, **GREEDY)
  reused = chat.last_prefill_tokens
  full = encode_conversation(
      tok,
      list(h2[:3]),
      num_groups=NUM_FRAMES // 2,
      tokens_per_group=4,
      visual_token_id=model.cfg.visual_token_id,
      add_generation_prompt=True,
  ).input_ids
  n_vis = int((full == model.cfg.visual_token_id).sum())
  assert n_vis == 8
  # Only the tail after the first turn's common prefix ran; the video was neither decoded nor encoded again.
  assert reused < len(full) - n_vis
  assert chat.video_loads == loads
  assert [m["role"] for m in h2] == ["user", "assistant", "user", "assistant"] and h2[3]["content"] == a2
  # The same conversation from scratch (a plain list has no cache): identical answer, full prefill.
  a3, _ = model.chat(video_path=assets["video"], query="What colour is the car?", history=list(h1), **GREEDY)
  assert chat.last_prefill_tokens == len(full)
  assert a3 == a2
  # History without the video it talks about is refused.
  with pytest.raises(ValueError, match="video_path"):
    model.chat(query="and then?", history=h2, **GREEDY)


def test_streaming_pieces_make_the_answer(assets, loaded):
  model, tok = loaded
  pieces = []
  answer, _ = model.chat(
      video_path=assets["video"],
      query="What happens?",
      stream=pieces.append,
      seed=1,
      num_frames=NUM_FRAMES,
      max_new_tokens=10,
  )
  assert len(pieces) >= 2 and "".join(pieces) == answer


def test_image_and_bad_inputs(assets, loaded):
  model, tok = loaded
  answer, hist = model.chat(video_path=assets["image"], query="Describe the picture.", tokenizer=tok, **GREEDY)
  assert isinstance(answer, str) and hist[0]["content"].startswith("<video>")
  missing = os.path.join(str(assets["dir"]), "missing.mp4")
  with pytest.raises(VideoError, match="missing.mp4"):
    model.chat(video_path=missing, query="x", **GREEDY)
  broken = os.path.join(str(assets["dir"]), "broken.mp4")
  with open(broken, "wb") as f:
    f.write(b"\x00not a video" * 50)
  with pytest.raises(VideoError, match="broken.mp4"):
    model.chat(video_path=broken, query="x", **GREEDY)
  with pytest.raises(ValueError, match="query"):
    model.chat(video_path=assets["video"], query="  ", **GREEDY)
  bare = Kangaroo(model.cfg, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="tokenizer"):
    Chat(bare, None).chat(assets["video"], "x", **GREEDY)
  untokenized, _ = from_pretrained(save_pretrained(bare, None, str(assets["dir"] / "no_tokenizer")))
  with pytest.raises(ValueError, match="tokenizer"):
    untokenized.chat(video_path=assets["video"], query="x", **GREEDY)


def _cli(args, stdin=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, "-m", "kangaroo_jax.chat", *args],
      input=stdin,
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env,
      timeout=300,
  )


def test_cli_interactive_and_one_shot(assets, loaded):
  model, _ = loaded
  q1, q2 = "What happens in the video?", "What colour is the car?"
  want1, h = model.chat(video_path=assets["video"], query=q1, **GREEDY)
  want2, _ = model.chat(video_path=assets["video"], query=q2, history=h, **GREEDY)
  flags = ["--video", assets["video"], "--greedy", "--num-frames", str(NUM_FRAMES), "--max-new-tokens", "8"]
  run = _cli([assets["ckpt"], *flags], stdin=f"{q1}\n{q2}\n/quit\n")
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout == f"{want1}\n{want2}\n"
  bad = _cli([assets["ckpt"], "--video", "/nonexistent/v.mp4", "--query", q1])
  assert bad.returncode == 2 and "/nonexistent/v.mp4" in bad.stderr


def test_chat_on_a_context_parallel_mesh(assets, loaded):
  """Weights on a context=4 x tensor=2 mesh, cache and prefill split over `context`: same answers."""
  model, _ = loaded
  q1, q2 = "What happens in the video?", "What colour is the car?"
  want1, h = model.chat(video_path=assets["video"], query=q1, **GREEDY)
  want2, _ = model.chat(video_path=assets["video"], query=q2, history=h, **GREEDY)
  sharded, tok, scope = load_for_inference(assets["ckpt"], context=4, tensor=2)
  with scope:
    chat = Chat(sharded, tok, prefill_chunk=16)
    got1, h = chat.chat(assets["video"], q1, None, **GREEDY)
    got2, h = chat.chat(assets["video"], q2, h, **GREEDY)
    assert "context" in str(h.session.cache.k.sharding.spec)
  assert (got1, got2) == (want1, want2)
