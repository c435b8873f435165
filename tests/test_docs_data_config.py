"""docs/pipeline_contracts.md shows DataConfig as it is: the same field names, in order, with the class's defaults."""

import ast
import dataclasses
import pathlib
import re

from kangaroo_jax.data.config import DataConfig

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "pipeline_contracts.md"


def _documented_call() -> ast.Call:
  text = DOC.read_text(encoding="utf-8")
  m = re.search(r"^    (DataConfig\(.*?\))\n    index", text, re.S | re.M)
  assert m, "docs/pipeline_contracts.md: no `DataConfig(...)` entry-point block"
  return ast.parse(" ".join(m.group(1).split()), mode="eval").body


def test_the_documented_dataconfig_names_every_field_in_order():
  call = _documented_call()
  assert not call.args
  assert [k.arg for k in call.keywords] == [f.name for f in dataclasses.fields(DataConfig)]


def test_the_documented_defaults_are_the_class_defaults():
  placeholders = {"source", "dataset", "tokenizer"}  # shown as what a grain run sets, not the defaults
  defaults = DataConfig()
  for k in _documented_call().keywords:
    if k.arg in placeholders or k.arg == "markers":
      continue
    assert ast.literal_eval(k.value) == getattr(defaults, k.arg), k.arg
