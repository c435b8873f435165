"""EVA02 vision tower vs timm's `Eva` on a tiny random EVA02-style config (float32, CPU).

timm is built directly (no downloads, no pretrained weights). timm imports torchvision at import
time and torchvision cannot be installed here, so a test-only stand-in (tests/_stubs/torchvision)
is put on sys.path in this module only while timm is imported, then removed again.

timm settings (EVA02-CLIP style): rope_type='cat' (interleaved pairs, rope_rotate_half=False),
ref_feat_shape = 2 (the RoPE pre-training grid; the frame grid is 4, so the rescaled positions
matter), swiglu_mlp + scale_mlp (SwiGLU with fc1_g / fc1_x / norm / fc2), scale_attn_inner
(attn.norm), qkv_fused=False with qkv_bias (q_proj / v_proj biases, k_proj without), LayerNorm
eps 1e-6, class token, abs pos embed, no layer scale, num_classes=0, final norm on (no fc_norm).
Off the trained size, timm (dynamic_img_size=True) resizes pos_embed with
`resample_abs_pos_embed` defaults: F.interpolate bicubic, antialias=True, align_corners=None.
"""

import functools
import os
import sys

_STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_stubs")
if _STUBS not in sys.path:
  sys.path.insert(0, _STUBS)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from timm.models.eva import Eva  # noqa: E402

# Take the stand-in away again: other tests in this process (transformers) must not see a torchvision.
sys.path.remove(_STUBS)
for _name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
  del sys.modules[_name]

from kangaroo_jax.config import VisionConfig  # noqa: E402
from kangaroo_jax.models import eva_vit  # noqa: E402
from kangaroo_jax.models.eva_vit import EvaVisionTransformer  # noqa: E402
from kangaroo_jax.run_options import RunOptions  # noqa: E402
from tests.helpers import max_rel_error, torch_state_numpy  # noqa: E402
from tools.convert_weights.assemble import load_released_tensors  # noqa: E402

TOL = 1e-4
IMG, PATCH, REF_GRID = 56, 14, 2  # trained grid 4x4, RoPE pre-training grid 2x2
WIDTH, DEPTH, HEAD_DIM = 48, 3, 16
MLP_RATIO = 2.6667  # timm: hidden = int(dim * mlp_ratio) for the SwiGLU with scale_mlp
MLP_HIDDEN = int(WIDTH * MLP_RATIO)  # 128


def _timm_eva(dynamic_img_size: bool) -> Eva:
  return Eva(
      img_size=IMG,
      patch_size=PATCH,
      in_chans=3,
      num_classes=0,
      embed_dim=WIDTH,
      depth=DEPTH,
      num_heads=WIDTH // HEAD_DIM,
      qkv_bias=True,
      qkv_fused=False,
      mlp_ratio=MLP_RATIO,
      swiglu_mlp=True,
      scale_mlp=True,
      scale_attn_inner=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
      init_values=None,
      class_token=True,
      use_abs_pos_emb=True,
      use_rot_pos_emb=True,
      rope_type="cat",
      rope_rotate_half=False,
      ref_feat_shape=REF_GRID,
      use_fc_norm=False,
      use_post_transformer_norm=True,
      dynamic_img_size=dynamic_img_size,
  ).eval()


def _our_config(tap: str, antialias: bool = True) -> VisionConfig:
  return VisionConfig(
      image_size=IMG,
      patch_size=PATCH,
      num_channels=3,
      width=WIDTH,
      num_layers=DEPTH,
      head_width=HEAD_DIM,
      mlp_hidden=MLP_HIDDEN,
      layer_norm_eps=1e-6,
      pt_hw_seq_len=REF_GRID,
      rope_theta=10000.0,
      feature_tap=tap,
      pos_embed_interpolation="bicubic",
      pos_embed_antialias=antialias,
  )


_RENAMES = (  # timm suffix -> released EVA-CLIP suffix
    (".attn.q_proj.bias", ".attn.q_bias"),
    (".attn.v_proj.bias", ".attn.v_bias"),
    (".attn.norm.", ".attn.inner_attn_ln."),
    (".mlp.fc1_g.", ".mlp.w1."),  # gate: goes through SiLU
    (".mlp.fc1_x.", ".mlp.w2."),
    (".mlp.norm.", ".mlp.ffn_ln."),
    (".mlp.fc2.", ".mlp.w3."),
)


def timm_to_released(state: dict) -> dict:
  """timm Eva state_dict (numpy) -> released EVA-CLIP names under `vision_tower.`."""
  out = {}
  for key, value in state.items():
    name = "." + key
    for old, new in _RENAMES:
      name = name.replace(old, new)
    out["vision_tower" + name] = value
  return out


@functools.lru_cache(maxsize=None)
def _timm_pair():
  """(static-size timm model, dynamic-size timm model) with identical random parameters."""
  torch.manual_seed(0)
  static = _timm_eva(dynamic_img_size=False)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in static.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2 and name not in ("cls_token", "pos_embed"):  # Linear / Conv: ~unit-variance outputs
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif name.endswith("weight"):  # norm scales
        p.copy_(1.0 + 0.2 * noise)
      else:  # biases, cls_token, pos_embed
        p.copy_(0.3 * noise)
  dynamic = _timm_eva(dynamic_img_size=True)
  missing, unexpected = dynamic.load_state_dict(static.state_dict(), strict=True)
  assert not missing and not unexpected
  return static, dynamic


