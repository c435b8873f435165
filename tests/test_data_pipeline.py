"""Grain pipeline: batch layout, first-fit packing accounting, no cross-segment leakage through the model,
resume to identical batches in a new process, skip accounting and the max skip rate."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import frame_index_of, index_frame, tiny_tokenizer, write_records, write_video
from kangaroo_jax.config import tiny
from kangaroo_jax.data.config import DataConfig
from kangaroo_jax.data.pipeline import PrepareSample, SkipRateExceeded, make_train_iterator
from kangaroo_jax.data.records import pack_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 24


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  d = tmp_path_factory.mktemp("pipe")
  write_records(str(d / "data"), N, shards=2)
  tok = tiny_tokenizer(str(d / "tok"))
  return d, tok


def _cfg(d, **kw):
  base = dict(
      dataset=str(d / "data"),
      seq_len=160,
      batch_size=2,
      frame_size=56,
      max_frames=8,
      packing_bins=3,
      num_epochs=1,
      shuffle_seed=3,
  )
  return DataConfig(**{**base, **kw})


def _raw(cfg):
  """Every record's bytes, shard by shard."""
  from array_record.python.array_record_module import ArrayRecordReader

  raw = []
  for p in cfg.shard_files():
    r = ArrayRecordReader(p)
    raw += r.read_all()
    r.close()
  return raw


def _segments(batch):
  """Yields (record number, input_ids, loss_mask, targets, frames, timestamps) of every packed segment."""
  for b in range(batch["input_ids"].shape[0]):
    seg, fo = batch["segment_ids"][b], 0
    for s in range(1, seg.max() + 1):
      sel = seg == s
      n_vis = int((batch["input_ids"][b][sel] < 0).sum())
      f = n_vis // 4 * 2  # tiny at 56 px: 4 visual tokens per frame pair
      frames = batch["frames"][b, fo : fo + f]
      yield (
          frame_index_of(frames[0]),
          batch["input_ids"][b][sel],
          batch["loss_mask"][b][sel],
          batch["targets"][b][sel],
          frames,
          batch["timestamps"][b, fo : fo + f],
          batch["positions"][b][sel],
      )
      fo += f
    assert fo == batch["num_frames"][b]
    assert not batch["frames"][b, fo:].any() and not batch["timestamps"][b, fo:].any()


def test_batches_follow_the_contract_and_account_for_every_sample(env):
  d, tok = env
  cfg, model_cfg = _cfg(d), tiny()
  it = make_train_iterator(cfg, model_cfg, tok)
  batches = list(it)
  b0 = batches[0]
  want = {
      "input_ids": (np.int32, (2, 160)),
      "targets": (np.int32, (2, 160)),
      "loss_mask": (np.float32, (2, 160)),
      "positions": (np.int32, (2, 160)),
      "segment_ids": (np.int32, (2, 160)),
      "frames": (np.uint8, (2, 8, 56, 56, 3)),
      "timestamps": (np.float32, (2, 8)),
      "num_frames": (np.int32, (2,)),
  }
  assert {k: (v.dtype.type, v.shape) for k, v in b0.items()} == want
  prep = PrepareSample(cfg, model_cfg, tok)
  expected = {}
  for i, rb in enumerate(_raw(cfg)):
    s = prep(i, rb)
    expected[frame_index_of(s["frames"][0])] = s
  seen = []
  multi = 0
  for batch in batches:
    multi += int((batch["segment_ids"].max(axis=1) > 1).sum())
    pad = batch["segment_ids"] == 0
    assert not batch["input_ids"][pad].any() and not batch["loss_mask"][pad].any()
    for rid, ids, mask, tgt, frames, ts, pos in _segments(batch):
      e = expected[rid]
      seen.append(rid)
      np.testing.assert_array_equal(ids, e["input_ids"])
      np.testing.assert_array_equal(pos, np.arange(len(ids)))
      np.testing.assert_array_equal(frames, e["frames"])
      np.testing.assert_array_equal(ts, e["timestamps"])
      np.testing.assert_array_equal(mask[:-1], e["loss_mask"][1:])
      assert mask[-1] == 0 and tgt[-1] == 0
      nxt = e["input_ids"][1:]
      np.testing.assert_array_equal(tgt[:-1], np.where(nxt >= 0, nxt, 0))
  # One epoch: every record exactly once (the drop_remainder tail is at most one batch of rows).
  assert len(seen) == len(set(seen))
  assert len(seen) >= N - 3 * 2 and set(seen) <= set(range(N))
  assert multi > 0  # rows really hold several samples with different frame counts
  assert it.metrics()["data/skip_rate"] == 0.0


