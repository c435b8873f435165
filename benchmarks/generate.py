"""Prefill and decode throughput of the KV-cache engine vs transformers' `generate`, same weights, CPU.

    python benchmarks/generate.py [--contexts 512 4096] [--new-tokens 32] [--configs tiny 100m]

Prints one JSON line. For each (config, context): prefill tokens/s (prompt of `context` tokens, time
to the first generated token) and decode tokens/s (greedy, the remaining `new_tokens`), for our engine
and for transformers (eager attention, float32, its own KV cache), plus ours/transformers ratios.
"decode_slope_ms_per_1k_ctx" is how much one decode step slows down per 1000 tokens of context
(512 -> largest context): a KV cache keeps it far below the cost of recomputing the prefix.
Timings exclude compilation (each shape runs once before it is timed); compile seconds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Idle OpenMP threads of torch would otherwise spin and take the cores from XLA between the two runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import kangaroo_jax  # noqa: E402
from kangaroo_jax.config import LlamaConfig  # noqa: E402
from kangaroo_jax.inference import Engine  # noqa: E402
from kangaroo_jax.models import LlamaForCausalLM  # noqa: E402
from tools.convert_weights.assemble import load_released_tensors  # noqa: E402
from tools.convert_weights.hf_config import transformers_llama_config  # noqa: E402

CONFIGS = {
    "tiny": lambda: kangaroo_jax.preset("tiny").llm,
    # ~101M parameters: Llama-3 structure (GQA 12/4, untied head) at GPT-2-small width.
    "100m": lambda: LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=8,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}


def _pair(cfg: LlamaConfig):
  hf_cfg = transformers_llama_config(cfg, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  ours = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  load_released_tensors(ours, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}, prefix=("llm",))
  return ours, hf


class _Clock:
  """Wall time of the first generated token (prefill) and of the last one (decode = last - first)."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.stamps: list[float] = []

  def token(self, *_):
    self.stamps.append(time.perf_counter())

  def split(self, new_tokens: int) -> tuple[float, float]:
    if len(self.stamps) != new_tokens + 1:
      raise RuntimeError(f"expected {new_tokens + 1} tokens, saw {len(self.stamps)}")
    return self.stamps[0] - self.t0, self.stamps[-1] - self.stamps[0]


class _HFStreamer:
  """transformers streamer protocol: put() gets the prompt first, then each new token."""

  def __init__(self, clock: _Clock):
    self.clock, self.calls = clock, 0

  def put(self, value):
    self.calls += 1
    if self.calls > 1:
      self.clock.token()

  def end(self):
    pass


def _best(run, repeats: int):
  """Min over repeats of (prefill s, decode s); noise on a shared machine only ever adds time."""
  splits, out = [], None
  for _ in range(repeats):
    clock = _Clock()
    out = run(clock)
    splits.append(clock.split(len(out) - 1))
  return min(s[0] for s in splits), min(s[1] for s in splits), out


def _ours(engine: Engine, prompt, new_tokens, repeats):
  def run(clock):
    return engine.generate([prompt], max_new_tokens=new_tokens + 1, stop_ids=(), on_token=clock.token).tokens[0]

  t = time.perf_counter()
  engine.generate([prompt], max_new_tokens=new_tokens + 1, stop_ids=())  # compiles every shape of this run
  compile_s = time.perf_counter() - t
  first, dec, toks = _best(lambda c: run(c)[: new_tokens + 1], repeats)
  return first, dec, toks, compile_s


def _hf(hf, prompt, new_tokens, repeats):
  ids = torch.tensor([prompt])
  mask = torch.ones_like(ids)

  def run(clock):
    with torch.no_grad():
      out = hf.generate(
          ids,
          attention_mask=mask,
          max_new_tokens=new_tokens + 1,
          min_new_tokens=new_tokens + 1,
          do_sample=False,
          pad_token_id=0,
          streamer=_HFStreamer(clock),
      )
    return out[0, len(prompt) :].tolist()

  run(_Clock())  # warm-up
  return _best(run, repeats)


def _agree(a, b) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  p.add_argument("--contexts", nargs="+", type=int, default=[512, 4096])
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--prefill-chunk", type=int, default=512)
  p.add_argument("--repeats", type=int, default=2)
  args = p.parse_args(argv)
  results = {
      "device": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "torch_threads": torch.get_num_threads(),
      "machine": platform.machine(),
      "new_tokens": args.new_tokens,
      "prefill_chunk": args.prefill_chunk,
      "runs": [],
  }
  for name in args.configs:
    cfg = CONFIGS[name]()
    ours, hf = _pair(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    engine = Engine(ours, prefill_chunk=args.prefill_chunk)
    per_ctx = {}
    for ctx in args.contexts:
      prompt = np.random.RandomState(ctx).randint(3, cfg.vocab_size, size=ctx).tolist()
      o_first, o_dec, o_toks, compile_s = _ours(engine, prompt, args.new_tokens, args.repeats)
      h_first, h_dec, h_toks = _hf(hf, prompt, args.new_tokens, args.repeats)
      run = {
          "config": name,
          "params": int(n_params),
          "context": ctx,
          "ours": {
              "prefill_tok_s": round(ctx / o_first, 1),
              "decode_tok_s": round(args.new_tokens / o_dec, 2),
              "decode_ms_per_tok": round(1e3 * o_dec / args.new_tokens, 2),
              "compile_s": round(compile_s, 1),
          },
          "transformers": {
              "prefill_tok_s": round(ctx / h_first, 1),
              "decode_tok_s": round(args.new_tokens / h_dec, 2),
              "decode_ms_per_tok": round(1e3 * h_dec / args.new_tokens, 2),
          },
          # Greedy tokens equal to transformers' before the first difference (random weights give
          # near-tied logits, so a late float32 rounding flip is possible and not an error).
          "tokens_agreeing": f"{_agree(o_toks, h_toks)}/{len(h_toks)}",
      }
      run["ratio_ours_over_transformers"] = {
          "prefill": round(run["ours"]["prefill_tok_s"] / run["transformers"]["prefill_tok_s"], 2),
          "decode": round(run["ours"]["decode_tok_s"] / run["transformers"]["decode_tok_s"], 2),
      }
      results["runs"].append(run)
      per_ctx[ctx] = run
    lo, hi = min(args.contexts), max(args.contexts)
    if hi > lo:
      for who in ("ours", "transformers"):
        slope = (per_ctx[hi][who]["decode_ms_per_tok"] - per_ctx[lo][who]["decode_ms_per_tok"]) / ((hi - lo) / 1000)
        results.setdefault("decode_slope_ms_per_1k_ctx", {}).setdefault(name, {})[who] = round(slope, 3)
      # What recomputing the whole prefix per token (no cache) would cost, from our own prefill rate at `hi`.
      results.setdefault("no_cache_ms_per_tok_at_max_ctx", {})[name] = round(
          1e3 * hi / per_ctx[hi]["ours"]["prefill_tok_s"], 1
      )
  print(json.dumps(results))


if __name__ == "__main__":
  main()
