"""The pure train step: masked per-token loss, gradient accumulation, NaN/inf guard, optimizer update.

State (a plain dict pytree, what the checkpoint stores):
  step              int32 []   steps attempted (including skipped ones)
  params            nested dict of the trainable float32 master weights
  frozen            nested dict of the frozen weights (never updated, never differentiated)
  opt_state         optax state over `params`
  nonfinite_streak  int32 []   non-finite steps in a row (the loop stops at optim.max_nonfinite)
  skipped           int32 []   non-finite steps in total

Batch (global jax.Arrays, docs/pipeline_contracts.md section 3): input_ids, targets, loss_mask,
positions, segment_ids [B, L]; frames uint8 [B, F, H, W, 3]; timestamps [B, F]; num_frames [B].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kangaroo_jax.data.global_batch import BATCH_AXES
from kangaroo_jax.model_tree import flatten
from kangaroo_jax.parallel.rules import shard
from train.loss import chunked_cross_entropy
from train.params import ModelDef, combine

State = dict[str, Any]
# Llama-3's 128,256-entry vocabulary in 8 chunks of 16,032 logits per token.
LOSS_VOCAB_CHUNKS = 8
Batch = dict[str, jax.Array]


def init_state(params: dict, frozen: dict, tx: optax.GradientTransformation) -> State:
  zero = jnp.zeros((), jnp.int32)
  return dict(step=zero, params=params, frozen=frozen, opt_state=tx.init(params), nonfinite_streak=zero, skipped=zero)


def loss_sums(
    model_def: ModelDef, normalize: Callable, params: dict, frozen: dict, batch: Batch
) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies, number of loss tokens), both float32 [].

  The LM head runs inside the loss, a vocabulary chunk at a time (train/loss.py): the full
  [tokens, vocab] logits never exist.
  """
  model = model_def.merge(combine(params, frozen))
  frames = normalize(batch["frames"])  # uint8 on the wire, normalised on device
  hidden = model.hidden_states(
      batch["input_ids"], frames, batch["timestamps"], positions=batch["positions"], segment_ids=batch["segment_ids"]
  )
  return chunked_cross_entropy(
      hidden,
      model.llm.lm_head.kernel[...],
      batch["targets"],
      batch["loss_mask"],
      dtype=model_def.run.dtype,
      num_chunks=LOSS_VOCAB_CHUNKS,
  )


def _micro_batches(batch: Batch, accum: int) -> Batch:
  """[B, ...] -> [accum, B/accum, ...]; micro-batch i takes rows i, i+accum, ... so that each one is
  spread evenly over the devices that hold contiguous row blocks."""

  def split(x):
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def _constrain(batch: Batch) -> Batch:
  return {k: shard(v, BATCH_AXES[k]) if k in BATCH_AXES else v for k, v in batch.items()}


def grads_and_loss(
    model_def: ModelDef, normalize: Callable, params: dict, frozen: dict, batch: Batch, accum: int
) -> tuple[dict, jax.Array, jax.Array]:
  """Gradient of the per-token mean loss over the whole (global) batch, accumulated over `accum`
  micro-batches: sums of losses and gradients are carried and divided by the total token count once,
  so 2 x B accumulated equals one step of 2B (up to float summation order).

  Returns: (grads like params, mean loss [], loss tokens []).
  """
  value_and_grad = jax.value_and_grad(lambda p, b: loss_sums(model_def, normalize, p, frozen, b), has_aux=True)
  if accum == 1:
    (total, count), grads = value_and_grad(params, _constrain(batch))
  else:

    def body(carry, micro):
      g_acc, total_acc, count_acc = carry
      (total, count), g = value_and_grad(params, _constrain(micro))
      return (jax.tree.map(jnp.add, g_acc, g), total_acc + total, count_acc + count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, total, count), _ = jax.lax.scan(body, init, _micro_batches(batch, accum))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
  return grads, total / denom, count


def make_train_step(
    model_def: ModelDef, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, normalize: Callable, accum: int
) -> Callable[[State, Batch], tuple[State, dict]]:
  """The pure step function (jit it with donate_argnums=0)."""

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    grads, loss, count = grads_and_loss(model_def, normalize, state["params"], state["frozen"], batch, accum)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    # A non-finite step leaves params and optimizer state exactly as they were (the step is skipped).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    applied = state["step"] - state["skipped"]  # the optimizer's own count: skipped steps do not advance it
    new_state = dict(
        step=state["step"] + 1,
        params=keep(new_params, state["params"]),
        frozen=state["frozen"],
        opt_state=keep(new_opt, state["opt_state"]),
        nonfinite_streak=jnp.where(finite, 0, state["nonfinite_streak"] + 1).astype(jnp.int32),
        skipped=(state["skipped"] + jnp.where(finite, 0, 1)).astype(jnp.int32),
    )
    metrics = dict(
        loss=loss,
        grad_norm=grad_norm,
        lr=lr_schedule(applied),
        loss_tokens=count,
        tokens=jnp.sum(batch["segment_ids"] > 0),
        frames=jnp.sum(batch["num_frames"]),
        finite=finite,
        skipped=new_state["skipped"],
        nonfinite_streak=new_state["nonfinite_streak"],
    )
    return new_state, metrics

  return train_step


def state_shardings(state_shapes: State, param_sh: dict, frozen_sh: dict, replicated) -> State:
  """Shardings for the state: params by the rules table, each optimizer leaf like the parameter whose path
  ends its own (Adam moments), everything else (counts, scalars) replicated."""
  by_path = flatten(param_sh)

  def leaf_sharding(path, leaf):
    keys = []
    for k in reversed(path):  # the trailing dict keys of an optimizer leaf are its parameter's path
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(str(k.key))
    sh = by_path.get("/".join(reversed(keys)))
    return sh if sh is not None and len(sh.spec) <= leaf.ndim else replicated

  opt_sh = jax.tree_util.tree_map_with_path(leaf_sharding, state_shapes["opt_state"])
  return dict(
      step=replicated,
      params=param_sh,
      frozen=frozen_sh,
      opt_state=opt_sh,
      nonfinite_streak=replicated,
      skipped=replicated,
  )
