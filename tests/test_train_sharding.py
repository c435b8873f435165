"""The trainer under an experiment's sharding rules, and its sufficiently-sharded check on the placed state.

The check runs at startup, after the state is placed and before the first step, so these runs stop at
their first batch (`_NoBatches`) and never compile a train step."""

import pytest

from kangaroo_jax.config import ConfigError
from kangaroo_jax.parallel.mesh import MeshError
from tests.train_helpers import tiny_config
from train.loop import train

# Every parameter's logical axes mapped to no mesh axis: all parameters replicated on all 8 devices.
REPLICATED = tuple((name, None) for name in ("embed", "vocab", "heads", "kv_heads", "mlp"))


class _FirstBatch(Exception):
  pass


class _NoBatches:
  """Ends the run where the step loop asks for its first batch."""

  def __next__(self):
    raise _FirstBatch


def _startup(cfg, workdir) -> None:
  with pytest.raises(_FirstBatch):
    train(cfg, workdir, iterator=_NoBatches())


def test_rules_override_reaches_the_trainers_state_and_the_warning_names_the_largest(tmp_path, capsys):
  _startup(tiny_config(), str(tmp_path / "default"))  # fsdp=8: every big tensor split over `embed`
  assert "warning:" not in capsys.readouterr().out
  _startup(tiny_config(sharding_rules=(("embed", None),)), str(tmp_path / "override"))
  out = capsys.readouterr().out
  # On this mesh (fsdp only) nothing else shards them: the override left them whole on every device.
  assert "[test] warning: " in out and "largest: llm/lm_head/kernel [64, 512] 128.0 KiB, " in out, out
  assert "llm/model/layers/mlp/down_proj/kernel [2, 160, 64] 80.0 KiB" in out, out


def test_a_fully_replicated_rule_set_is_an_error_naming_the_largest_tensor(tmp_path):
  with pytest.raises(MeshError) as e:
    train(tiny_config(sharding_rules=REPLICATED, sharding_check="error"), str(tmp_path / "w"), iterator=_NoBatches())
  msg = str(e.value)
  assert msg.startswith("100.0% of parameter bytes") and "\n" not in msg, msg
  assert "largest: llm/lm_head/kernel [64, 512] 128.0 KiB" in msg and "max_replicated_fraction 2%" in msg, msg


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(sharding_rules=(("activation_embd", None),)),
            r"^sharding_rules\[0\]: unknown logical axis 'activation_embd'; known: \[",
        ),
        (
            dict(sharding_rules=(("embed", "model"),)),
            r"^sharding_rules\[0\] \(embed\): mesh axes 'model' are not a subset",
        ),
        (dict(sharding_check="loud"), r"^sharding_check: got 'loud', expected one of \('warn', 'error', 'off'\)$"),
        (dict(max_replicated_fraction=2.0), r"^max_replicated_fraction: expected <= 1.0, got 2.0$"),
    ],
)
def test_bad_sharding_options_are_one_line_config_errors(changes, message):
  with pytest.raises(ConfigError, match=message):
    tiny_config(**changes)
