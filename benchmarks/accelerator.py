"""One-GPU benchmark (H100/H200): train-step MFU, attention vs cuDNN, 8B decode; prints ONE JSON line.

    python benchmarks/accelerator.py       # one H100/H200; sized for ~6 min (estimate), hard stop at 470 s
    python benchmarks/accelerator.py --sections attention --peak-tflops 989 --time-budget-s 450
    JAX_PLATFORMS=cpu python benchmarks/accelerator.py --smoke    # tiny shapes on CPU, seconds (the test)

Sections (each one, and each shape inside it, is wrapped: a failure records {"error": "..."} and the
rest still runs; every timed number is {"median", "min", "max", "runs"} over separate timed calls):

train: one jitted step (forward, backward, optax AdamW update, state donated) of a ~1.2B Llama
  (hidden 2048, 16 layers, 16/8 heads of 128, MLP 8192, vocab 128256) built from this project's
  `LlamaForCausalLM`: float32 params, bf16 compute, remat "full", attention_impl "reference", fp32
  logits, cross-entropy on random tokens; 1 row of 8192 and 1 row of 32768 tokens. After compiling
  and one untimed step, >= 5 steps are timed one by one with block_until_ready.
  step_s: seconds per step; tokens_per_s: tokens of the step / step_s;
  model_tflops_per_step: the analytic count in `flops_model` (6 x matmul weights x tokens + causal
  attention 12*L*h*d*S^2/2 per row; no remat recompute, no masked-out work);
  mfu: model FLOPs per second / (--peak-tflops x 1e12), the default 989 being the dense bf16 peak of
  one H100/H200 SXM; executed_matmul_tflops_per_step: 2*M*N*K over every dot in the step's jaxpr
  (benchmarks/train_step.py `matmul_flops`: remat recompute and the dense attention's masked half
  included), matmul_utilisation the same over time and peak;
  attention_in_hlo: "cudnn_fmha" when the compiled step calls cuDNN's fused attention, else
  "xla_dense" (the project's masked einsum + softmax); memory_gib: XLA's buffer sizes of the step
  (a step that cannot fit the free device memory is not run and says so).
attention: fwd+bwd (jax.vjp, one cotangent) on q [1, S, 32, 128], k/v [1, S, 8, 128] bf16, causal,
  S = 8192 and 32768. ours = `get_attention("reference")` with positions and segment ids (the
  project's XLA path); peer = `jax.nn.dot_product_attention(..., is_causal=True,
  implementation="cudnn")` ("xla" in --smoke), given the 8 kv heads directly when it accepts
  them, else k/v repeated to 32 heads (`peer.kv_heads` says which, and why). The two alternate
  (ours, peer, ours, peer, ...) over >= 5 rounds. tflops_per_s: the causal model FLOPs in
  `flops_model` / seconds; ratio_ours_over_peer: per round, peer seconds / ours seconds (> 1: ours
  faster); max_abs_diff_out: the two outputs compared after warm-up.
decode: Llama-3-8B shapes (LlamaConfig() defaults), random bf16 weights made directly in bf16 on
  the device, batch 1 and 16: a 1024-token prompt prefilled once through `forward_cached` (one
  untimed warm-up prefill, then one timed: prefill_s, runs 1), then greedy single-token steps of
  one jitted function (embed, `forward_cached`, argmax) with the KV cache donated, 3 rounds of 64
  timed steps after 4 warm-up steps. decode_tokens_per_s: batch x steps / round seconds;
  hbm_gb_per_s: (weight bytes without the embedding table, of which a step reads one row per token,
  + the whole KV cache, whose every slot the decode attention reads) per second: a lower bound on
  the memory traffic (activations and logits not counted).

Budget: sections run in the order given; a section, or a shape within one, is skipped (with a
"skipped" note saying why) when fewer seconds than its estimate (`NEED_S`) are left of
--time-budget-s, counted from the start of the process. At budget + 20 s a watchdog prints what
has been measured so far (with "aborted" naming the part that was running) and exits with 3;
otherwise the exit status is 0, whatever the sections recorded.
"""

