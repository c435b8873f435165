"""Everything one server holds: the model's Chat (template, length checks, engine), the batcher, the video cache,
the upload folder and the example videos offered on the page. Independent of the web framework."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

from kangaroo_jax.data.video import IMAGE_EXTENSIONS
from kangaroo_jax.inference.chat import Chat
from kangaroo_jax.serve.batcher import Batcher
from kangaroo_jax.serve.media import VisualCache
from kangaroo_jax.serve.protocol import Defaults

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  model_name: str = "kangaroo"
  num_frames: int = 64
  defaults: Defaults = Defaults()
  max_batch: int = 8
  max_queue: int = 64
  batch_window_s: float = 0.01
  visual_cache: int = 8
  max_upload_bytes: int = 512 * 2**20
  examples_dir: str | None = None


class Service:

  def __init__(self, chat: Chat, options: ServeOptions = ServeOptions(), *, mesh=None):
    if options.num_frames < 1 or options.num_frames % 2:
      raise ValueError(f"num_frames must be a positive even number, got {options.num_frames}")
    self.chat, self.options = chat, options
    self.tokenizer = chat.tokenizer
    self.cache = VisualCache(options.visual_cache)
    self.batcher = Batcher(
        chat.engine,
        chat.tokenizer,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        window_s=options.batch_window_s,
        mesh=mesh,
    )
    self.created = int(time.time())
    self.tmp_root = self.upload_dir = None

  def start(self) -> None:
    self.tmp_root = tempfile.mkdtemp(prefix="kangaroo_serve_")
    self.upload_dir = os.path.join(self.tmp_root, "uploads")
    os.mkdir(self.upload_dir)
    self.batcher.start()

  def stop(self) -> None:
    self.batcher.stop()
    if self.tmp_root is not None:
      shutil.rmtree(self.tmp_root, ignore_errors=True)  # only what this server wrote: data URLs and uploads

  def examples(self) -> list[dict]:
    """The videos / images of --examples (top level, sorted by name) as {"name", "url"}."""
    folder = self.options.examples_dir
    if not folder or not os.path.isdir(folder):
      return []
    media = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(media) and not n.startswith("."))
    return [{"name": n, "url": "file://" + os.path.abspath(os.path.join(folder, n))} for n in names]
