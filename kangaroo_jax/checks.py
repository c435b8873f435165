"""Field checks shared by every frozen config dataclass (their `__post_init__`), and the error they raise.

Each raises ConfigError("<where>.<field>: <what was expected, what came>"): one line, naming the field as
the user wrote it (`data.seq_len`, `optim.lr`) or its class (`LlamaConfig.num_heads`, `RunOptions.remat_policy`).
Used by kangaroo_jax.config, kangaroo_jax.run_options, kangaroo_jax.data.config and train.config. It imports
nothing of the project, so any of them can import it without a cycle; `kangaroo_jax.config.ConfigError` is
this class (re-exported there, where most callers import it from).
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
  """A configuration field holds a value the model cannot use."""


def fail(where: str, field: str, msg: str) -> ConfigError:
  return ConfigError(f"{where}.{field}: {msg}" if where else f"{field}: {msg}")


def check(cond: bool, where: str, field: str, msg: str) -> None:
  if not cond:
    raise fail(where, field, msg)


def check_choice(obj: Any, where: str, field: str, choices: tuple) -> None:
  v = getattr(obj, field)
  check(v in choices, where, field, f"got {v!r}, expected one of {choices}")


def check_int(obj: Any, where: str, field: str, lo: int | None = None, what: str | None = None) -> None:
  """An int (not a bool), >= lo when given. With `what` ("a positive token count"), either failure says
  "expected <what>, got <value>"."""
  v = getattr(obj, field)
  is_int = isinstance(v, int) and not isinstance(v, bool)
  if what is not None:
    check(is_int and (lo is None or v >= lo), where, field, f"expected {what}, got {v!r}")
    return
  check(is_int, where, field, f"expected an int, got {v!r}")
  check(lo is None or v >= lo, where, field, f"expected >= {lo}, got {v}")


def check_positive_ints(obj: Any, where: str, *fields: str) -> None:
  """Each of `fields` an int >= 1 (not a bool): "expected a positive int, got <value>"."""
  for f in fields:
    check_int(obj, where, f, lo=1, what="a positive int")


def check_float(
    obj: Any, where: str, field: str, lo: float | None = None, hi: float | None = None, open_lo: bool = False
) -> None:
  """A finite number in [lo, hi] ((lo, hi] with open_lo)."""
  v = getattr(obj, field)
  check(isinstance(v, (int, float)) and not isinstance(v, bool), where, field, f"expected a number, got {v!r}")
  # nan passes every comparison below and would train to a NaN "success"
  check(math.isfinite(v), where, field, f"expected a finite number, got {v!r}")
  if lo is not None:
    check(v > lo if open_lo else v >= lo, where, field, f"expected {'>' if open_lo else '>='} {lo}, got {v}")
  check(hi is None or v <= hi, where, field, f"expected <= {hi}, got {v}")


def check_bool(obj: Any, where: str, field: str) -> None:
  v = getattr(obj, field)
  check(isinstance(v, bool), where, field, f"expected a bool, got {v!r}")


def check_str(obj: Any, where: str, field: str) -> None:
  v = getattr(obj, field)
  check(isinstance(v, str), where, field, f"expected a string, got {v!r}")
