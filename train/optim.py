"""Learning-rate schedule, trainable/frozen selection and per-module learning rates, by regex over paths.

Frozen parameters are not given to the optimizer at all: they get no gradient, no Adam moments
(stage 1 of the 8B model then carries optimizer state for the projector only) and stay
bit-identical. Paths are the "/"-joined NNX paths, e.g. `vision_tower/blocks/mlp/w1/kernel`.
"""

from __future__ import annotations

import re

import jax
import optax

from train.config import OptimConfig


def is_trainable(cfg: OptimConfig, path: str) -> bool:
  return any(re.fullmatch(r, path) for r in cfg.trainable) and not any(re.fullmatch(r, path) for r in cfg.frozen)


def lr_scale(cfg: OptimConfig, path: str) -> float:
  for regex, scale in cfg.lr_scales:
    if re.fullmatch(regex, path):
      return float(scale)
  return 1.0


def check_selection(cfg: OptimConfig, paths: list[str]) -> None:
  """Each regex must match some parameter: a typo would otherwise silently freeze or train the wrong thing."""
  from kangaroo_jax.config import ConfigError

  for name, regexes in (
      ("trainable", cfg.trainable),
      ("frozen", cfg.frozen),
      ("lr_scales", tuple(r for r, _ in cfg.lr_scales)),
  ):
    for r in regexes:
      if not any(re.fullmatch(r, p) for p in paths):
        raise ConfigError(f"optim.{name}: regex {r!r} matches no parameter path (e.g. {paths[0]!r})")
  if not any(is_trainable(cfg, p) for p in paths):
    raise ConfigError("optim.trainable/frozen: no parameter is left trainable")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine to lr * min_lr_ratio at total_steps."""
  warmup = min(cfg.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.lr * cfg.min_lr_ratio,
  )


def _decays(path: str) -> bool:
  # Norm scales, biases, position / class embeddings are not decayed (standard AdamW practice).
  return path.endswith("kernel") or path.endswith("embedding")


def make_optimizer(cfg: OptimConfig, total_steps: int, trainable_paths: list[str]):
  """optax transform over the trainable params (nested dict) -> (tx, labels_fn).

  clip by global norm (over trainable grads) -> AdamW per lr-scale group; labels come from the
  paths so groups with equal scale share one transform.
  """
  from train.params import unflatten

  base = schedule(cfg, total_steps)
  scales = sorted({lr_scale(cfg, p) for p in trainable_paths})
  labels = unflatten({p: f"lr_x{lr_scale(cfg, p):g}" for p in trainable_paths})

  def decay_mask(params):
    # A callable, because multi_transform hands each group a tree with the other groups masked out.
    return jax.tree_util.tree_map_with_path(lambda path, _: _decays("/".join(str(k.key) for k in path)), params)

  def group(scale: float):
    return optax.adamw(
        lambda step: base(step) * scale,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )

  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.multi_transform({f"lr_x{s:g}": group(s) for s in scales}, labels))
  return optax.chain(*parts), base
