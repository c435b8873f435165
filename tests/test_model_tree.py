"""kangaroo_jax/model_tree.py (parameter trees, abstract models, split / merge) and the model from_pretrained
returns (a Kangaroo holding its tokenizer and Chat, no process-global cache); tiny preset, CPU."""

import ast
import gc
import os
import weakref

import jax
import numpy as np
import pytest
from flax import nnx

import kangaroo_jax
from kangaroo_jax.inference.chat import Chat
from kangaroo_jax.model_tree import (
    abstract_model,
    flatten,
    merge_params,
    param_tree,
    shardings_of,
    split_params,
    unflatten,
    with_values,
)
from kangaroo_jax.models import Kangaroo
from kangaroo_jax.parallel.mesh import MeshConfig, make_mesh
from kangaroo_jax.pretrained import PretrainedKangaroo, from_pretrained, save_pretrained
from kangaroo_jax.tokenizer import load_tokenizer
from tests.test_inference_chat import ROOT, tiny_config, tiny_tokenizer_dir
from train.params import ModelDef


@pytest.fixture(scope="module")
def model():
  return Kangaroo(kangaroo_jax.preset("tiny"), rngs=nnx.Rngs(0))


def test_flatten_unflatten_round_trip():
  tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  flat = flatten(tree)
  assert flat == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert unflatten(flat) == tree
  assert unflatten({("a", "b"): 1, ("a", "c", "d"): 2, ("e",): 3}) == tree


def test_param_tree_is_nnx_pure_dict_and_merges_back_bit_for_bit(model):
  graphdef, tree = split_params(model)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert flatten(tree).keys() == flatten(pure).keys() == flatten(param_tree(model)).keys()
  assert "llm/lm_head/kernel" in flatten(tree)
  ids = np.array([[3, 5, 7, 9]], np.int32)
  want = np.asarray(model(ids))
  assert np.array_equal(np.asarray(merge_params(graphdef, tree)(ids)), want)
  # Inside jit, as the train step rebuilds it from the state's trees.
  model_def = ModelDef(model.cfg)
  got = jax.jit(lambda p, i: model_def.merge(p)(i))(model_def.to_params(model), ids)
  assert np.array_equal(np.asarray(got), want)


def test_split_params_refuses_non_parameter_state():
  class WithCounter(nnx.Module):

    def __init__(self):
      self.w = nnx.Param(np.zeros((2,), np.float32))
      self.count = nnx.BatchStat(np.zeros((), np.int32))

  with pytest.raises(NotImplementedError, match="count"):
    split_params(WithCounter())


def test_abstract_model_is_shapes_only_and_the_same_under_a_mesh():
  cfg = kangaroo_jax.preset("tiny")
  outside = abstract_model(cfg)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, context=1, tensor=2))
  with jax.set_mesh(mesh):
    inside = abstract_model(cfg, cls=PretrainedKangaroo)
  assert isinstance(inside, PretrainedKangaroo)
  a, b = flatten(param_tree(outside)), flatten(param_tree(inside))
  assert a.keys() == b.keys()
  for k in a:
    assert isinstance(a[k], jax.ShapeDtypeStruct) and (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
  sharding_of = shardings_of(outside, mesh)
  assert "tensor" in str(sharding_of(("llm", "lm_head", "kernel")).spec)
  ones = with_values(outside, lambda p: np.ones(a["/".join(p)].shape, a["/".join(p)].dtype))
  assert float(ones.llm.lm_head.kernel[...].sum()) == a["llm/lm_head/kernel"].size


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  d = tmp_path_factory.mktemp("tree")
  tok_dir = tiny_tokenizer_dir(str(d / "tok"))
  return save_pretrained(Kangaroo(tiny_config(load_tokenizer(tok_dir)), rngs=nnx.Rngs(0)), tok_dir, str(d / "ckpt"))


def test_from_pretrained_model_holds_its_own_chat(checkpoint):
  first, tok = from_pretrained(checkpoint)
  second, _ = from_pretrained(checkpoint)
  assert isinstance(first, Kangaroo) and first.tokenizer is tok
  assert flatten(param_tree(first)).keys() == flatten(param_tree(Kangaroo(first.cfg, rngs=nnx.Rngs(1)))).keys()
  chat = first.chat_session()
  assert isinstance(chat, Chat) and chat.model is first and chat.tokenizer is tok
  assert first.chat_session() is chat and second.chat_session() is not chat
  # A copy shares the static attributes, not the weights: it gets a Chat of its own.
  copy = nnx.merge(*nnx.split(first))
  assert copy.chat_session() is not chat and copy.chat_session().model is copy
  # No process-global cache keeps a model's Chat alive.
  held = weakref.ref(chat)
  del first, chat, copy
  gc.collect()
  assert held() is None


def test_models_do_not_import_the_inference_layer():
  folder = os.path.join(ROOT, "kangaroo_jax", "models")
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(folder, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      modules = (
          [a.name for a in node.names]
          if isinstance(node, ast.Import)
          else [node.module or ""]
          if isinstance(node, ast.ImportFrom)
          else []
      )
      assert not any("inference" in m for m in modules), f"kangaroo_jax/models/{name} imports {modules}"
