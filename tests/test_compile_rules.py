"""`train.compile` builds and lowers the train step under the experiment's sharding rules, as `train()` does.

No libtpu needed: the same `lower_train_step` that the TPU compile runs, lowered for the 8 fake CPU devices."""

import jax
import pytest

from tests.train_helpers import tiny_config
from train.compile import lower_train_step
from train.params import flatten

LM_HEAD = "llm/lm_head/kernel"  # [embed, vocab]: fsdp=8 splits its embed dim under the default table


def _param_specs(step) -> dict:
  """Parameter path -> PartitionSpec of the lowered train state (trained and frozen parameters)."""
  return {path: leaf.sharding.spec for part in ("params", "frozen") for path, leaf in flatten(step.state[part]).items()}


@pytest.fixture(scope="module")
def default_step():
  return lower_train_step(tiny_config(), jax.devices())


def test_a_parameter_rule_override_changes_what_train_compile_builds(default_step):
  override = lower_train_step(tiny_config(sharding_rules=(("embed", None),)), jax.devices())
  before, after = _param_specs(default_step), _param_specs(override)
  assert before[LM_HEAD] == jax.sharding.PartitionSpec("fsdp", None), before[LM_HEAD]
  assert after[LM_HEAD] == jax.sharding.PartitionSpec(None, None), after[LM_HEAD]
  # ... and the lowered program takes its arguments with those shardings.
  assert default_step.lowered.as_text() != override.lowered.as_text()


def test_an_activation_rule_override_reaches_the_traced_step(default_step):
  # Only an activation axis changes: the parameters are placed as before, the step's constraints are not.
  override = lower_train_step(tiny_config(sharding_rules=(("activation_frames", None),)), jax.devices())
  assert _param_specs(override) == _param_specs(default_step)
  assert override.lowered.as_text() != default_step.lowered.as_text()
