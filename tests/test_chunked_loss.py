"""The vocabulary-chunked loss equals the plain one (values and gradients) and never builds full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import max_rel_error
from train.loss import chunked_cross_entropy, vocab_chunks


def _inputs(b=2, l=12, d=16, v=30, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, l, d)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(d, v)).astype(np.float32) * 0.3)
  t = jnp.asarray(rng.integers(0, v, size=(b, l)).astype(np.int32))
  mask = jnp.asarray((rng.random((b, l)) > 0.3).astype(np.float32))
  return h, w, t, mask


def _plain(h, w, t, mask):
  logits = jnp.einsum("bld,dv->blv", h, w, precision=jax.lax.Precision.HIGHEST)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
  return jnp.sum(ce * mask), jnp.sum(mask)


@pytest.mark.parametrize("chunks", [1, 4, 8])
def test_chunked_loss_matches_plain_values_and_grads(chunks):
  h, w, t, mask = _inputs()
  got = chunked_cross_entropy(h, w, t, mask, dtype=jnp.float32, num_chunks=chunks)
  want = _plain(h, w, t, mask)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0])) and float(got[1]) == float(want[1])
  g = jax.grad(
      lambda h, w: chunked_cross_entropy(h, w, t, mask, dtype=jnp.float32, num_chunks=chunks)[0], argnums=(0, 1)
  )(h, w)
  gw = jax.grad(lambda h, w: _plain(h, w, t, mask)[0], argnums=(0, 1))(h, w)
  for a, b in zip(g, gw):
    assert max_rel_error(a, b) <= 1e-5


def test_vocab_chunks_divide_the_vocab():
  assert vocab_chunks(128256, 8) == 8 and vocab_chunks(30, 4) == 3 and vocab_chunks(7, 8) == 7


def test_no_full_logits_in_the_compiled_gradient():
  h, w, t, mask = _inputs(l=64, v=4096)
  hlo = (
      jax.jit(
          jax.grad(
              lambda h, w: chunked_cross_entropy(h, w, t, mask, dtype=jnp.float32, num_chunks=8)[0], argnums=(0, 1)
          )
      )
      .lower(h, w)
      .compile()
      .as_text()
  )
  assert "f32[2,64,4096]" not in hlo and "f32[2,64,512]" in hlo