def test_packed_row_logits_equal_each_sample_alone(env):
  """No cross-segment leakage: the tiny model on a packed row gives each segment the logits it gets in a row
  of its own (same length, the rest padding), all evaluated in one jitted call."""
  import jax.numpy as jnp
  from flax import nnx
  from kangaroo_jax.data.video import normalize_frames
  from kangaroo_jax.models.kangaroo import Kangaroo

  d, tok = env
  it = make_train_iterator(_cfg(d, batch_size=1, packing_bins=1, seq_len=160), tiny(), tok)
  batch = next(b for b in it if b["segment_ids"].max() >= 2)
  L, F = batch["input_ids"].shape[1], batch["frames"].shape[1]
  rows = {k: [v[0]] for k, v in batch.items() if k in ("input_ids", "positions", "segment_ids", "frames", "timestamps")}
  segs = list(_segments(batch))
  for _, ids, _, _, frames, ts, _ in segs:
    n, f = len(ids), len(frames)
    rows["input_ids"].append(np.pad(ids, (0, L - n)))
    rows["positions"].append(np.pad(np.arange(n, dtype=np.int32), (0, L - n)))
    rows["segment_ids"].append(np.pad(np.ones(n, np.int32), (0, L - n)))
    rows["frames"].append(np.pad(frames, ((0, F - f), (0, 0), (0, 0), (0, 0))))
    rows["timestamps"].append(np.pad(ts, (0, F - f)))
  x = {k: jnp.asarray(np.stack(v)) for k, v in rows.items()}
  model = Kangaroo(tiny(), rngs=nnx.Rngs(0))

  @nnx.jit
  def fwd(m, x):
    return m(
        x["input_ids"],
        normalize_frames(x["frames"]),
        x["timestamps"],
        positions=x["positions"],
        segment_ids=x["segment_ids"],
    )

  logits = np.asarray(fwd(model, x))
  seg = batch["segment_ids"][0]
  for s, (_, ids, *_rest) in enumerate(segs, start=1):
    np.testing.assert_allclose(logits[0][seg == s], logits[s][: len(ids)], atol=2e-4, rtol=2e-4)
  # The check can fail: without segment ids the later segments see the earlier ones.
  leaky = np.asarray(
      nnx.jit(lambda m, x: m(x["input_ids"][:1], normalize_frames(x["frames"][:1]), x["timestamps"][:1]))(model, x)
  )
  assert not np.allclose(leaky[0][seg == 2], logits[2][: int((seg == 2).sum())], atol=2e-4)


RESUME_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
from data_helpers import tiny_tokenizer
from kangaroo_jax.config import tiny
from kangaroo_jax.data.config import DataConfig
from kangaroo_jax.data.pipeline import make_train_iterator
if __name__ == "__main__":
  cfg = DataConfig(**json.loads({cfg!r}))
  it = make_train_iterator(cfg, tiny(), tiny_tokenizer({tok!r}))
  it.set_state(json.loads(open({state!r}).read()))
  out = []
  for _ in range(5):
    b = next(it)
    out.append({{k: v.tolist() for k, v in b.items() if k != "frames"}} | {{"frames_sum": int(b["frames"].sum())}})
  it.close()
  print(json.dumps(out))
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_gives_identical_batches(env, tmp_path, workers):
  d, tok = env
  kw = dict(num_epochs=None, worker_count=workers, batch_size=2)
  cfg = _cfg(d, **kw)
  it = make_train_iterator(cfg, tiny(), tok)
  for _ in range(3):  # step k = 3
    next(it)
  state = it.get_state()
  (tmp_path / "state.json").write_text(json.dumps(state))  # must be JSON-serialisable for the checkpoint
  want = []
  for _ in range(5):
    b = next(it)
    want.append({k: v.tolist() for k, v in b.items() if k != "frames"} | {"frames_sum": int(b["frames"].sum())})
  it.close()
  cfg_json = json.dumps(
      {
          "dataset": cfg.dataset,
          "seq_len": 160,
          "batch_size": 2,
          "frame_size": [56, 56],
          "max_frames": 8,
          "packing_bins": 3,
          "shuffle_seed": 3,
          "worker_count": workers,
      }
  )
  script = tmp_path / "resume.py"
  script.write_text(
      RESUME_SCRIPT.format(
          tests=os.path.join(REPO, "tests"), cfg=cfg_json, tok=str(d / "tok2"), state=str(tmp_path / "state.json")
      )
  )
  envv = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=envv, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got == want


