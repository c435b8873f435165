"""Video needle-in-a-haystack (kangaroo_jax.niah): the needle lands on the frames its record names, scoring is
deterministic, reruns compute only missing cells, the heatmap is drawn, and bad input or foreign files in the
output folder end with one error line (exit 2)."""

import importlib.util
import json
import os
import shutil
import sys
from importlib.util import find_spec

import numpy as np
import pytest
from PIL import Image

from kangaroo_jax import niah
from kangaroo_jax.data.video import load_video, normalize_frames, preprocess_frames
from kangaroo_jax.inference.niah_layout import needle_indices, needle_start, place_needle
from kangaroo_jax.pretrained import save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer
from tests.test_evaluate import answering
from tests.test_inference_chat import tiny_tokenizer_dir, write_video
from tests.test_inference_faults import _one_error_line

SIZE = 56  # the tiny preset's image size
LENGTHS = [4, 8]
DEPTHS = [0.0, 0.5, 1.0]
HAYSTACK_FRAMES = 12


def needle_image(path: str) -> str:
  """A saturated blue / yellow checkerboard: nothing like the grey haystack frames."""
  tile = (np.indices((48, 48)).sum(0) // 8) % 2
  img = np.where(tile[..., None] == 1, np.array([255, 220, 0], np.uint8), np.array([0, 40, 255], np.uint8))
  Image.fromarray(img.astype(np.uint8)).save(path)
  return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  d = tmp_path_factory.mktemp("niah")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  tok = load_tokenizer(tok_dir)
  model = answering(tok, "B")  # answers "B" after any prompt, so the score is fixed by the weights
  return dict(
      dir=d,
      tok=tok,
      tok_dir=tok_dir,
      model=model,
      haystack=write_video(str(d / "hay.mp4")),
      needle=needle_image(str(d / "needle.png")),
  )


@pytest.fixture(scope="module")
def ckpt(assets, tmp_path_factory):
  return save_pretrained(assets["model"], assets["tok_dir"], str(tmp_path_factory.mktemp("niah_ckpt") / "ckpt"))


@pytest.fixture(scope="module")
def chat(assets):
  return niah.FramesChat(assets["model"], assets["tok"])


def setup_for(assets, **overrides) -> niah.Setup:
  fields = dict(
      checkpoint="tiny",
      haystack=assets["haystack"],
      needle=assets["needle"],
      needle_frames=2,
      align=1,
      question="What colour is the card?",
      answer="blue",
      options=("red", "blue"),
      max_new_tokens=4,
  )
  return niah.Setup(**{**fields, **overrides})


@pytest.fixture
def frames_seen(chat, monkeypatch):
  """Every frames array [1, f, S, S, 3] handed to the vision tower, in call order."""
  seen = []
  encode = chat.engine.encode_frames

  def spy(frames, timestamps=None):
    seen.append(np.asarray(frames))
    return encode(frames, timestamps)

  monkeypatch.setattr(chat.engine, "encode_frames", spy)
  return seen


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_placement_formula():
  for length in (4, 8, 64, 1024):
    for depth in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1):
      for n in (1, 2):
        start = round(depth * (length - n))
        assert needle_indices(length, depth, n) == list(range(start, start + n))
        aligned = needle_start(length, depth, n, align=2)
        assert aligned % 2 == 0 and 0 <= aligned <= length - n and abs(aligned - depth * (length - n)) <= 1
  assert needle_indices(8, 1, 2) == [6, 7] and needle_indices(8, 0, 2) == [0, 1]
  assert needle_start(64, 0.25, 2) == 16 and needle_start(64, 0.75, 2) == 46  # round half to even: 15.5, 46.5
  assert needle_start(64, 0.75, 2, align=2) == 46 and needle_start(63, 1, 2, align=2) == 60
  for bad in (dict(depth=1.5), dict(depth=float("nan")), dict(needle_frames=9), dict(length=0)):
    with pytest.raises(ValueError):
      needle_start(**{**dict(length=8, depth=0.5, needle_frames=2), **bad})
  hay, needle = np.zeros((6, 2)), np.ones((2, 2))
  assert place_needle(hay, needle, 3)[:, 0].tolist() == [0, 0, 0, 1, 1, 0] and not hay.any()


def test_free_form_scoring():
  s = niah.Setup(
      checkpoint="c",
      haystack="h",
      needle="n",
      needle_frames=2,
      align=1,
      question="q?",
      answer="Blue  Card",
      options=None,
      max_new_tokens=4,
  )
  assert niah.score("blue card.", s) == {"match": "exact", "correct": True}
  assert niah.score("It is a BLUE card held up", s) == {"match": "substring", "correct": True}
  assert niah.score("a blue hat", s) == {"match": None, "correct": False}
  mc = niah.Setup(**{**s.__dict__, "options": ("red card", "blue card"), "answer": "B"})
  assert niah.score("(B) blue card", mc) == {"choice": "B", "correct": True}
  assert niah.score("A", mc) == {"choice": "A", "correct": False}
  assert niah.score("no idea", mc) == {"choice": None, "correct": False}


