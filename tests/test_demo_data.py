"""train/demo_data.py: labels read back from the decoded videos, balanced answers, disjoint held-out clips."""

import collections
import json
import os

import numpy as np
import pytest

from kangaroo_jax.data.video import load_video
from kangaroo_jax.inference.mcq import load_benchmark
from train import demo_data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo_data"))
  paths = demo_data.generate(out, num_train=96, num_test=48, seed=3)
  with open(paths["manifest"]) as f:
    manifest = [json.loads(line) for line in f]
  return out, paths, manifest


def _foreground(frame: np.ndarray) -> np.ndarray:
  # Compression blurs the edges a little; anything clearly off the background colour is a shape.
  return np.abs(frame.astype(np.int32) - np.array(demo_data.BACKGROUND)).max(-1) > 60


def _centroid(frame: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(_foreground(frame))
  return np.array([xs.mean(), ys.mean()])


def _decoded(out: str, video: str) -> np.ndarray:
  return load_video(os.path.join(out, "videos", os.path.basename(video)), num_frames=8).frames


def test_direction_label_matches_centroid_motion(dataset):
  out, paths, manifest = dataset
  items = load_benchmark(paths["benchmark"]) + load_benchmark(paths["train_benchmark"])
  checked = 0
  for it in items:
    if it.task != "direction":
      continue
    frames = _decoded(out, it.video)
    motion = _centroid(frames[-1]) - _centroid(frames[0])
    axis = int(np.argmax(np.abs(motion)))
    measured = {(0, True): "right", (0, False): "left", (1, True): "down", (1, False): "up"}[(axis, motion[axis] > 0)]
    assert measured == it.options[it.answer], (it.id, motion)
    assert np.abs(motion).max() > 0.3 * frames.shape[2]  # the motion is large relative to the frame
    checked += 1
  assert checked >= 10


def test_order_answer_is_the_colour_that_appears_first(dataset):
  out, paths, _ = dataset
  checked = 0
  for it in load_benchmark(paths["benchmark"]) + load_benchmark(paths["train_benchmark"]):
    if it.task != "order":
      continue
    frames = _decoded(out, it.video)
    colour, other = it.options[it.answer], it.options[1 - it.answer]  # the two shapes' colours

    def first_frame(name):
      rgb = np.array(demo_data.COLORS[name])
      hit = [(np.abs(f.astype(np.int32) - rgb).max(-1) < 60).sum() > 20 for f in frames]
      return hit.index(True) if any(hit) else len(frames)

    assert first_frame(colour) < first_frame(other) < len(frames), it.id
    assert _foreground(frames[-1]).sum() > 0  # both shapes are still there at the end
    checked += 1
  assert checked >= 4


def test_colour_and_shape_labels(dataset):
  out, paths, _ = dataset
  for it in load_benchmark(paths["benchmark"]):
    if it.task != "color":
      continue
    pixels = _decoded(out, it.video)[0][_foreground(_decoded(out, it.video)[0])].astype(np.int32)
    nearest = min(demo_data.COLORS, key=lambda c: np.abs(pixels.mean(0) - demo_data.COLORS[c]).sum())
    assert nearest == it.options[it.answer], it.id


def test_shape_labels_read_back_from_the_outline(dataset):
  """The decoded shape fills its bounding box as its label says: square ~1, circle pi/4, triangle 1/2."""
  out, paths, _ = dataset
  fills = collections.defaultdict(list)
  for it in load_benchmark(paths["benchmark"]) + load_benchmark(paths["train_benchmark"]):
    if it.task != "shape":
      continue
    ys, xs = np.nonzero(_foreground(_decoded(out, it.video)[0]))
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fills[it.options[it.answer]].append(len(ys) / box)
  assert set(fills) == set(demo_data.SHAPES), fills
  assert min(fills["square"]) > 0.9 and 0.68 < min(fills["circle"]) <= max(fills["circle"]) < 0.88, fills
  assert max(fills["triangle"]) < 0.62, fills


def test_order_clips_shapes_never_overlap():
  for c in demo_data.sample(300, seed=11):
    if c["task"] != "order":
      continue
    a, b = c["kind"]["first"], c["kind"]["second"]
    size = c["kind"]["size"]
    first = demo_data._mask(a["shape"], size, *a["center"], a["radius"])
    assert not (first & demo_data._mask(b["shape"], size, *b["center"], b["radius"])).any(), c["kind"]


def test_answers_are_balanced_and_options_shuffled():
  clips = demo_data.sample(400, seed=7)
  by_task = collections.defaultdict(list)
  for c in clips:
    by_task[c["task"]].append(c)
  assert set(by_task) == set(demo_data.TYPES)
  for task, cs in by_task.items():
    n = len(cs[0]["options"])
    letters = collections.Counter(c["answer"] for c in cs)
    values = collections.Counter(c["options"][c["answer"]] for c in cs)
    assert max(letters.values()) - min(letters.values()) <= 1, (task, letters)
    assert len(letters) == n
    assert max(values.values()) - min(values.values()) <= 1, (task, values)
    assert len({tuple(c["options"]) for c in cs}) > 1  # the option order varies
    for c in cs if task == "order" else ():  # the two shapes differ in colour and shape: the colour names one
      first, second = c["kind"]["first"], c["kind"]["second"]
      assert c["options"][c["answer"]] == first["color"] != second["color"] and first["shape"] != second["shape"]
  assert len(by_task["direction"]) > len(by_task["color"])


def test_reply_is_the_option_text(dataset):
  _, paths, manifest = dataset
  for r in manifest:
    user, reply = r["conversations"][0]["content"], r["conversations"][1]["content"]
    assert user.startswith("<video>") and f") {reply}\n" in user


def test_held_out_videos_do_not_overlap_training(dataset):
  out, paths, manifest = dataset
  with open(os.path.join(out, "specs.json")) as f:
    specs = json.load(f)
  key = lambda k: json.dumps(k, sort_keys=True)  # noqa: E731
  assert not {key(k) for k in specs["train"]} & {key(k) for k in specs["test"]}
  train_videos = {os.path.basename(r["video"]) for r in manifest}
  test_items = load_benchmark(paths["benchmark"])
  assert not train_videos & {it.video for it in test_items}
  # ... nor in content: no held-out clip decodes to the same frames as a training clip.
  digest = lambda v: _decoded(out, v).tobytes().__hash__()  # noqa: E731
  train_hashes = {digest(v) for v in train_videos}
  assert not train_hashes & {digest(it.video) for it in test_items}
  assert len(test_items) == 48 and len(manifest) == 96


def test_demo_config_validates_and_overrides(tmp_path):
  """`make demo`'s config builds a valid TrainConfig; its arg string overrides steps and the TPE."""
  import pytest
  from configs.demo import get_config
  from train.config import from_configdict

  cfg = from_configdict(get_config(f"data={tmp_path},tokenizer={tmp_path},steps=7"))
  assert cfg.total_steps == 7 and cfg.model.projector.tpe == "none"
  assert cfg.model.vision.image_size == 84 and cfg.data.num_frames == 8
  assert cfg.model.projector.spatial_patch == 1 and cfg.data.seq_len == 240  # no 2x2 merge (configs/demo.py)
  assert cfg.model.projector.patchify == "conv3d"  # the pair's frames weighed apart (configs/demo.py)
  assert cfg.optim.lr == 7e-4  # at 2e-3 seed 2 never learnt direction or shape (configs/demo.py)
  assert cfg.data.frame_size == demo_data.FRAME_SIZE and cfg.data.max_frames == demo_data.FRAMES  # one source
  seeded = from_configdict(get_config(f"data={tmp_path},tokenizer={tmp_path},seed=4"))
  assert seeded.seed == 4 and seeded.data.shuffle_seed == 4 and cfg.seed == 0
  paths = f"data={tmp_path},tokenizer={tmp_path}"
  assert from_configdict(get_config(paths + ",tpe=sinusoidal")).model.projector.tpe == "sinusoidal"
  with pytest.raises(Exception, match="tpe"):
    from_configdict(get_config(paths + ",tpe=cosine"))