def test_bad_samples_are_skipped_counted_and_the_rate_is_enforced(env, tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  from kangaroo_jax.data.records import encode_frames

  d, tok = env
  good = write_video(str(tmp_path / "good.mp4"), 20, fps=10)
  data = open(good, "rb").read()
  (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
  (tmp_path / "junk.mp4").write_bytes(os.urandom(2000))
  (tmp_path / "empty.mp4").write_bytes(b"")
  conv = [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "A ball."}]
  recs = [
      pack_record({"id": "ok", "video": {"path": good}, "messages": conv}),
      pack_record({"id": "missing", "video": {"path": str(tmp_path / "nope.mp4")}, "messages": conv}),
      pack_record({"id": "cut", "video": {"path": str(tmp_path / "cut.mp4")}, "messages": conv}),
      pack_record({"id": "junk", "video": {"path": str(tmp_path / "junk.mp4")}, "messages": conv}),
      pack_record({"id": "empty", "video": {"path": str(tmp_path / "empty.mp4")}, "messages": conv}),
      b"\xc1garbage",
      pack_record(
          {
              "id": "noframes",
              "frames": {"format": "raw", "count": 2, "height": 4, "width": 4, "data": b"x"},
              "messages": conv,
          }
      ),
      pack_record(
          {
              "id": "nomarker",
              "video": {"path": good},
              "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "x"}],
          }
      ),
      pack_record(
          {
              "id": "long",
              "video": {"path": good},
              "messages": [conv[0], {"role": "assistant", "content": "word " * 400}],
          }
      ),
      pack_record(
          {"id": "many", "frames": encode_frames(np.zeros((10, 56, 56, 3), np.uint8), "raw"), "messages": conv}
      ),
  ]
  w = ArrayRecordWriter(str(tmp_path / "bad.array_record"), "group_size:1")
  for r in recs:
    w.write(r)
  w.close()
  cfg = DataConfig(
      dataset=str(tmp_path / "bad.array_record"),
      seq_len=200,
      batch_size=1,
      frame_size=56,
      max_frames=8,
      num_frames=4,
      num_epochs=1,
      shuffle=False,
      max_skip_rate=1.0,
  )
  it = make_train_iterator(cfg, tiny(), tok)
  rows = list(it)
  assert len(rows) == 1 and rows[0]["segment_ids"].max() == 1
  assert it.skipped == {
      "bad_record": 2,
      "missing_video": 1,
      "bad_video": 3,
      "bad_conversation": 1,
      "too_long": 1,
      "too_many_frames": 1,
  }
  m = it.metrics()
  assert m["data/seen"] == 10 and m["data/skip_rate"] == pytest.approx(0.9)
  strict = make_train_iterator(
      DataConfig(**{**cfg.__dict__, "max_skip_rate": 0.5, "skip_check_min_samples": 5}), tiny(), tok
  )
  with pytest.raises(SkipRateExceeded, match=r"9 of 10 samples skipped .*max_skip_rate 50.0%.*bad_video"):
    list(strict)


TOO_LONG_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
from data_helpers import tiny_tokenizer
from kangaroo_jax.config import tiny
from kangaroo_jax.data.config import DataConfig
from kangaroo_jax.data.pipeline import make_train_iterator
if __name__ == "__main__":
  it = make_train_iterator(DataConfig(**json.loads({cfg!r})), tiny(), tiny_tokenizer({tok!r}))
  try:
    next(it)
    out = {{"error": None}}
  except Exception as e:
    out = {{"error": type(e).__name__, "message": str(e)}}
  it.close()
  print(json.dumps(out))
"""


@pytest.mark.parametrize("workers,rate", [(0, 0.05), (2, 0.05), (0, 1.0), (2, 1.0)])
def test_every_sample_too_long_raises_instead_of_hanging(env, tmp_path, workers, rate):
  """seq_len below every sample: no row is ever packed, so the skip counts (which travel in rows) never reach
  the TrainIterator; the packer itself must stop, in the worker processes too, and even at max_skip_rate 1.0.
  Runs in a subprocess so that a regression fails on the timeout instead of blocking the suite."""
  d, tok = env
  shortest = min(len(PrepareSample(_cfg(d), tiny(), tok)(i, rb)["input_ids"]) for i, rb in enumerate(_raw(_cfg(d))))
  seq_len = shortest - 1
  cfg_json = json.dumps(
      {
          "dataset": str(d / "data"),
          "seq_len": seq_len,
          "batch_size": 2,
          "frame_size": [56, 56],
          "max_frames": 8,
          "packing_bins": 3,
          "shuffle_seed": 3,
          "num_epochs": None,
          "worker_count": workers,
          "max_skip_rate": rate,
          "skip_check_min_samples": 10,
      }
  )
  script = tmp_path / "too_long.py"
  script.write_text(TOO_LONG_SCRIPT.format(tests=os.path.join(REPO, "tests"), cfg=cfg_json, tok=str(d / "tok3")))
  envv = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  try:
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=envv, cwd=REPO, timeout=180)
  except subprocess.TimeoutExpired:
    pytest.fail("the pipeline hung instead of raising SkipRateExceeded")
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["error"] == "SkipRateExceeded", got
  msg = got["message"]
  assert "too_long" in msg and f"seq_len {seq_len} is shorter" in msg and f"needs {shortest} tokens" in msg, msg
  if rate < 1.0:  # the rate rule fires first, as soon as the minimum sample count is read
    assert f"max_skip_rate {rate:.1%}" in msg and re.search(r"\b(\d+) of \1 samples skipped", msg), msg
  else:  # only the consecutive-skip guard can stop it
    assert "samples read were all skipped" in msg, msg


def test_keep_aspect_rows_use_a_non_square_grid_through_the_model(tmp_path, env):
  """keep_aspect with a configured (H, W): wide 56x112 sources are letterboxed into 56x84 slots (aspect
  kept, bars top and bottom), the prompt carries the 4x6-patch grid's visual-token count, and the model
  consumes the batch with that grid."""
  import jax.numpy as jnp
  from flax import nnx
  from array_record.python.array_record_module import ArrayRecordWriter
  from kangaroo_jax.data.records import encode_frames
  from kangaroo_jax.data.video import normalize_frames
  from kangaroo_jax.models.kangaroo import Kangaroo

  _, tok = env
  path = str(tmp_path / "wide.array_record")
  w = ArrayRecordWriter(path, "group_size:1")
  for i in range(3):
    frames = np.stack([index_frame(i, 56, 112)] * 2)
    w.write(
        pack_record(
            {
                "id": f"w{i}",
                "frames": encode_frames(frames, "raw"),
                "timestamps": [0.0, 0.5],
                "messages": [
                    {"role": "user", "content": "<video>What happens?"},
                    {"role": "assistant", "content": "apples"},
                ],
            }
        )
    )
  w.close()
  cfg = DataConfig(
      dataset=path,
      seq_len=64,
      batch_size=1,
      frame_size=(56, 84),
      keep_aspect=True,
      max_frames=2,
      num_frames=2,
      packing_bins=1,
      num_epochs=1,
      shuffle=False,
  )
  batch = next(iter(make_train_iterator(cfg, tiny(), tok)))
  assert batch["frames"].shape == (1, 2, 56, 84, 3)
  frame = batch["frames"][0, 0]
  # 56x112 scaled by 0.75 -> 42x84, centred: 7-pixel zero bars above and below, none at the sides.
  assert not frame[:7].any() and not frame[-7:].any() and frame[7:49].any()
  assert frame_index_of(frame[7:49]) == 0
  gh, gw = tiny().vision.grid_for(56, 84)
  assert (gh, gw) == (4, 6)
  n_vis = int((batch["input_ids"][0] < 0).sum())
  assert n_vis == tiny().projector.tokens_per_group(gh, gw) == 6
  model = Kangaroo(tiny(), rngs=nnx.Rngs(0))
  logits = nnx.jit(
      lambda m, b: m(
          b["input_ids"],
          normalize_frames(b["frames"]),
          b["timestamps"],
          positions=b["positions"],
          segment_ids=b["segment_ids"],
      )
  )(model, {k: jnp.asarray(batch[k]) for k in ("input_ids", "frames", "timestamps", "positions", "segment_ids")})
  assert logits.shape == (1, 64, tiny().llm.vocab_size) and bool(jnp.isfinite(logits).all())
