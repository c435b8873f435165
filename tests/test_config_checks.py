"""One validation dialect: the model config, the run options and the trainer's sections all check their fields
with kangaroo_jax/checks.py and raise its ConfigError with one line naming the field."""

import dataclasses

import pytest

import kangaroo_jax.checks as checks
import kangaroo_jax.config as model_config
import kangaroo_jax.run_options as run_options
from kangaroo_jax.config import ConfigError, LlamaConfig, ProjectorConfig, RopeScaling, VisionConfig
from kangaroo_jax.run_options import RunOptions


def test_one_config_error_and_no_private_check_helpers():
  assert model_config.ConfigError is checks.ConfigError is run_options.ConfigError
  for module in (model_config, run_options):
    private = [n for n in vars(module) if n.startswith("_check")]
    assert private == [], f"{module.__name__} has its own check helpers {private}; use kangaroo_jax.checks"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: LlamaConfig(num_layers=0), "LlamaConfig.num_layers: expected a positive int, got 0"),
        (lambda: VisionConfig(width=2.5), "VisionConfig.width: expected a positive int, got 2.5"),
        (
            lambda: ProjectorConfig(temporal_patch=True),
            "ProjectorConfig.temporal_patch: expected a positive int, got True",
        ),
        (
            lambda: ProjectorConfig(tpe="rope"),
            "ProjectorConfig.tpe: got 'rope', expected one of ('sinusoidal', 'learned', 'none')",
        ),
        (lambda: RopeScaling(factor=0.5), "RopeScaling.factor: expected >= 1, got 0.5"),
        (lambda: RunOptions(attention_block=0), "RunOptions.attention_block: expected a positive token count, got 0"),
        (
            lambda: RunOptions(ulysses_degree=-1),
            "RunOptions.ulysses_degree: expected a device count >= 0 (0 = automatic), got -1",
        ),
        (
            lambda: RunOptions(vision_chunk_frames=True),
            "RunOptions.vision_chunk_frames: expected a frame count >= 0 (0 = no chunking), got True",
        ),
        (lambda: RunOptions(logits_fp32=1), "RunOptions.logits_fp32: expected a bool, got 1"),
        (
            lambda: RunOptions(remat_policy="some"),
            "RunOptions.remat_policy: got 'some', expected one of ('none', 'full', 'dots', 'dots_no_batch')",
        ),
        (
            lambda: RunOptions.from_dict({"attention_block": -4}, where="run"),
            "run.attention_block: expected a positive token count, got -4",
        ),
        (
            lambda: RunOptions(param_dtype="bfloat16").check_for_training("run"),
            "run.param_dtype: training keeps float32 master weights, got 'bfloat16' (set run.compute_dtype for bf16 "
            "matmuls)",
        ),
    ],
    ids=[
        "positive",
        "positive_float",
        "positive_bool",
        "choice",
        "rope_factor",
        "count",
        "count_zero_ok",
        "count_bool",
        "bool",
        "run_choice",
        "from_dict_where",
        "training",
    ],
)
def test_field_errors_are_one_line_and_name_the_field(build, message):
  with pytest.raises(ConfigError) as e:
    build()
  assert str(e.value) == message


def test_valid_values_pass():
  assert RunOptions(ulysses_degree=0, vision_chunk_frames=0).attention_block == 512
  assert dataclasses.replace(LlamaConfig(), num_layers=1).num_layers == 1
