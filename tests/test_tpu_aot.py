"""The TPU paths compile for a real TPU: ahead-of-time compilation with libtpu on this CPU host.

Interpret mode (tests/test_attention_kernels.py) checks the splash numerics but not Mosaic's lowering
rules; these tests run the real TPU compiler on a 4-chip v5e slice: the train step of `python -m train`
at kangaroo-8b width (2 LLM layers, 1 vision layer, bf16 compute, full remat) with every attention impl
(USP as 2 x 2), and the KV-cache engine's prefill and decode programs.
"""

import dataclasses

import jax
import pytest

pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]'; make test installs it)")

from configs.stage4_instruction import get_config  # noqa: E402
from kangaroo_jax.aot import attention_kernels_in, highest_precision_f32_dots, parse_slice, tpu_devices  # noqa: E402
from train.compile import compile_inference, compile_train_step, report  # noqa: E402
from train.config import from_configdict  # noqa: E402

pytestmark = pytest.mark.xdist_group("tpu_aot")
SLICE = "v5e-4"


def _small_8b_width(attention: str, context: int):
  c = get_config("mode=full")
  c.model.overrides = dict(llm=dict(num_layers=2, vocab_size=32768), vision=dict(num_layers=1))
  c.run.update(
      compute_dtype="bfloat16",
      remat_policy="full",
      attention_impl=attention,
      ulysses_degree=2 if attention == "usp" else 0,
  )
  c.mesh.update(fsdp=-1, context=context)
  c.data.update(source="synthetic", batch_size=4, seq_len=1024, frame_size=112, max_frames=4, num_frames=4)
  return from_configdict(c)


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
  """TPU executables compiled here cannot be loaded back on a CPU host: keep them out of the suite's cache."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", before)


@pytest.fixture(scope="module")
def devices():
  return tpu_devices(parse_slice(SLICE))


@pytest.mark.parametrize("attention,context", [("reference", 1), ("all_gather", 2), ("ring", 2), ("usp", 4)])
def test_train_step_compiles_for_tpu_with_splash(devices, attention, context):
  cfg = _small_8b_width(attention, context)
  assert cfg.model.llm.hidden_size == 4096 and cfg.model.llm.num_heads == 32 and cfg.model.llm.num_kv_heads == 8
  with jax.default_matmul_precision("default"):  # conftest raises it for the f32 parity tests
    programs, facts = compile_train_step(cfg, devices)
  hlo = programs[0].hlo
  kernels = attention_kernels_in(hlo)
  assert any(k.startswith("splash_mha_fwd") for k in kernels), kernels
  assert any(k.startswith("splash_mha_dkv") for k in kernels), kernels  # the backward is fused too
  assert highest_precision_f32_dots(hlo) == []
  result = report(parse_slice(SLICE), programs, facts, "test")
  assert result["fits"] and 0 < result["per_chip_bytes"] <= result["hbm_bytes"]
  assert facts["mesh"]["context"] == context
  if attention == "usp":  # 2 x 2: all-to-all inside pairs of chips, a ring over the pairs
    assert "all-to-all" in hlo and "replica_groups={{0,1},{2,3}}" in hlo.replace(" ", "")


def test_inference_prefill_and_decode_compile_for_tpu(devices):
  from kangaroo_jax.config import kangaroo_8b
  from kangaroo_jax.run_options import RunOptions

  cfg, run = kangaroo_8b(), RunOptions(param_dtype="bfloat16", compute_dtype="bfloat16")
  cfg = cfg.replace(
      llm=dataclasses.replace(cfg.llm, num_layers=2), vision=dataclasses.replace(cfg.vision, num_layers=1)
  )
  with jax.default_matmul_precision("default"):
    programs, facts = compile_inference(
        cfg, run, devices, frames=4, prompt_tokens=0, new_tokens=16, batch=2, mesh_text="tensor=4"
    )
  assert [p.name for p in programs] == ["vision", "prefill_chunk", "decode_step"]
  for p in programs:
    assert highest_precision_f32_dots(p.hlo) == [], p.name
  result = report(parse_slice(SLICE), programs, facts, "test")
  assert result["fits"] and facts["cache_len"] >= facts["prompt_tokens"] + 16


def test_highest_f32_attention_dots_are_detected(devices):
  """Negative control for the check above: float32 XLA attention asks for HIGHEST, and the check sees it."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from kangaroo_jax.attention import reference_attention

  mesh = Mesh(np.array(devices[:1]), ("x",))
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))  # noqa: E731
  fn = jax.jit(lambda q, k: reference_attention(q, k, k, causal=True))
  hlo = fn.lower(spec(1, 256, 4, 64), spec(1, 256, 2, 64)).compile().as_text()
  assert highest_precision_f32_dots(hlo)


def test_a_program_the_compiler_refuses_for_hbm_is_reported_as_not_fitting(devices):
  """The TPU compiler itself refuses programs whose temporaries exceed HBM: that is `fits: false`, not a crash."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from train.compile import _timed_compile

  mesh = Mesh(np.array(devices[:1]), ("x",))
  x = jax.ShapeDtypeStruct((2**30,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  four_copies = jax.jit(lambda x: jnp.cumsum(jnp.stack([x * 1.5, x * 2.5, x * 3.5, x * 4.5]), axis=1))  # 16 GiB+
  program = _timed_compile("too_big", four_copies, x)
  assert program.compiled is None and "RESOURCE_EXHAUSTED" in program.out_of_memory
  result = report(parse_slice(SLICE), [program], {}, "test")
  assert not result["fits"] and result["per_chip_bytes"] > result["hbm_bytes"]
  assert result["compiler_refused"] == {"too_big": program.out_of_memory}
