"""README.md's Python snippets run as written (issue 15).

Every ```python block of README.md runs, top to bottom in one namespace (a reader going down the page),
with the working directory set to a folder that holds what such a reader has (the whole prelude):

  CKPT_DIR/, DST_DIR/   a converted checkpoint (`from_pretrained` layout with tokenizer files) of the tiny
                        model, whose answers are "B" (tests.test_evaluate.answering)
  clip.mp4              a 3-second video

so the placeholder paths of the snippets resolve without editing them. A block fenced as ```python no-run
is shown for reading only and skipped. Nothing else is provided: a name a snippet uses must be imported or
defined by a snippet above it.
"""

import os
import re

import pytest

from kangaroo_jax.pretrained import save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer
from tests.test_evaluate import answering
from tests.test_inference_chat import ROOT, tiny_tokenizer_dir, write_video

README = os.path.join(ROOT, "README.md")
_FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
NO_RUN = "no-run"


def python_blocks(text: str) -> list[tuple[int, set[str], str]]:
  """(line of the opening fence, words after ```python, code) of every python block, in order."""
  return [(text.count("\n", 0, m.start()) + 1, set(m.group(1).split()), m.group(2)) for m in _FENCE.finditer(text)]


def test_block_parser():
  text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python no-run\nnot code\n```\n"
  assert python_blocks(text) == [(2, set(), "x = 1\n"), (8, {NO_RUN}, "not code\n")]


@pytest.fixture
def reader_folder(tmp_path_factory, monkeypatch):
  d = tmp_path_factory.mktemp("readme")
  tok_dir = tiny_tokenizer_dir(str(d / "tokenizer"))
  save_pretrained(answering(load_tokenizer(tok_dir), "B"), tok_dir, str(d / "CKPT_DIR"))
  os.symlink("CKPT_DIR", d / "DST_DIR")
  write_video(str(d / "clip.mp4"))
  monkeypatch.chdir(d)
  return d


def test_readme_python_snippets_run(reader_folder):
  with open(README) as f:
    blocks = python_blocks(f.read())
  runnable = [(line, code) for line, flags, code in blocks if NO_RUN not in flags]
  assert runnable, "README.md has no runnable ```python block: did the fence syntax change?"
  namespace: dict = {"__name__": "__readme__"}
  for line, code in runnable:
    try:
      exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)  # noqa: S102
    except Exception as e:
      raise AssertionError(f"README.md: the ```python block at line {line} fails: {type(e).__name__}: {e}") from e
