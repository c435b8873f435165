"""Presets: released parameter counts and shapes (abstract init), validation, dict round trip; run options
(validation, one spelling of each choice list) and loading a kangaroo_config.json written before the split."""

import dataclasses
import json
import math
import os
import typing

import jax
import pytest
from flax import nnx

import kangaroo_jax
from kangaroo_jax import run_options
from kangaroo_jax.config import (ConfigError, KangarooConfig, LlamaConfig, ProjectorConfig, RopeScaling, VisionConfig)
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.run_options import RunOptions


def _num_params(module) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def abstract_8b():
  cfg = kangaroo_jax.preset("kangaroo-8b")
  return nnx.eval_shape(lambda: Kangaroo(cfg, rngs=nnx.Rngs(0)))


def test_8b_parameter_counts(abstract_8b):
  m = abstract_8b
  assert _num_params(m.llm) == 8_030_261_248
  assert _num_params(m.vision_tower) == 304_104_384
  assert _num_params(m.mm_projector) == 20_979_712  # 1024*4096 + 4096 + 4096*4096 + 4096
  assert _num_params(m.patchify) == 0  # avg patchify + sinusoidal TPE


def test_8b_key_shapes(abstract_8b):
  m = abstract_8b
  layers = m.llm.model.layers
  assert layers.self_attn.q_proj.kernel.shape == (32, 4096, 4096)
  assert layers.self_attn.k_proj.kernel.shape == (32, 4096, 1024)
  assert layers.self_attn.v_proj.kernel.shape == (32, 4096, 1024)
  assert layers.mlp.gate_proj.kernel.shape == (32, 4096, 14336)
  assert m.llm.model.embed_tokens.embedding.shape == (128256, 4096)
  assert m.llm.lm_head.kernel.shape == (4096, 128256)
  assert m.vision_tower.pos_embed.shape == (1025, 1024)
  assert m.vision_tower.patch_embed_kernel.shape == (14, 14, 3, 1024)
  assert m.mm_projector.linear_1.kernel.shape == (1024, 4096)
  assert m.mm_projector.linear_2.kernel.shape == (4096, 4096)


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: LlamaConfig(num_heads=6, num_kv_heads=4), "num_kv_heads"),
        (lambda: VisionConfig(width=1000, head_width=64), "head_width"),
        (lambda: VisionConfig(feature_tap="middle"), "feature_tap"),
        (lambda: KangarooConfig(visual_token_id=0), "visual_token_id"),
        (lambda: KangarooConfig(visual_token_id=5), "visual_token_id"),
        (lambda: ProjectorConfig(patchify="maxpool"), "patchify"),
        (lambda: RunOptions(attention_block=0), "RunOptions.attention_block"),
        (lambda: RunOptions(attention_impl="flash"), "RunOptions.attention_impl"),
        (lambda: RunOptions(vision_attention_impl="ring"), "RunOptions.vision_attention_impl"),
        (lambda: RunOptions(attention_kernel="triton"), "RunOptions.attention_kernel"),
        (lambda: RunOptions(remat_policy="some"), "RunOptions.remat_policy"),
        (lambda: RunOptions(compute_dtype="int8"), "RunOptions.compute_dtype"),
        (lambda: RunOptions(ulysses_degree=-1), "RunOptions.ulysses_degree"),
        (lambda: RunOptions(vision_chunk_frames=1.5), "RunOptions.vision_chunk_frames"),
        (lambda: RunOptions(load_balance="yes"), "RunOptions.load_balance"),
        (lambda: RunOptions.from_dict({"scan_layers": True}, where="run"), "run.scan_layers"),
    ],
    ids=[
        "kv_heads",
        "vision_head_width",
        "feature_tap",
        "visual_id_zero",
        "visual_id_positive",
        "patchify",
        "attention_block",
        "attention_impl",
        "vision_attention_impl",
        "attention_kernel",
        "remat_policy",
        "compute_dtype",
        "ulysses_degree",
        "vision_chunk_frames",
        "load_balance",
        "unknown_run_option",
    ],
)
def test_invalid_config_names_field(build, field):
  with pytest.raises(ConfigError, match=field):
    build()