from __future__ import annotations

import time

_PROCESS_T0 = time.monotonic()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# XLA's default (75% of the GPU) leaves too little for the 32k train step and the 8B decode.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from kangaroo_jax.attention import get_attention  # noqa: E402
from kangaroo_jax.config import LlamaConfig  # noqa: E402
from kangaroo_jax.inference.cache import init_cache  # noqa: E402
from kangaroo_jax.models import LlamaForCausalLM  # noqa: E402
from kangaroo_jax.run_options import RunOptions  # noqa: E402

SECTIONS = ("train", "attention", "decode")
DEFAULT_PEAK_TFLOPS = 989.0  # dense bf16, H100 SXM and H200 (no sparsity)
HARD_STOP_MARGIN_S = 20.0
# Seconds a part needs to be started (compile included), estimated for one H100; 0 in --smoke.
NEED_S = {"train": 90.0, "attention": 20.0, "decode": 60.0}


@dataclasses.dataclass(frozen=True)
class Shapes:
  train_cfg: LlamaConfig
  train_rows_seq: tuple[tuple[int, int], ...]  # (rows, tokens per row) of each train case
  train_steps: int
  attn_heads: tuple[int, int, int]  # (query heads, kv heads, head_dim)
  attn_seqs: tuple[int, ...]
  attn_rounds: int
  attn_peer: str  # implementation= of jax.nn.dot_product_attention
  decode_cfg: LlamaConfig
  decode_batches: tuple[int, ...]
  prompt_len: int
  decode_steps: int  # timed steps per round
  decode_rounds: int
  decode_warmup: int
  need_s: dict


FULL = Shapes(
    train_cfg=LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
    ),
    train_rows_seq=((1, 8192), (1, 32768)),
    train_steps=5,
    attn_heads=(32, 8, 128),
    attn_seqs=(8192, 32768),
    attn_rounds=7,
    attn_peer="cudnn",
    decode_cfg=LlamaConfig(),
    decode_batches=(1, 16),
    prompt_len=1024,
    decode_steps=64,
    decode_rounds=3,
    decode_warmup=4,
    need_s=NEED_S,
)

_TINY = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_ids=(2,),
)
# One shape per section: every code path of the full run, at a few seconds of CPU compile each.
SMOKE = Shapes(
    train_cfg=_TINY,
    train_rows_seq=((2, 64),),
    train_steps=5,
    attn_heads=(8, 2, 16),
    attn_seqs=(64,),
    attn_rounds=5,
    attn_peer="xla",
    decode_cfg=_TINY,
    decode_batches=(2,),
    prompt_len=32,
    decode_steps=8,
    decode_rounds=3,
    decode_warmup=2,
    need_s={name: 0.0 for name in SECTIONS},
)


# --- small helpers ---------------------------------------------------------------------------------


def _sig(x: float, digits: int = 5) -> float:
  """x rounded to `digits` significant digits (smoke-mode numbers are tiny, decimals would zero them)."""
  return float(f"{x:.{digits}g}")


def spread(values: list[float]) -> dict:
  """{"median", "min", "max", "runs"} of separate measurements."""
  return {
      "median": _sig(statistics.median(values)),
      "min": _sig(min(values)),
      "max": _sig(max(values)),
      "runs": len(values),
  }


def rate(work: float, seconds: list[float]) -> dict:
  """work / seconds as a spread: the median rate is work / median time, min from the slowest run."""
  return {
      "median": _sig(work / statistics.median(seconds)),
      "min": _sig(work / max(seconds)),
      "max": _sig(work / min(seconds)),
      "runs": len(seconds),
  }


def one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:400] if text else ''}"


def _gib(n: float) -> float:
  return _sig(n / 2**30, 4)


class DoesNotFit(RuntimeError):
  """A compiled program needs more device memory than is free."""


