"""The full tiny model gives the same logits and loss gradients on any mesh (<= 1e-5, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax.config import preset
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.model_tree import init_sharded
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from kangaroo_jax.run_options import RunOptions
from tests.helpers import max_rel_error

TOL = 1e-5
BATCH, FRAMES, TEXT = 8, 4, 24


def _batch(model, cfg):
  size = cfg.vision.image_size
  n_vis = model.num_visual_tokens(FRAMES, size, size)
  rng = np.random.default_rng(0)
  ids = np.concatenate(
      [np.full((BATCH, n_vis), cfg.visual_token_id), rng.integers(0, cfg.llm.vocab_size, (BATCH, TEXT))], 1
  )  # 8 + 24 = 32 tokens
  pixels = rng.normal(size=(BATCH, FRAMES, size, size, 3)).astype(np.float32)
  ts = np.tile(np.arange(FRAMES, dtype=np.float32) * 0.5, (BATCH, 1))
  targets = np.roll(ids.clip(0), -1, axis=1)
  return tuple(map(jnp.asarray, (ids, pixels, ts, targets)))


def _loss_fn(graphdef, rest):
  def loss(params, ids, pixels, ts, targets):
    logits = nnx.merge(graphdef, params, rest)(ids, pixels, ts)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits

  return loss


def _run(cfg, mesh_cfg, run=RunOptions()):
  create = lambda: Kangaroo(cfg, run, rngs=nnx.Rngs(0))
  if mesh_cfg is None:
    model = create()
    batch = _batch(model, cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    (loss, logits), grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest), has_aux=True))(params, *batch)
    return loss, logits, grads
  mesh = make_mesh(mesh_cfg)
  model = init_sharded(create, mesh)
  batch = _batch(model, cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with jax.set_mesh(mesh):
    (loss, logits), grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest), has_aux=True))(params, *batch)
  return loss, logits, grads


@pytest.fixture(scope="module")
def single_device():
  return _run(preset("tiny"), None)


@pytest.mark.parametrize(
    "impl,mesh_cfg",
    [
        ("reference", MeshConfig(fsdp=8)),
        ("ring", MeshConfig(fsdp=1, context=8)),
        ("ring", MeshConfig(fsdp=2, context=2, tensor=2)),
        ("all_gather", MeshConfig(fsdp=2, context=4)),
    ],
    ids=["fsdp8", "ring_ctx8", "ring_fsdp2_ctx2_tp2", "allgather_fsdp2_ctx4"],
)
def test_logits_and_grads_invariant_to_mesh(single_device, impl, mesh_cfg):
  loss0, logits0, grads0 = single_device
  loss, logits, grads = _run(preset("tiny"), mesh_cfg, RunOptions(attention_impl=impl))
  assert max_rel_error(logits, logits0) <= TOL
  assert abs(float(loss) - float(loss0)) <= TOL * abs(float(loss0))
  flat0 = dict(nnx.to_flat_state(grads0))
  for path, g in nnx.to_flat_state(grads):
    assert max_rel_error(g.get_value(), flat0[path].get_value()) <= TOL, path


def test_ring_with_small_tiles_is_invariant(single_device):
  # 4-token tiles: each device's 16 tokens become 4x4 tiles per ring step, so the model runs the
  # tiled loops, the causal tile skipping inside a shard and the configured block size end to end.
  loss0, logits0, grads0 = single_device
  run = RunOptions(attention_impl="ring", attention_block=4)
  loss, logits, grads = _run(preset("tiny"), MeshConfig(fsdp=2, context=2, tensor=2), run)
  assert max_rel_error(logits, logits0) <= TOL
  flat0 = dict(nnx.to_flat_state(grads0))
  for path, g in nnx.to_flat_state(grads):
    assert max_rel_error(g.get_value(), flat0[path].get_value()) <= TOL, path


@pytest.mark.parametrize(
    "ulysses,mesh_cfg",
    [(2, MeshConfig(fsdp=1, context=8)), (0, MeshConfig(fsdp=2, context=4))],
    ids=["usp_2x4_ctx8", "usp_auto_fsdp2_ctx4"],
)
def test_usp_model_is_invariant(single_device, ulysses, mesh_cfg):
  # The whole model with USP attention (zigzag over the context axis, all-to-all groups of `ulysses`).
  loss0, logits0, grads0 = single_device
  loss, logits, grads = _run(preset("tiny"), mesh_cfg, RunOptions(attention_impl="usp", ulysses_degree=ulysses))
  assert max_rel_error(logits, logits0) <= TOL
  assert abs(float(loss) - float(loss0)) <= TOL * abs(float(loss0))
  flat0 = dict(nnx.to_flat_state(grads0))
  for path, g in nnx.to_flat_state(grads):
    assert max_rel_error(g.get_value(), flat0[path].get_value()) <= TOL, path
