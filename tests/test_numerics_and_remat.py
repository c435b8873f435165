"""Remat policies change memory, never values; bf16 compute keeps fp32 master params and stays close to fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kangaroo_jax.config import preset
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.run_options import RunOptions
from tests.helpers import max_rel_error


def _inputs(model, cfg, batch=2, frames=2):
  size = cfg.vision.image_size
  n_vis = model.num_visual_tokens(frames, size, size)
  rng = np.random.default_rng(0)
  ids = np.concatenate(
      [np.full((batch, n_vis), cfg.visual_token_id), rng.integers(0, cfg.llm.vocab_size, (batch, 6))], 1
  )
  pixels = rng.normal(size=(batch, frames, size, size, 3)).astype(np.float32)
  ts = np.tile(np.arange(frames, dtype=np.float32), (batch, 1))
  return jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(ts)


def _loss_and_grads(cfg, inputs, run=RunOptions()):
  model = Kangaroo(cfg, run, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(*inputs)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  return jax.value_and_grad(loss_fn)(params)


@pytest.fixture(scope="module")
def no_remat():
  base = preset("tiny")
  inputs = _inputs(Kangaroo(base, rngs=nnx.Rngs(0)), base)
  return base, inputs, _loss_and_grads(base, inputs)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_policy_gives_identical_gradients(policy, no_remat):
  base, inputs, (loss0, g0) = no_remat
  loss1, g1 = _loss_and_grads(base, inputs, RunOptions(remat_policy=policy))
  assert float(loss0) == pytest.approx(float(loss1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_bf16_compute_with_fp32_params():
  cfg, run = preset("tiny"), RunOptions(compute_dtype="bfloat16", param_dtype="float32")
  model = Kangaroo(cfg, run, rngs=nnx.Rngs(0))
  ref = Kangaroo(cfg, run.replace(compute_dtype="float32"), rngs=nnx.Rngs(0))
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  inputs = _inputs(model, cfg)
  got = model(*inputs)
  assert got.dtype == jnp.float32  # logits_fp32
  err = max_rel_error(np.asarray(got), np.asarray(ref(*inputs)))
  assert 0 < err < 5e-2, err