def memory_check(compiled) -> dict | None:
  """XLA's buffer sizes of `compiled` (GiB); raises DoesNotFit when its new buffers exceed the free memory.

  New bytes = temporaries + outputs not aliased to donated inputs (the inputs are already resident).
  Returns None where the backend reports no sizes.
  """
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if ma is None:
    return None
  new = ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
  info = {
      "arguments": _gib(ma.argument_size_in_bytes),
      "temp": _gib(ma.temp_size_in_bytes),
      "outputs_not_aliased": _gib(ma.output_size_in_bytes - ma.alias_size_in_bytes),
  }
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    info["device_free"] = _gib(free)
    if new > free:
      raise DoesNotFit(
          f"needs {_gib(new)} GiB of new buffers (temp {info['temp']} GiB), "
          f"{_gib(free)} GiB free of {_gib(stats['bytes_limit'])} GiB; not run"
      )
  return info


def attention_in_hlo(compiled) -> str:
  """Which attention the compiled program runs: cuDNN's fused kernel or XLA ops."""
  try:
    text = compiled.as_text()
  except Exception as e:  # noqa: BLE001
    return f"unknown ({one_line(e)})"
  return "cudnn_fmha" if "__cudnn$fmha" in text else "xla_dense"


def compile_timed(jitted, *args):
  """(compiled, compile seconds) of jitted(*args)."""
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t


def init_on_device(create: Callable[[], nnx.Module]):
  """(graphdef, params, rest) of create(), every array made on the device by one jitted init.

  Weights are born in their param_dtype on the device: no host copy, no float32 detour for bf16.
  """
  graphdef, _, _ = jax.eval_shape(lambda: nnx.split(create(), nnx.Param, ...))
  params, rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[1:])()
  return graphdef, params, rest


def _dist_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- FLOP model ------------------------------------------------------------------------------------


