"""The six-stage curriculum in `mode=cpu`: each stage starts from the previous stage's export (`prev=DIR`),
trains only its own modules, and hands its parameters on unchanged through the export."""

import importlib

import ml_collections
import numpy as np

from kangaroo_jax.parallel.mesh import make_mesh
from tests.train_helpers import host_params
from train.config import from_configdict
from train.loop import initial_params, train
from train.optim import is_trainable
from train.params import ModelDef, flatten

STAGES = (
    "stage1_image_pretrain",
    "stage2_video_pretrain",
    "stage3_refinement",
    "stage4_instruction",
    "stage5_long_video_tuning",
    "stage6_long_video",
)
STEPS = 2  # step 1 runs at lr 0 (warmup starts at 0), step 2 moves the trainable parameters


def _stage_config(name: str, prev: str | None):
  arg = f"mode=cpu,steps={STEPS}" + (f",prev={prev}" if prev else "")
  c = importlib.import_module(f"configs.{name}").get_config(arg)
  return from_configdict(ml_collections.ConfigDict(c.to_dict()))


def test_curriculum_stages_chain_through_their_exports(tmp_path):
  prev_dir, prev_params = None, None
  for name in STAGES:
    cfg = _stage_config(name, prev_dir)
    assert cfg.init_from == (f"{prev_dir}/export" if prev_dir else "")
    # What the loop starts from (read back from the previous stage's export) is what that stage ended with.
    init = {
        k: np.asarray(v)
        for k, v in flatten(initial_params(cfg, ModelDef(cfg.model, cfg.run), make_mesh(cfg.mesh))).items()
    }
    if prev_params is not None:
      assert init.keys() == prev_params.keys()
      for k in init:
        assert np.array_equal(init[k], prev_params[k]), (name, k)

    workdir = str(tmp_path / name)
    result = train(cfg, workdir)
    assert result.status == "done" and result.step == STEPS, name
    assert all(np.isfinite(h["loss"]) for h in result.history), (name, result.history)
    final = host_params(result.state)
    trainable = {k for k in final if is_trainable(cfg.optim, k)}
    frozen = set(final) - trainable
    for k in frozen:
      assert np.array_equal(final[k], init[k]), (name, "frozen parameter changed", k)
    moved = [k for k in trainable if not np.array_equal(final[k], init[k])]
    assert moved, (name, "no trainable parameter moved")
    # Every trainable module group of the stage took part (e.g. stage 2 trains the ViT and the projector).
    assert {k.split("/")[0] for k in moved} >= {k.split("/")[0] for k in trainable if "kernel" in k}, name
    prev_dir, prev_params = workdir, final