def test_needle_placed_scored_resumed_and_plotted(assets, chat, frames_seen, tmp_path, capsys):
  setup = setup_for(assets)
  out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
  summary = niah.run(chat, setup, LENGTHS, DEPTHS, out_a)
  records = [json.loads(line) for line in open(os.path.join(out_a, niah.RESULTS))]
  assert [(r["length"], r["depth"]) for r in records] == [(n, d) for n in LENGTHS for d in DEPTHS]
  assert len(frames_seen) == len(records)

  needle = normalize_frames(preprocess_frames(np.asarray(Image.open(assets["needle"]).convert("RGB"))[None], SIZE))[0]
  for rec, frames in zip(records, frames_seen):
    n = rec["length"]
    start = round(rec["depth"] * (n - 2))
    assert rec["needle_indices"] == [start, start + 1]
    assert frames.shape == (1, n, SIZE, SIZE, 3)
    hay = normalize_frames(preprocess_frames(load_video(assets["haystack"], num_frames=n).frames, SIZE))
    for i in range(n):
      if i in rec["needle_indices"]:
        np.testing.assert_array_equal(frames[0, i], needle)
        assert np.abs(hay[i] - needle).max() > 1  # the haystack frame there really was replaced
      else:
        np.testing.assert_array_equal(frames[0, i], hay[i])
    assert rec["prediction"].strip() == "B" and rec["choice"] == "B" and rec["correct"] is True
    assert rec["duplicated"] is False and rec["haystack_frames_available"] is None and "error" not in rec
  assert summary["accuracy"] == 100.0 and summary["cells"] == 6 and summary["grid"]["8"]["0.5"] == 100.0

  # Deterministic: a second run into another folder writes the same files, byte for byte.
  niah.run(chat, setup, LENGTHS, DEPTHS, out_b)
  for name in (niah.RESULTS, niah.SUMMARY):
    assert _read(os.path.join(out_a, name)) == _read(os.path.join(out_b, name))

  # Resume: nothing left to compute; a longer length list computes only its new cells. 16 frames from a
  # 12-frame video repeat frames: warned and recorded.
  frames_seen.clear()
  before = _read(os.path.join(out_a, niah.RESULTS))
  niah.run(chat, setup, LENGTHS, DEPTHS, out_a)
  assert frames_seen == [] and _read(os.path.join(out_a, niah.RESULTS)) == before
  warnings = []
  summary = niah.run(chat, setup, LENGTHS + [16], DEPTHS, out_a, warn=warnings.append)
  assert [f.shape[1] for f in frames_seen] == [16, 16, 16]
  assert len(warnings) == 1 and f"only {HAYSTACK_FRAMES} frames" in warnings[0]
  records = [json.loads(line) for line in open(os.path.join(out_a, niah.RESULTS))]
  assert _read(os.path.join(out_a, niah.RESULTS)).startswith(before)  # earlier records kept as they were
  assert [(r["length"], r["duplicated"], r["haystack_frames_available"]) for r in records[-3:]] == [
      (16, True, HAYSTACK_FRAMES)
  ] * 3
  assert summary["duplicated_lengths"] == [16] and summary["lengths"] == [4, 8, 16]

  # The heatmap: a PNG of the documented size, marked as this tool's.
  with Image.open(os.path.join(out_a, niah.HEATMAP)) as im:
    assert im.format == "PNG" and im.size == (240 + 80 * 3, 150 + 40 * 3)
    assert im.text.get(niah.PNG_SOURCE_KEY) == niah.TOOL
  assert not [f for f in os.listdir(out_a) if f.endswith(".tmp")]


def _cli(assets, out, *extra):
  return [
      "ckpt-not-read",
      "--haystack",
      assets["haystack"],
      "--needle",
      assets["needle"],
      "--question",
      "Colour?",
      "--answer",
      "blue",
      "--lengths",
      "4,8",
      "--depths",
      "0,1",
      "--output",
      str(out),
      *extra,
  ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lengths", "4,7"], "--lengths must be comma-separated positive even"),
        (["--lengths", "0"], "--lengths must be comma-separated positive even"),
        (["--depths", "0,1.5"], "--depths must be comma-separated numbers in [0, 1]"),
        (["--depths", "nan"], "--depths must be comma-separated numbers in [0, 1]"),
        (["--needle-frames", "6"], "--needle-frames must be in [1, 4]"),
        (["--options", "red", "green", "--answer", "blue"], "--options / --answer: answer 'blue' is neither"),
        (["--haystack", "/nonexistent/hay.mp4"], "/nonexistent/hay.mp4: no such file"),
        (["--needle", "/nonexistent/needle.png"], "/nonexistent/needle.png: no such file"),
    ],
)
def test_bad_input_is_one_error_line(assets, tmp_path, capsys, extra, message):
  assert niah.main(_cli(assets, tmp_path / "out", *extra)) == 2
  assert message in _one_error_line(capsys)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content",
    [
        (niah.RESULTS, b'{"note": "mine"}\n'),
        (niah.SUMMARY, b'{"accuracy": 1}'),
        (niah.HEATMAP, None),  # a PNG of someone else's
    ],
)
def test_files_not_ours_are_refused_and_left_alone(assets, tmp_path, capsys, name, content):
  out = tmp_path / "out"
  out.mkdir()
  if content is None:
    Image.new("RGB", (8, 8)).save(out / name)
    content = (out / name).read_bytes()
  else:
    (out / name).write_bytes(content)
  assert niah.main(_cli(assets, out)) == 2
  assert f"{name}" in _one_error_line(capsys)
  assert os.listdir(out) == [name] and (out / name).read_bytes() == content