def matmul_weights(cfg: LlamaConfig) -> int:
  """Weights that multiply activations: attention projections, MLP, lm_head (not the embedding table
  or the norm scales)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  return cfg.num_layers * (attn + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size


def causal_attention_flops(layers: int, heads: int, head_dim: int, seq: int, rows: int) -> float:
  """fwd+bwd (= 3 x fwd) of causal attention: fwd is 2 matmuls x 2*S*S*h*d, halved by the mask."""
  return rows * 12.0 * layers * heads * head_dim * seq * seq / 2


def train_flops(cfg: LlamaConfig, rows: int, seq: int) -> float:
  return 6.0 * matmul_weights(cfg) * rows * seq + causal_attention_flops(
      cfg.num_layers, cfg.num_heads, cfg.head_dim, seq, rows
  )


TRAIN_FLOPS_MODEL = (
    "6 * matmul_weights * tokens + 12 * L * h * d * S^2 / 2 per row (causal attention fwd+bwd); "
    "matmul_weights = attention projections + MLP + lm_head (embedding and norms excluded); "
    "remat recompute and masked-out attention not counted"
)
ATTN_FLOPS_MODEL = "12 * h * d * S^2 / 2 per row: fwd+bwd = 3 x fwd, fwd = 2 matmuls of 2*S*S*h*d halved by the mask"


# --- train -----------------------------------------------------------------------------------------


def make_train_step(graphdef, tx):
  """step((params, opt_state), rest, (ids, targets, positions, segment_ids)) -> (new state, loss).

  ids, targets, positions, segment_ids: [rows, seq] int32.
  """

  def loss_fn(params, rest, ids, targets, positions, segment_ids):
    model = nnx.merge(graphdef, params, rest)
    logits = model(ids, positions=positions, segment_ids=segment_ids)  # [rows, seq, vocab] float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def step(state, rest, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def token_batch(vocab: int, rows: int, seq: int, seed: int = 0):
  ids = jax.random.randint(jax.random.key(seed), (rows, seq + 1), 0, vocab, dtype=jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
  return ids[:, :-1], ids[:, 1:], positions, jnp.ones((rows, seq), jnp.int32)


def executed_matmul_flops(step, *args) -> float:
  from benchmarks.train_step import matmul_flops  # imported here: it pulls in the trainer's config modules

  return matmul_flops(jax.make_jaxpr(step)(*args))


def train_case(out: dict, shapes: Shapes, rows: int, seq: int, peak_tflops: float) -> None:
  """Fills `out` as it goes, so a failure late in the case keeps what was measured before it."""
  cfg = shapes.train_cfg
  out.update(rows=rows, seq_len=seq, tokens_per_step=rows * seq)

  def create():
    run = RunOptions(
        param_dtype="float32",
        compute_dtype="bfloat16",
        attention_impl="reference",
        remat_policy="full",
        logits_fp32=True,
    )
    return LlamaForCausalLM(cfg, run, rngs=nnx.Rngs(0))

  graphdef, params, rest = init_on_device(create)
  out["params_total"] = int(sum(x.size for x in jax.tree.leaves(params)))
  tx = optax.adamw(1e-4, weight_decay=0.1)
  state = (params, jax.jit(tx.init)(params))
  del params
  batch = token_batch(cfg.vocab_size, rows, seq)
  step = make_train_step(graphdef, tx)
  try:
    executed = executed_matmul_flops(step, state, rest, batch)
  except Exception as e:  # noqa: BLE001 - an extra number; the timing does not need it
    executed, out["executed_matmul_error"] = None, one_line(e)
  compiled, out["compile_s"] = compile_timed(jax.jit(step, donate_argnums=0), state, rest, batch)
  out["compile_s"] = round(out["compile_s"], 1)
  out["attention_in_hlo"] = attention_in_hlo(compiled)
  out["memory_gib"] = memory_check(compiled)
  state, loss = compiled(state, rest, batch)  # warm-up: first-run allocations, autotuned kernels loaded
  jax.block_until_ready((state, loss))
  times = []
  for _ in range(shapes.train_steps):
    t = time.perf_counter()
    state, loss = compiled(state, rest, batch)
    jax.block_until_ready((state, loss))
    times.append(time.perf_counter() - t)
  model = train_flops(cfg, rows, seq)
  out.update(
      step_s=spread(times),
      tokens_per_s=rate(rows * seq, times),
      model_tflops_per_step=_sig(model / 1e12),
      model_tflops_per_s=rate(model / 1e12, times),
      mfu=rate(model / (peak_tflops * 1e12), times),
      loss=_sig(float(loss)),
  )
  if executed is not None:
    out.update(
        executed_matmul_tflops_per_step=_sig(executed / 1e12),
        matmul_utilisation=rate(executed / (peak_tflops * 1e12), times),
    )


def bench_train(shapes: Shapes, args, budget: "Budget", put: Callable[[str, Any], None]) -> None:
  cfg = shapes.train_cfg
  put(
      "config",
      {
          "hidden": cfg.hidden_size,
          "layers": cfg.num_layers,
          "heads": cfg.num_heads,
          "kv_heads": cfg.num_kv_heads,
          "head_dim": cfg.head_dim,
          "intermediate": cfg.intermediate_size,
          "vocab": cfg.vocab_size,
          "matmul_weights": matmul_weights(cfg),
          "param_dtype": "float32",
          "compute_dtype": "bfloat16",
          "remat_policy": "full",
          "attention_impl": "reference",
          "logits_fp32": True,
          "optimizer": "optax.adamw(1e-4, weight_decay=0.1), inside the jitted step, " "state donated",
      },
  )
  put("flops_model", TRAIN_FLOPS_MODEL)
  put("peak_tflops", args.peak_tflops)
  for rows, seq in shapes.train_rows_seq:
    put(
        f"rows{rows}_seq{seq}",
        budget.guarded(shapes.need_s["train"], lambda out: train_case(out, shapes, rows, seq, args.peak_tflops)),
    )


# --- attention -------------------------------------------------------------------------------------


def fwd_bwd(attn):
  """jit of (q, k, v, d_out, *extra) -> (out, dq, dk, dv) for attn(q, k, v, *extra)."""

  def run(q, k, v, d_out, *extra):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, *extra), q, k, v)
    return (out, *vjp(d_out))

  return jax.jit(run)


def ours_attention(q, k, v, positions, segment_ids):
  return get_attention("reference")(
      q,
      k,
      v,
      causal=True,
      q_positions=positions,
      kv_positions=positions,
      q_segment_ids=segment_ids,
      kv_segment_ids=segment_ids,
  )


def peer_attention(impl: str, repeat_kv: int):
  def attn(q, k, v):
    if repeat_kv > 1:
      k, v = jnp.repeat(k, repeat_kv, axis=2), jnp.repeat(v, repeat_kv, axis=2)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  return attn


def _prepare(jitted, args) -> tuple[Any, dict, Any]:
  """(compiled, info, warm-up output): compiled, checked against free memory, run once."""
  compiled, compile_s = compile_timed(jitted, *args)
  info = {
      "compile_s": round(compile_s, 2),
      "attention_in_hlo": attention_in_hlo(compiled),
      "memory_gib": memory_check(compiled),
  }
  out = compiled(*args)
  jax.block_until_ready(out)
  return compiled, info, out


def attention_case(out: dict, shapes: Shapes, seq: int) -> None:
  heads, kv_heads, head_dim = shapes.attn_heads
  kq, kk, kv, kd = jax.random.split(jax.random.key(seq), 4)
  q = jax.random.normal(kq, (1, seq, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(kk, (1, seq, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(kv, (1, seq, kv_heads, head_dim), jnp.bfloat16)
  d_out = jax.random.normal(kd, (1, seq, heads, head_dim), jnp.bfloat16)
  positions = jnp.arange(seq, dtype=jnp.int32)[None]
  segment_ids = jnp.ones((1, seq), jnp.int32)
  flops = causal_attention_flops(1, heads, head_dim, seq, 1)
  out.update(q_shape=list(q.shape), kv_shape=list(k.shape), dtype="bfloat16", tflops_per_call=_sig(flops / 1e12))
  runners, warm = {}, {}

  ours = {"impl": "kangaroo_jax get_attention('reference'), causal by positions, segment ids"}
  try:
    args = (q, k, v, d_out, positions, segment_ids)
    compiled, info, warm["ours"] = _prepare(fwd_bwd(ours_attention), args)
    ours.update(info)
    runners["ours"] = lambda: compiled(*args)
  except Exception as e:  # noqa: BLE001
    ours["error"] = one_line(e)
  out["ours"] = ours
  gc.collect()

  peer = {"impl": f"jax.nn.dot_product_attention(is_causal=True, implementation={shapes.attn_peer!r})"}
  args_peer = (q, k, v, d_out)
  try:
    try:
      compiled_peer, info, warm["peer"] = _prepare(fwd_bwd(peer_attention(shapes.attn_peer, 1)), args_peer)
      peer["kv_heads"] = f"native GQA: {kv_heads} kv heads for {heads} query heads"
    except DoesNotFit:
      raise
    except Exception as e:  # noqa: BLE001 - retried with k/v repeated to the query heads
      native_error = peer["native_gqa_error"] = one_line(e)
      compiled_peer, info, warm["peer"] = _prepare(
          fwd_bwd(peer_attention(shapes.attn_peer, heads // kv_heads)), args_peer
      )
      peer["kv_heads"] = f"k/v repeated to {heads} heads (timed with the repeat); native GQA failed: {native_error}"
    peer.update(info)
    runners["peer"] = lambda: compiled_peer(*args_peer)
  except Exception as e:  # noqa: BLE001
    peer["error"] = one_line(e)
  out["peer"] = peer

  if "ours" in warm and "peer" in warm:
    diff = jnp.max(jnp.abs(warm["ours"][0].astype(jnp.float32) - warm["peer"][0].astype(jnp.float32)))
    out["max_abs_diff_out"] = _sig(float(diff))
  warm.clear()
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(shapes.attn_rounds):
    for name, run in runners.items():  # ours first, then the peer, every round
      t = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - t)
  for name, ts in times.items():
    out[name].update(seconds=spread(ts), tflops_per_s=rate(flops / 1e12, ts))
  if len(times) == 2:
    out["ratio_ours_over_peer"] = spread([p / o for o, p in zip(times["ours"], times["peer"])])


def bench_attention(shapes: Shapes, args, budget: "Budget", put: Callable[[str, Any], None]) -> None:
  put("flops_model", ATTN_FLOPS_MODEL)
  put("ratio", "per round: peer seconds / ours seconds (ours TFLOP/s over the peer's; > 1 means ours is faster)")
  for seq in shapes.attn_seqs:
    put(f"seq{seq}", budget.guarded(shapes.need_s["attention"], lambda out: attention_case(out, shapes, seq)))


# --- decode ----------------------------------------------------------------------------------------


def make_decode_fns(graphdef):
  """Jitted prefill and single-token greedy decode over the KV cache (k, v donated).

  prefill(params, rest, k, v, ids [batch, n]) -> (next tokens [batch], k, v), cache slots 0..n-1 filled.
  decode(params, rest, k, v, lengths [batch], tokens [batch]) -> (next tokens, k, v, lengths + 1).
  k, v: [layers, batch, slots, kv_heads, head_dim].
  """

  def prefill(params, rest, k, v, ids):
    model = nnx.merge(graphdef, params, rest)
    b, n = ids.shape
    zero = jnp.zeros((b,), jnp.int32)
    logits, k, v = model.forward_cached(model.model.embed(ids), k, v, zero, zero + n, logit_index=zero + n - 1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), k, v

  def decode(params, rest, k, v, lengths, tokens):
    model = nnx.merge(graphdef, params, rest)
    logits, k, v = model.forward_cached(
        model.model.embed(tokens[:, None]), k, v, lengths, lengths + 1, logit_index=jnp.zeros_like(lengths)
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), k, v, lengths + 1

  return jax.jit(prefill, donate_argnums=(2, 3)), jax.jit(decode, donate_argnums=(2, 3, 4))


def decode_case(out: dict, shapes: Shapes, graphdef, params, rest, batch: int) -> None:
  cfg = shapes.decode_cfg
  n = shapes.prompt_len
  timed_steps = shapes.decode_rounds * shapes.decode_steps
  slots = -(-(n + shapes.decode_warmup + timed_steps) // 128) * 128
  cache = init_cache(cfg, batch, slots, jnp.bfloat16)
  k, v = cache.k, cache.v
  del cache
  ids = jax.random.randint(jax.random.key(batch), (batch, n), 0, cfg.vocab_size, dtype=jnp.int32)
  prefill, decode = make_decode_fns(graphdef)
  out.update(batch=batch, prompt_tokens=n, cache_slots=slots, kv_cache_gib=_gib(nbytes((k, v))))
  compiled_prefill, prefill_compile_s = compile_timed(prefill, params, rest, k, v, ids)
  out["memory_gib_prefill"] = memory_check(compiled_prefill)
  tokens, k, v = compiled_prefill(params, rest, k, v, ids)  # warm-up; the timed run rewrites the same slots
  jax.block_until_ready(tokens)
  t = time.perf_counter()
  tokens, k, v = compiled_prefill(params, rest, k, v, ids)
  jax.block_until_ready(tokens)
  prefill_s = time.perf_counter() - t
  lengths = jnp.full((batch,), n, jnp.int32)
  compiled_decode, decode_compile_s = compile_timed(decode, params, rest, k, v, lengths, tokens)
  out["memory_gib_decode"] = memory_check(compiled_decode)
  out["compile_s"] = {"prefill": round(prefill_compile_s, 1), "decode": round(decode_compile_s, 1)}
  for _ in range(shapes.decode_warmup):
    tokens, k, v, lengths = compiled_decode(params, rest, k, v, lengths, tokens)
  jax.block_until_ready(tokens)
  round_s = []
  for _ in range(shapes.decode_rounds):
    t = time.perf_counter()
    for _ in range(shapes.decode_steps):  # dispatched back to back: the device never waits on the host
      tokens, k, v, lengths = compiled_decode(params, rest, k, v, lengths, tokens)
    jax.block_until_ready(tokens)
    round_s.append(time.perf_counter() - t)
  last = jax.device_get(tokens)
  # A step reads every weight but the embedding table (one row per token) and every cache slot.
  embed_bytes = cfg.vocab_size * cfg.hidden_size * jnp.dtype(jnp.bfloat16).itemsize
  step_bytes = nbytes(params) - embed_bytes + nbytes((k, v))
  steps = shapes.decode_steps
  out.update(
      prefill_s=spread([prefill_s]),
      prefill_tokens_per_s=rate(batch * n, [prefill_s]),
      steps_per_round=steps,
      decode_ms_per_step=spread([1e3 * s / steps for s in round_s]),
      decode_tokens_per_s=rate(batch * steps, round_s),
      hbm_gb_per_s=rate(step_bytes * steps / 1e9, round_s),
      final_length=int(jax.device_get(lengths)[0]),
      tokens_in_vocab=bool(((last >= 0) & (last < cfg.vocab_size)).all()),
  )


def bench_decode(shapes: Shapes, args, budget: "Budget", put: Callable[[str, Any], None]) -> None:
  cfg = shapes.decode_cfg

  def create():
    return LlamaForCausalLM(cfg, RunOptions(param_dtype="bfloat16", compute_dtype="bfloat16"), rngs=nnx.Rngs(0))

  t = time.perf_counter()
  graphdef, params, rest = init_on_device(create)
  jax.block_until_ready(params)
  put(
      "model",
      {
          "config": "LlamaConfig() defaults (Llama-3-8B)" if cfg == LlamaConfig() else "tiny (smoke)",
          "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "weights_gib": _gib(nbytes(params)),
          "param_dtype": "bfloat16",
          "init_s": round(time.perf_counter() - t, 1),
          "step": "jitted embed + LlamaForCausalLM.forward_cached + argmax, KV cache donated",
      },
  )
  for batch in shapes.decode_batches:
    put(
        f"batch{batch}",
        budget.guarded(shapes.need_s["decode"], lambda out: decode_case(out, shapes, graphdef, params, rest, batch)),
    )


# --- running ---------------------------------------------------------------------------------------


class Budget:
  """Seconds left of the time budget; `guarded` runs a part only when its estimate still fits."""

  def __init__(self, limit_s: float, start: float | None = None):
    self.limit_s = limit_s
    self.start = time.monotonic() if start is None else start

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self) -> float:
    return self.limit_s - self.elapsed()

  def skip_reason(self, need_s: float) -> str | None:
    left = self.left()
    if left > 0 and left >= need_s:
      return None
    return (
        f"time budget: {max(left, 0.0):.0f} s left of --time-budget-s {self.limit_s:g} after "
        f"{self.elapsed():.0f} s, this part needs about {need_s:g} s"
    )

  def guarded(self, need_s: float, run: Callable[[dict], None]) -> dict:
    """run(out) unless the budget is spent; `out` as far as it got, plus "error" if run raised."""
    reason = self.skip_reason(need_s)
    if reason:
      return {"skipped": reason}
    out: dict[str, Any] = {}
    try:
      run(out)
    except Exception as e:  # noqa: BLE001 - one failing part must not end the benchmark
      out["error"] = one_line(e)
    finally:
      gc.collect()  # the failed part's arrays (held by its frames) go before the next part allocates
    return out


class Report:
  """The JSON object being filled; printed exactly once (normal end or the watchdog)."""

  def __init__(self, header: dict):
    self.data = dict(header)
    self.lock = threading.Lock()
    self.printed = False

  def put(self, section: str, key: str, value) -> None:
    with self.lock:
      self.data.setdefault(section, {})[key] = value

  def set(self, key: str, value) -> None:
    with self.lock:
      self.data[key] = value

  def emit(self, **extra) -> bool:
    with self.lock:
      if self.printed:
        return False
      self.printed = True
      self.data.update(extra)
      print(json.dumps(finite(self.data)), flush=True)
      return True


def finite(obj):
  """A copy with NaN / inf floats as strings, so the line stays strict JSON (and a reader sees them)."""
  if isinstance(obj, dict):
    return {k: finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  return obj


RUNNERS = {"train": bench_train, "attention": bench_attention, "decode": bench_decode}


def run_sections(report: Report, names, shapes: Shapes, args, budget: Budget, runners=None) -> None:
  """Runs each section in order; a section's exception becomes its {"error": ...}, the next one still runs."""
  runners = RUNNERS if runners is None else runners
  skipped = []
  for name in names:
    reason = budget.skip_reason(shapes.need_s.get(name, 0.0))
    if reason:
      report.put(name, "skipped", reason)
      skipped.append(name)
      continue
    report.set("running", name)
    t = time.perf_counter()
    try:
      runners[name](shapes, args, budget, lambda key, value, name=name: report.put(name, key, value))
    except Exception as e:  # noqa: BLE001
      report.put(name, "error", one_line(e))
    finally:
      gc.collect()
    report.put(name, "section_s", round(time.perf_counter() - t, 1))
  report.set("running", None)
  report.set("skipped_sections", skipped)


