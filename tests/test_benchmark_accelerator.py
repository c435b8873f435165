"""benchmarks/accelerator.py on CPU: the --smoke JSON line has every number, finite; the FLOP model is
exact against the jaxpr's matmuls; the time budget skips, and one failing section does not stop the rest."""

import json
import math
import os
import subprocess
import sys

import jax
import optax
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import accelerator as acc  # noqa: E402
from benchmarks.train_step import matmul_flops  # noqa: E402
from kangaroo_jax.models import LlamaForCausalLM  # noqa: E402
from kangaroo_jax.run_options import RunOptions  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")


def _run(*args, timeout=150):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run(
      [sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
  )
  assert p.returncode == 0, p.stderr[-3000:]
  lines = [line for line in p.stdout.splitlines() if line.strip()]
  assert len(lines) == 1, p.stdout  # exactly one line on stdout: the JSON
  return json.loads(lines[0])


def _numbers(obj, path=""):
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _numbers(v, f"{path}.{k}")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _numbers(v, f"{path}[{i}]")
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    yield path, obj


def _positive_spread(s, runs):
  assert set(s) == {"median", "min", "max", "runs"}, s
  assert s["runs"] == runs, s
  assert 0 < s["min"] <= s["median"] <= s["max"] < math.inf, s


@pytest.fixture(scope="module")
def smoke():
  return _run("--smoke")


def test_smoke_json_has_every_number_finite_and_positive(smoke):
  sh = acc.SMOKE
  for path, value in _numbers(smoke):
    assert math.isfinite(value), path
  assert smoke["smoke"] is True and smoke["platform"] == "cpu" and smoke["device_kind"]
  assert smoke["jax_version"] == jax.__version__
  assert smoke["sections"] == list(acc.SECTIONS) and smoke["skipped_sections"] == [] and "aborted" not in smoke
  assert smoke["running"] is None and smoke["elapsed_s"] > 0

  train = smoke["train"]
  assert "error" not in train and train["flops_model"] == acc.TRAIN_FLOPS_MODEL and train["peak_tflops"] == 989.0
  for rows, seq in sh.train_rows_seq:
    case = train[f"rows{rows}_seq{seq}"]
    assert "error" not in case and "skipped" not in case, case
    assert case["tokens_per_step"] == rows * seq and case["attention_in_hlo"] == "xla_dense"
    for key in ("step_s", "tokens_per_s", "model_tflops_per_s", "mfu", "matmul_utilisation"):
      _positive_spread(case[key], sh.train_steps)
    assert case["mfu"]["max"] < 1
    assert case["model_tflops_per_step"] == pytest.approx(acc.train_flops(sh.train_cfg, rows, seq) / 1e12, rel=1e-4)
    # Remat recomputes the forward and the dense attention computes its masked half: more than the model counts.
    assert case["executed_matmul_tflops_per_step"] > case["model_tflops_per_step"]
    # Random init: the loss starts near log(vocab).
    assert abs(case["loss"] - math.log(sh.train_cfg.vocab_size)) < 1.0
    assert case["compile_s"] >= 0 and case["memory_gib"]["temp"] > 0

  attention = smoke["attention"]
  assert "error" not in attention and attention["flops_model"] == acc.ATTN_FLOPS_MODEL
  heads, kv_heads, head_dim = sh.attn_heads
  for seq in sh.attn_seqs:
    case = attention[f"seq{seq}"]
    assert case["q_shape"] == [1, seq, heads, head_dim] and case["kv_shape"] == [1, seq, kv_heads, head_dim]
    for who in ("ours", "peer"):
      assert "error" not in case[who], case[who]
      _positive_spread(case[who]["seconds"], sh.attn_rounds)
      _positive_spread(case[who]["tflops_per_s"], sh.attn_rounds)
    assert case["peer"]["kv_heads"].startswith("native GQA")  # jax's XLA path takes 2 kv heads for 8
    _positive_spread(case["ratio_ours_over_peer"], sh.attn_rounds)
    assert 0 <= case["max_abs_diff_out"] < 0.05  # same attention, bf16 outputs

  decode = smoke["decode"]
  assert "error" not in decode and decode["model"]["params"] > 0
  for batch in sh.decode_batches:
    case = decode[f"batch{batch}"]
    assert "error" not in case and "skipped" not in case, case
    _positive_spread(case["prefill_s"], 1)
    _positive_spread(case["prefill_tokens_per_s"], 1)
    for key in ("decode_ms_per_step", "decode_tokens_per_s", "hbm_gb_per_s"):
      _positive_spread(case[key], sh.decode_rounds)
    assert case["steps_per_round"] == sh.decode_steps and case["tokens_in_vocab"] is True
    assert case["final_length"] == sh.prompt_len + sh.decode_warmup + sh.decode_rounds * sh.decode_steps
    assert case["cache_slots"] >= case["final_length"]


def test_budget_spent_skips_the_named_sections_and_says_why():
  out = _run("--smoke", "--sections", "decode,train", "--time-budget-s", "0", timeout=60)
  assert out["sections"] == ["decode", "train"] and out["skipped_sections"] == ["decode", "train"]
  assert "attention" not in out and "aborted" not in out
  for name in ("decode", "train"):
    assert set(out[name]) == {"skipped"} and "--time-budget-s 0" in out[name]["skipped"]


def test_a_failing_section_is_recorded_and_the_next_still_runs():
  report = acc.Report({})

  def broken(shapes, args, budget, put):
    put("partial", 1)
    raise RuntimeError("device lost\nsecond line")

  def fine(shapes, args, budget, put):
    put("case", budget.guarded(0, lambda out: out.update(value=2)))
    put("bad_case", budget.guarded(0, lambda out: out.update(before=1) or 1 / 0))
    put("late_case", budget.guarded(1e9, lambda out: out.update(value=3)))

  acc.run_sections(
      report, ["train", "attention"], acc.SMOKE, None, acc.Budget(100.0), runners={"train": broken, "attention": fine}
  )
  data = report.data
  assert data["train"]["error"] == "RuntimeError: device lost" and data["train"]["partial"] == 1
  assert data["attention"]["case"] == {"value": 2}
  assert data["attention"]["bad_case"] == {"before": 1, "error": "ZeroDivisionError: division by zero"}
  assert "needs about 1e+09 s" in data["attention"]["late_case"]["skipped"]
  assert data["skipped_sections"] == [] and data["running"] is None


def test_train_flop_model_matches_the_matmuls_of_the_step():
  """Without remat, the step's jaxpr runs 3 x the forward's matmuls; the model count differs from that
  by exactly the masked half of the dense attention, 6 * L * h * d * S^2 per row."""
  cfg, rows, seq = acc.SMOKE.train_cfg, 2, 32
  model = LlamaForCausalLM(cfg, RunOptions(attention_impl="reference"), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-4)
  step = acc.make_train_step(graphdef, tx)
  executed = matmul_flops(
      jax.make_jaxpr(step)((params, tx.init(params)), rest, acc.token_batch(cfg.vocab_size, rows, seq))
  )
  masked_half = 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq * seq * rows
  assert acc.train_flops(cfg, rows, seq) == executed - masked_half
  n_matmul = (
      sum(x.size for x in jax.tree.leaves(params))
      - cfg.vocab_size * cfg.hidden_size
      - cfg.hidden_size * (2 * cfg.num_layers + 1)
  )  # all params minus the embedding table and the norm scales
  assert acc.matmul_weights(cfg) == n_matmul


def test_bad_sections_flag_is_a_one_line_usage_error():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run(
      [sys.executable, SCRIPT, "--sections", "train,bogus"],
      capture_output=True,
      text=True,
      env=env,
      timeout=60,
      cwd=ROOT,
  )
  assert p.returncode == 2 and p.stdout == ""
  assert "argument --sections: unknown sections ['bogus']" in p.stderr and "Traceback" not in p.stderr