def test_cli_end_to_end_failed_cells_retried_and_other_settings_refused(assets, ckpt, tmp_path, capsys):
  """A saved checkpoint through main(): the 16-frame prompt is past --max-positions, so those cells are
  recorded as failed and the run goes on; --retry-failed with more positions computes just them; a rerun
  with another question is refused."""
  out = tmp_path / "out"
  args = _cli(assets, out, "--max-positions", "80", "--max-new-tokens", "4")
  args[0], args[args.index("--answer") + 1] = ckpt, "b"
  args[args.index("--lengths") + 1], args[args.index("--depths") + 1] = "16,4,8", "1,0.5,0"
  assert niah.main(args) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["cells"] == 9 and summary["failed"] == 3
  assert summary["by_length"] == {"4": 100.0, "8": 100.0, "16": None}
  records = [json.loads(line) for line in open(out / niah.RESULTS)]
  assert [(r["length"], r["depth"]) for r in records] == [(n, d) for n in (4, 8, 16) for d in (0.0, 0.5, 1.0)]
  assert ["more than the 80 positions" in r.get("error", "") for r in records] == [False] * 6 + [True] * 3
  assert {r.get("match") for r in records[:6]} == {"exact"} and records[0]["prediction"].strip() == "B"
  assert [r["duplicated"] for r in records] == [False] * 6 + [True] * 3
  if os.environ.get("NIAH_EXAMPLE_PNG"):  # how docs/images/niah_example.png was made
    shutil.copy(out / niah.HEATMAP, os.environ["NIAH_EXAMPLE_PNG"])

  args[args.index("--max-positions") + 1] = "200"
  assert niah.main(args + ["--retry-failed"]) == 0
  err = capsys.readouterr().err
  assert "retrying 3 failed cells" in err and "6 cells already in" in err and "3 to compute" in err
  assert err.count("): correct") == 3
  again = [json.loads(line) for line in open(out / niah.RESULTS)]
  assert again[:6] == records[:6] and all(r["correct"] and "error" not in r for r in again[6:])

  before = {f: (out / f).read_bytes() for f in os.listdir(out)}
  args[args.index("--question") + 1] = "Shape?"
  assert niah.main(args) == 2
  assert "results.jsonl: line 1 was computed with other settings (differing: question)" in _one_error_line(capsys)
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_ctrl_c_keeps_finished_cells(assets, ckpt, tmp_path, capsys, monkeypatch):
  answer = niah.FramesChat.chat
  calls = []

  def interrupted_second_time(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return answer(self, *args, **kwargs)

  monkeypatch.setattr(niah.FramesChat, "chat", interrupted_second_time)
  args = _cli(assets, tmp_path / "out", "--max-new-tokens", "4")
  args[0] = ckpt
  assert niah.main(args) == 130
  assert "run the same command again to resume" in capsys.readouterr().err
  assert [json.loads(line)["depth"] for line in open(tmp_path / "out" / niah.RESULTS)] == [0.0]
  assert json.loads((tmp_path / "out" / niah.SUMMARY).read_text())["cells"] == 1


def test_without_matplotlib_the_cli_says_so_unless_no_plot(assets, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the eval extra looks like
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name))
  assert niah.main(_cli(assets, tmp_path / "out")) == 2
  assert "needs matplotlib (pip install 'kangaroo-jax[plot]'), or pass --no-plot" in _one_error_line(capsys)
  summary = niah.write_outputs(str(tmp_path), {}, setup_for(assets), plot=False)  # --no-plot never imports it
  assert summary["cells"] == 0 and not (tmp_path / niah.HEATMAP).exists()


def test_clip_needle_is_sampled_to_its_frame_count(assets, tmp_path):
  clip = write_video(str(tmp_path / "clip.mp4"), frames=6, size=32)
  frames = niah.load_needle(clip, 3)
  np.testing.assert_array_equal(frames, load_video(clip, num_frames=3).frames[:3])
  assert niah.load_needle(assets["needle"], 3).shape == (3, 48, 48, 3)