@functools.lru_cache(maxsize=None)
def _ours(tap: str, antialias: bool = True) -> EvaVisionTransformer:
  static, _ = _timm_pair()
  model = EvaVisionTransformer(_our_config(tap, antialias), RunOptions(), rngs=nnx.Rngs(0))  # float32
  tensors = timm_to_released(torch_state_numpy(static))
  assert all(k.startswith("vision_tower.") for k in tensors)
  report = load_released_tensors(model, tensors, prefix=("vision_tower",))
  assert report.mapped == len(tensors) == 6 + 21 * DEPTH, (report.mapped, len(tensors))
  assert not report.ignored
  return model


def _frames(h: int, w: int, n: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(n, h, w, 3).astype(np.float32)


def _timm_taps(model: Eva, frames: np.ndarray) -> dict:
  """timm's block loop run by hand: {tap: [n, patches, width]} with the CLS token dropped."""
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    h = model.patch_embed(x)
    h, rope = model._pos_embed(h)
    h = model.norm_pre(h)
    outs = []
    for blk in model.blocks:
      outs.append(h)
      h = blk(h, rope=rope)
    post = model.forward_features(x)
    manual_post = model.norm(h)
  return {
      "penultimate": outs[-1][:, 1:].numpy(),
      "last_prenorm": h[:, 1:].numpy(),
      "last_postnorm": post[:, 1:].numpy(),
      "_manual_postnorm": manual_post[:, 1:].numpy(),
  }


def _check_taps(timm_model: Eva, frames: np.ndarray, label: str):
  ref = _timm_taps(timm_model, frames)
  # The hand-run loop is timm's forward_features up to the final norm.
  assert max_rel_error(ref["_manual_postnorm"], ref["last_postnorm"]) < 1e-6
  errs = {}
  for tap in ("last_prenorm", "last_postnorm", "penultimate"):
    got = np.asarray(_ours(tap)(jnp.asarray(frames)))
    errs[tap] = max_rel_error(got, ref[tap])
    print(f"eva parity {label} {tap}: {errs[tap]:.2e}")
  assert all(e <= TOL for e in errs.values()), errs


def test_eva_features_match_timm_at_trained_size():
  static, _ = _timm_pair()
  _check_taps(static, _frames(IMG, IMG), f"{IMG}x{IMG}")


@pytest.mark.parametrize("hw", [(70, 84), (84, 84), (42, 56)], ids=["70x84", "84x84", "42x56"])
def test_eva_features_match_timm_at_other_sizes(hw):
  """timm dynamic_img_size: pos_embed resampled (bicubic, antialias) and RoPE rebuilt for the new grid."""
  _, dynamic = _timm_pair()
  _check_taps(dynamic, _frames(*hw, seed=1), f"{hw[0]}x{hw[1]}")


def _half_split_rope(x, cos, sin):
  """The wrong (Llama-style) rotation layout, for the negative control."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, None, :] + rotated * sin[:, None, :]


def _no_rope_tables(gh, gw, head_dim, pt_seq_len, theta=10000.0):
  n = gh * gw
  return np.ones((n, head_dim), np.float32), np.zeros((n, head_dim), np.float32)


@pytest.mark.parametrize("patch", ["no_rope", "half_split", "no_rescale"])
def test_eva_rope_negative_control(monkeypatch, patch):
  """Breaking the RoPE (dropped, wrong layout, or positions not rescaled to the pre-training grid) must show."""
  static, _ = _timm_pair()
  frames = _frames(IMG, IMG, seed=2)
  ref = _timm_taps(static, frames)["last_prenorm"]
  model = _ours("last_prenorm")
  assert max_rel_error(np.asarray(model(jnp.asarray(frames))), ref) <= TOL
  if patch == "no_rope":
    monkeypatch.setattr(eva_vit, "eva_rope_tables", _no_rope_tables)
  elif patch == "half_split":
    monkeypatch.setattr(eva_vit, "apply_interleaved_rope", _half_split_rope)
  else:
    real = eva_vit.eva_rope_tables
    monkeypatch.setattr(
        eva_vit, "eva_rope_tables", lambda gh, gw, hd, pt, theta=10000.0: real(gh, gw, hd, max(gh, gw), theta)
    )
  err = max_rel_error(np.asarray(model(jnp.asarray(frames))), ref)
  print(f"eva parity negative control {patch}: {err:.2e}")
  assert err > 1e-3, err


def test_eva_pos_embed_resize_negative_control():
  """timm resizes pos_embed with antialias=True even when upsampling; the plain bicubic kernel must not pass."""
  _, dynamic = _timm_pair()
  frames = _frames(84, 84, seed=3)
  ref = _timm_taps(dynamic, frames)["last_prenorm"]
  assert max_rel_error(np.asarray(_ours("last_prenorm")(jnp.asarray(frames))), ref) <= TOL
  err = max_rel_error(np.asarray(_ours("last_prenorm", antialias=False)(jnp.asarray(frames))), ref)
  print(f"eva parity negative control pos_embed antialias=False: {err:.2e}")
  assert err > 1e-3, err
