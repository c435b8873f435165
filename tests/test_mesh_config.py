"""Mesh construction and config-time validation: clear errors for every invalid combination."""

import jax
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax.config import preset
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.model_tree import init_sharded
from kangaroo_jax.parallel.mesh import MeshConfig, MeshError, make_mesh, resolve_shape
from kangaroo_jax.parallel.validate import assert_params_sufficiently_sharded, validate_mesh_for_model


def test_minus_one_fills_the_remaining_devices():
  assert resolve_shape(MeshConfig(fsdp=-1, tensor=2), 8) == ((1, 4, 1, 2), (1, 1, 1, 1))
  assert resolve_shape(MeshConfig(data=-1, fsdp=2, dcn_data=2), 8) == ((2, 2, 1, 1), (2, 1, 1, 1))
  mesh = make_mesh(MeshConfig(fsdp=2, context=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_dcn_axes_are_slice_major():
  mesh = make_mesh(MeshConfig(data=1, fsdp=-1, dcn_data=2))  # 2 "slices" of 4 devices
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}


@pytest.mark.parametrize(
    "cfg,match",
    [
        (MeshConfig(fsdp=-1, context=-1), "only one mesh axis may be -1"),
        (MeshConfig(fsdp=3, context=-1), "not divisible by the fixed axes"),
        (MeshConfig(fsdp=4, context=4), "needs 16 devices per slice, but 8 are available"),
        (MeshConfig(fsdp=0), "expected a positive size or -1"),
        (MeshConfig(fsdp=-1, dcn_data=3), "cannot be split into 3 slices"),
    ],
)
def test_invalid_mesh_configs(cfg, match):
  with pytest.raises(MeshError, match=match):
    make_mesh(cfg)


def test_model_mesh_validation_lists_every_problem():
  from kangaroo_jax.run_options import RunOptions

  cfg, run = preset("tiny"), RunOptions(attention_impl="ring")  # heads 4, kv 2, vocab 512
  validate_mesh_for_model(cfg, run, {"fsdp": 2, "context": 2, "tensor": 2}, batch=4, seq_len=32, frames_per_row=4)
  with pytest.raises(MeshError) as err:
    validate_mesh_for_model(cfg, run, {"fsdp": 2, "context": 4, "tensor": 4}, batch=3, seq_len=36, frames_per_row=3)
  msg = str(err.value)
  for part in (
      "global batch 3 must be divisible by data*fsdp = 2",
      "llm.num_kv_heads 2 must be divisible by tensor=4",
      "sequence length 36 must be divisible by 8 (2*context for zigzag",
      "frames per row 3 must be a multiple of ProjectorConfig.temporal_patch",
  ):
    assert part in msg, (part, msg)
  with pytest.raises(MeshError, match="needs attention_impl 'ring', 'all_gather' or 'usp'"):
    validate_mesh_for_model(preset("tiny"), RunOptions(), {"context": 2}, batch=2, seq_len=32)


def test_sharded_init_and_sufficient_sharding_check():
  mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
  model = init_sharded(lambda: Kangaroo(preset("tiny"), rngs=nnx.Rngs(0)), mesh)
  assert_params_sufficiently_sharded(model, tolerance=0.02)
  with jax.set_mesh(mesh):  # also works from inside a mesh context
    assert_params_sufficiently_sharded(init_sharded(lambda: Kangaroo(preset("tiny"), rngs=nnx.Rngs(0)), mesh))
  replicated = make_mesh(MeshConfig(data=8, fsdp=1))  # nothing maps to `data` for params
  model = init_sharded(lambda: Kangaroo(preset("tiny"), rngs=nnx.Rngs(0)), replicated)
  with pytest.raises(MeshError, match="replicated on every device") as e:
    assert_params_sufficiently_sharded(model)
  # The error names the biggest offenders by path, shape and size: the tiny model's [64, 512] head first.
  assert "largest: llm/lm_head/kernel [64, 512] 128.0 KiB, llm/model/embed_tokens/embedding" in str(e.value)
