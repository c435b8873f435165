"""Two JAX processes on CPU (jax.distributed on localhost): each reads a disjoint data shard, and
make_global_batch builds the global arrays; with `context` spanning the hosts both read the same rows and
each keeps its half of the sequence."""

import json
import os
import socket
import subprocess
import sys

import pytest

from data_helpers import write_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
if __name__ == "__main__":
  pid = int(sys.argv[1])
  jax.distributed.initialize("localhost:{port}", num_processes=2, process_id=pid)
  from jax.sharding import Mesh, AxisType
  from data_helpers import frame_index_of, tiny_tokenizer
  from kangaroo_jax.config import tiny
  from kangaroo_jax.data.config import DataConfig
  from kangaroo_jax.data.global_batch import data_shard_for_process, make_global_batch
  from kangaroo_jax.data.pipeline import make_train_iterator
  devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))  # 2 per process
  auto = (AxisType.Auto,) * 4
  meshes = {{
      # batch over data: process p holds rows [2p, 2p + 2)
      "data": Mesh(np.array(devs).reshape(4, 1, 1, 1), ("data", "fsdp", "context", "tensor"), axis_types=auto),
      # context across processes: both hold every row, each half of the sequence
      "context": Mesh(np.array(devs).reshape(2, 2).T.reshape(2, 1, 2, 1), ("data", "fsdp", "context", "tensor"),
                      axis_types=auto),
  }}
  tok = tiny_tokenizer({tok!r} + str(pid))
  out = {{}}
  for name, mesh in meshes.items():
    cfg = DataConfig(dataset={data!r}, seq_len=96, batch_size=4, frame_size=56, max_frames=6, num_frames=6,
                     packing_bins=2, num_epochs=1, shuffle_seed=1)
    index, count = data_shard_for_process(mesh, cfg.batch_size)
    it = make_train_iterator(cfg, tiny(), tok, process_index=index, process_count=count)
    ids, shapes = [], {{}}
    for host in it:
      for b in range(host["frames"].shape[0]):
        ids += [frame_index_of(host["frames"][b, k]) for k in range(0, int(host["num_frames"][b]), 2)]
      g = make_global_batch(host, mesh)
      shapes = {{k: list(v.shape) for k, v in g.items()}}
      for shard in g["input_ids"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data),
                                      host["input_ids"][shard.index] if name == "context"
                                      else host["input_ids"][shard.index[0].start - 2 * pid:
                                                             shard.index[0].stop - 2 * pid, shard.index[1]])
    out[name] = {{"shard": [index, count], "ids": ids, "shapes": shapes}}
  print("RESULT " + json.dumps(out))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.xdist_group("multiprocess")
def test_two_processes_read_disjoint_shards(tmp_path):
  write_records(str(tmp_path / "data"), 20, shards=2, frames_for=lambda i: 2)
  script = tmp_path / "worker.py"
  script.write_text(
      WORKER.format(
          tests=os.path.join(REPO, "tests"), port=_free_port(), tok=str(tmp_path / "tok"), data=str(tmp_path / "data")
      )
  )
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [
      subprocess.Popen(
          [sys.executable, str(script), str(p)],
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          env=env,
          cwd=REPO,
      )
      for p in range(2)
  ]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
  a, b = (r["data"] for r in results)
  assert a["shard"] == [0, 2] and b["shard"] == [1, 2]
  assert a["ids"] and b["ids"] and not set(a["ids"]) & set(b["ids"])
  assert set(a["ids"]) | set(b["ids"]) <= set(range(20)) and len(set(a["ids"]) | set(b["ids"])) >= 14
  assert a["shapes"]["input_ids"] == [4, 96] and a["shapes"]["frames"] == [4, 6, 56, 56, 3]
  c, d = (r["context"] for r in results)
  assert c["shard"] == d["shard"] == [0, 1] and c["ids"] == d["ids"]  # same rows on both hosts
  assert c["shapes"]["input_ids"] == [4, 96]
