"""The vision tower encoded in frame chunks (a rematerialised scan) equals one pass: values and gradients,
sharded over all devices, and its compiled memory plan shrinks with the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax.config import ConfigError, tiny
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.model_tree import init_sharded
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from kangaroo_jax.run_options import RunOptions
from tests.helpers import max_rel_error


def _model(chunk, mesh):
  run = RunOptions(vision_chunk_frames=chunk)
  return init_sharded(lambda: Kangaroo(tiny(), run, rngs=nnx.Rngs(0)), mesh)


def _frames(b=2, f=8, px=56):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(b, f, px, px, 3)).astype(np.float32)), jnp.tile(
      jnp.arange(f, dtype=jnp.float32), (b, 1)
  )


def _encode_and_grad(model, frames, ts):
  graphdef, state = nnx.split(model)

  def loss(state):
    out = nnx.merge(graphdef, state).encode_frames(frames, ts)
    return jnp.sum(jnp.sin(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  return out, grads


def test_chunked_vision_tower_matches_one_pass():
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  frames, ts = _frames()
  with jax.set_mesh(mesh):
    want, want_g = _encode_and_grad(_model(0, mesh), frames, ts)
    got, got_g = _encode_and_grad(_model(4, mesh), frames, ts)
  assert max_rel_error(got, want) <= 1e-5
  for (path, g), (_, w) in zip(nnx.to_flat_state(got_g), nnx.to_flat_state(want_g)):
    assert max_rel_error(g.get_value(), w.get_value()) <= 1e-5, path


def test_chunks_bound_the_compiled_temp_memory():
  mesh = make_mesh(MeshConfig(fsdp=8))
  frames, ts = _frames(b=1, f=64)
  temps = {}
  with jax.set_mesh(mesh):
    for chunk in (0, 8):
      model = _model(chunk, mesh)
      graphdef, state = nnx.split(model)
      fn = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).encode_frames(frames, ts))))
      temps[chunk] = fn.lower(state).compile().memory_analysis().temp_size_in_bytes
  assert temps[8] < 0.5 * temps[0], temps


def test_chunk_must_divide_the_frames():
  with pytest.raises(ConfigError, match="vision_chunk_frames"):
    RunOptions(vision_chunk_frames=-1)
  mesh = make_mesh(MeshConfig(fsdp=8))
  frames, ts = _frames(b=1, f=6)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="must divide"):
    _model(4, mesh).encode_frames(frames, ts)
