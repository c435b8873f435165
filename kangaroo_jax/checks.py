"""Field checks shared by the frozen config dataclasses (`__post_init__` style of kangaroo_jax/config.py).

Each raises ConfigError("<where>.<field>: <what was expected, what came>"): one line, naming the field as
the user wrote it (`data.seq_len`, `optim.lr`). Used by kangaroo_jax.data.config and train.config; it
imports only ConfigError, so either can import it without a cycle.
"""

from __future__ import annotations

import math
from typing import Any

from kangaroo_jax.config import ConfigError


def fail(where: str, field: str, msg: str) -> ConfigError:
  return ConfigError(f"{where}.{field}: {msg}" if where else f"{field}: {msg}")


def check(cond: bool, where: str, field: str, msg: str) -> None:
  if not cond:
    raise fail(where, field, msg)


def check_choice(obj: Any, where: str, field: str, choices: tuple) -> None:
  v = getattr(obj, field)
  check(v in choices, where, field, f"got {v!r}, expected one of {choices}")


def check_int(obj: Any, where: str, field: str, lo: int | None = None) -> None:
  """An int (not a bool), >= lo when given."""
  v = getattr(obj, field)
  check(isinstance(v, int) and not isinstance(v, bool), where, field, f"expected an int, got {v!r}")
  check(lo is None or v >= lo, where, field, f"expected >= {lo}, got {v}")


def check_float(obj: Any, where: str, field: str, lo: float | None = None, hi: float | None = None,
                open_lo: bool = False) -> None:
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