def test_unknown_preset():
  with pytest.raises(ConfigError, match="kangaroo-70b"):
    kangaroo_jax.preset("kangaroo-70b")


def test_grid_for_rejects_non_multiple_frames():
  v = VisionConfig()
  assert v.grid_for(448, 224) == (32, 16)
  with pytest.raises(ConfigError, match="height 450.*patch_size"):
    v.grid_for(450, 448)
  with pytest.raises(ConfigError, match="width 100.*patch_size"):
    v.grid_for(448, 100)


@pytest.mark.parametrize("name", ["tiny", "kangaroo-8b"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no_rope_scaling", "rope_scaling"])
def test_dict_round_trip(name, scaled):
  cfg = kangaroo_jax.preset(name)
  if scaled:
    cfg = cfg.replace(
        llm=dataclasses.replace(cfg.llm, rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64))
    )
  back = KangarooConfig.from_dict(cfg.to_dict())
  assert back == cfg
  assert isinstance(back.llm.eos_token_ids, tuple)
  assert (back.llm.rope_scaling is not None) == scaled
  assert KangarooConfig.from_dict(json.loads(cfg.to_json())) == cfg  # JSON turns tuples into lists


def test_from_dict_unknown_key_is_named():
  d = kangaroo_jax.preset("tiny").to_dict()
  d["vision"]["patch_sz"] = 14
  with pytest.raises(ConfigError, match="vision.patch_sz"):
    KangarooConfig.from_dict(d)
  d = kangaroo_jax.preset("tiny").to_dict()
  d["bogus_top_level"] = 1
  with pytest.raises(ConfigError, match="bogus_top_level"):
    KangarooConfig.from_dict(d)


def test_shapes_and_run_options_do_not_overlap():
  shape_keys = set(kangaroo_jax.preset("kangaroo-8b").to_dict())
  assert shape_keys == {"llm", "vision", "projector", "visual_token_id"}
  assert not shape_keys & set(RunOptions.field_names())


def test_each_choice_list_is_spelled_once():
  """The tuples the checks use come from the Literals, and the registries dispatch exactly those names."""
  from kangaroo_jax.attention import _IMPLS
  from kangaroo_jax.attention.context_parallel import KERNELS
  from kangaroo_jax.layers.scan import _POLICIES

  hints = typing.get_type_hints(RunOptions)
  for field, choices in (
      ("attention_impl", run_options.ATTENTION_IMPLS),
      ("vision_attention_impl", run_options.VISION_ATTENTION_IMPLS),
      ("attention_kernel", run_options.ATTENTION_KERNELS),
      ("remat_policy", run_options.REMAT_POLICIES),
      ("param_dtype", run_options.DTYPE_NAMES),
      ("compute_dtype", run_options.DTYPE_NAMES),
  ):
    assert typing.get_args(hints[field]) == choices, field
  assert tuple(_IMPLS) == run_options.ATTENTION_IMPLS
  assert set(run_options.VISION_ATTENTION_IMPLS) <= set(_IMPLS)
  assert tuple(KERNELS) == run_options.ATTENTION_KERNELS
  assert ("none", *_POLICIES) == run_options.REMAT_POLICIES


def test_training_needs_float32_master_weights():
  RunOptions(compute_dtype="bfloat16").check_for_training()
  with pytest.raises(ConfigError, match=r"^run.param_dtype: training keeps float32 master weights"):
    RunOptions(param_dtype="bfloat16").check_for_training()


def _old_style_folder(tmp_path, **extra):
  """A tiny checkpoint whose kangaroo_config.json is in the layout written before shapes and run options split."""
  from kangaroo_jax.pretrained import CONFIG_FILE, save_pretrained

  cfg = kangaroo_jax.preset("tiny")
  path = save_pretrained(Kangaroo(cfg, rngs=nnx.Rngs(0)), None, str(tmp_path / "ckpt"))
  old = dict(
      cfg.to_dict(),
      param_dtype="float32",
      compute_dtype="bfloat16",
      attention_impl="ring",
      attention_kernel="xla",
      attention_block=256,
      ulysses_degree=0,
      load_balance=False,
      remat_policy="full",
      vision_chunk_frames=0,
      scan_layers=True,
      logits_fp32=True,
      **extra,
  )
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(old, f)
  return cfg, path


def test_old_style_config_json_loads_its_run_options(tmp_path):
  """Run-option keys of an old kangaroo_config.json become that folder's run defaults (overrides win);
  scan_layers, which nothing ever read, is dropped; the shapes load as before."""
  from kangaroo_jax.pretrained import load_config, run_defaults

  cfg, path = _old_style_folder(tmp_path)
  assert load_config(path) == cfg
  want = RunOptions(
      compute_dtype="bfloat16",
      attention_impl="ring",
      attention_kernel="xla",
      attention_block=256,
      load_balance=False,
      remat_policy="full",
  )
  assert run_defaults(path) == want
  model, _ = kangaroo_jax.from_pretrained(path)
  assert model.cfg == cfg and model.run == want and model.llm.model.dtype == jax.numpy.bfloat16
  model, _ = kangaroo_jax.from_pretrained(path, attention_impl="reference", compute_dtype=None)
  assert model.run == want.replace(attention_impl="reference")
  with pytest.raises(ConfigError, match=r"from_pretrained.attention_imp\b"):
    kangaroo_jax.from_pretrained(path, attention_imp="ring")


def test_old_style_config_json_with_an_unknown_key_is_a_one_line_error(tmp_path):
  from kangaroo_jax.pretrained import CheckpointError, load_config

  _, path = _old_style_folder(tmp_path, attention_heads=4)
  with pytest.raises(
      CheckpointError, match=r"kangaroo_config.json: unknown config key\(s\) \['attention_heads'\]"
  ) as e:
    load_config(path)
  assert "\n" not in str(e.value)


def test_export_writes_shapes_only_and_loads_in_the_stored_dtype(tmp_path):
  from kangaroo_jax.pretrained import CONFIG_FILE, save_pretrained

  cfg = kangaroo_jax.preset("tiny")
  path = save_pretrained(Kangaroo(cfg, RunOptions(param_dtype="bfloat16"), rngs=nnx.Rngs(0)), None, str(tmp_path / "c"))
  with open(os.path.join(path, CONFIG_FILE)) as f:
    assert set(json.load(f)) == set(cfg.to_dict())
  model, _ = kangaroo_jax.from_pretrained(path)
  assert model.run == RunOptions(param_dtype="bfloat16", compute_dtype="bfloat16")
  assert model.llm.lm_head.kernel.dtype == jax.numpy.bfloat16
  model, _ = kangaroo_jax.from_pretrained(path, run=RunOptions(remat_policy="full"))
  assert model.run == RunOptions(remat_policy="full") and model.llm.lm_head.kernel.dtype == jax.numpy.float32


def _train_config(**sections):
  import ml_collections

  from configs.common import base
  from train.config import from_configdict

  c = base("t")
  c.model.preset = "tiny"
  c.data.update(source="synthetic", frame_size=56)
  for key, value in sections.items():
    node, *path = key.split(".")
    target = c[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
  return from_configdict(ml_collections.ConfigDict(c.to_dict()))


def test_training_config_has_a_run_section_validated_by_field():
  cfg = _train_config(**{"run.attention_impl": "ring", "run.remat_policy": "full"})
  assert cfg.run == RunOptions(attention_impl="ring", remat_policy="full")
  assert not hasattr(cfg.model, "attention_impl")
  for key, value, match in (
      ("run.attention_impl", "flash", r"^run.attention_impl: got 'flash', expected one of"),
      ("run.param_dtype", "bfloat16", r"^run.param_dtype: training keeps float32 master"),
      (
          "model.overrides",
          {"remat_policy": "full"},
          r"^model.overrides.remat_policy: a run option, not a model shape; set run.remat_policy",
      ),
  ):
    with pytest.raises(ConfigError, match=match):
      _train_config(**{key: value})


def test_training_config_rejects_an_unknown_run_option():
  import ml_collections

  from configs.common import base
  from train.config import from_configdict

  c = base("t").to_dict()
  c["model"]["preset"] = "tiny"
  c["data"].update(source="synthetic", frame_size=56)
  c["run"]["scan_layers"] = True
  with pytest.raises(ConfigError, match=r"^run.scan_layers: unknown run option"):
    from_configdict(ml_collections.ConfigDict(c))
