"""Stacks of identical layers: created with a leading `layers` axis, run with `nnx.scan`.

Scanning compiles one layer body instead of N, which keeps compile time flat in depth; the
stacked axis is named `layers` so sharding rules (and the converter) see it explicitly.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

M = TypeVar("M", bound=nnx.Module)

# Keyed by kangaroo_jax.run_options.REMAT_POLICIES other than "none" (tests/test_config.py checks they agree).
_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}


def create_stack(make_layer: Callable[[nnx.Rngs], M], num_layers: int, rngs: nnx.Rngs) -> M:
  """Builds `num_layers` independently initialised layers as one module with stacked params."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
  def make(layer_rngs):
    return make_layer(layer_rngs)

  return make(rngs)


def run_stack(stack: nnx.Module, carry, body: Callable, remat_policy: str = "none"):
  """carry = body(layer, carry) for each layer of `stack` in order, under nnx.scan.

  `remat_policy`: "none" keeps all activations; "full" recomputes the whole layer in the backward
  pass; "dots" / "dots_no_batch" save matmul outputs only.
  """

  def step(c, layer):
    return body(layer, c)

  if remat_policy != "none":
    try:
      policy = _POLICIES[remat_policy]
    except KeyError:
      raise ValueError(
          f"unknown remat_policy {remat_policy!r}; expected 'none' or one of {sorted(_POLICIES)}"
      ) from None
    step = nnx.remat(step, policy=policy, prevent_cse=False)
  scanned = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=_LAYERS_AXIS)
  return scanned(carry, stack)