def _sections(text: str) -> list[str]:
  names = [s.strip() for s in text.split(",") if s.strip()]
  bad = [s for s in names if s not in SECTIONS]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"unknown sections {bad or 'none given'}; expected a comma list of {SECTIONS}")
  return names


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sections", type=_sections, default=list(SECTIONS), help="comma list of " + ",".join(SECTIONS))
  p.add_argument(
      "--peak-tflops",
      type=float,
      default=DEFAULT_PEAK_TFLOPS,
      help="dense bf16 peak of one device for MFU (989: H100/H200 SXM)",
  )
  p.add_argument(
      "--time-budget-s",
      type=float,
      default=450.0,
      help="skip parts once the process has run this long; hard stop 20 s later",
  )
  p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, seconds): checks the plumbing only")
  args = p.parse_args(argv)
  if args.peak_tflops <= 0:
    p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
  shapes = SMOKE if args.smoke else FULL
  budget = Budget(args.time_budget_s, start=_PROCESS_T0)
  dev = jax.devices()[0]
  report = Report(
      {
          "benchmark": "accelerator",
          "smoke": args.smoke,
          "device_kind": dev.device_kind,
          "platform": dev.platform,
          "num_devices": jax.device_count(),
          "jax_version": jax.__version__,
          "jaxlib_version": _dist_version("jaxlib"),
          "flax_version": flax.__version__,
          "optax_version": optax.__version__,
          "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "time_budget_s": args.time_budget_s,
          "sections": args.sections,
      }
  )

  def hard_stop():
    if report.emit(
        aborted=f"hard stop at {budget.elapsed():.1f} s (budget {args.time_budget_s:g} s + "
        f"{HARD_STOP_MARGIN_S:g} s) while running {report.data.get('running')}",
        elapsed_s=round(budget.elapsed(), 1),
    ):
      os._exit(3)

  watchdog = threading.Timer(max(budget.left() + HARD_STOP_MARGIN_S, 0.0), hard_stop)
  watchdog.daemon = True
  watchdog.start()
  run_sections(report, args.sections, shapes, args, budget)
  watchdog.cancel()
  report.emit(elapsed_s=round(budget.elapsed(), 1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
