"""`python -m train.compile --config configs/<stage>.py[:args] --topology v5p-128 [--llm-layers N] [--vision-layers N]`

Compiles, ahead of time and on any host (libtpu installed: `pip install -e '.[tpu]'`, no TPU needed),
the real train step of `python -m train` for a named Cloud TPU slice: the same config validation,
mesh rules, optimizer, state shardings, donation and step function, on `ShapeDtypeStruct`s placed on a
mesh of that slice's TPU devices. Prints per-chip argument / temp / total bytes against the chip's HBM,
whether it fits, the compile time and the attention kernel the compiler actually got, and ends with one
JSON line (`fits`, `per_chip_bytes`, `hbm_bytes`, `compile_s`, `attention_kernel`, ...).

  --inference [--frames 64 --prompt-tokens N --new-tokens 64 --batch 1 --mesh tensor=8]
      instead compiles the KV-cache engine's programs (vision encoder for the frames, one prefill chunk
      over a cache sized for the prompt, one decode step) for kangaroo-8b in bf16 and reports the
      largest per-chip plan among them.

Memory numbers are the compiler's plan (`memory_analysis()`), not a measured peak. --llm-layers /
--vision-layers shrink the depth for a fast check (a 32-layer compile takes minutes on 2 cores).
Any config field can be overridden as in `python -m train`: --config.data.batch_size=8.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; TPU devices come from the topology
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (get_config(arg))", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Cloud TPU slice name: v4-N, v5p-N, v5e-N, v6e-N (N as Cloud " "TPU counts it: TensorCores for v4/v5p)",
)
_LLM_LAYERS = flags.DEFINE_integer("llm_layers", None, "override the LLM depth (default: the config's)")
_VISION_LAYERS = flags.DEFINE_integer("vision_layers", None, "override the vision tower depth")
_INFERENCE = flags.DEFINE_bool("inference", False, "compile the inference engine instead of the train step")
_FRAMES = flags.DEFINE_integer("frames", 64, "inference: frames per video")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 0, "inference: prompt length (default: visual tokens + 128)")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "inference: tokens to generate (cache headroom)")
_BATCH = flags.DEFINE_integer("batch", 1, "inference: prompts per batch")
_MESH = flags.DEFINE_string("mesh", "tensor=-1", "inference: mesh axes, e.g. tensor=8 or context=2,tensor=4")
_PRESET = flags.DEFINE_string("preset", "kangaroo-8b", "inference: model preset")
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "write the optimized HLO text of the (main) program here")

# Our own flags also accept the hyphenated spelling (--llm-layers); absl only knows underscores.
_HYPHENATED = ("--llm-layers", "--vision-layers", "--prompt-tokens", "--new-tokens", "--hlo-out")


class CompileError(RuntimeError):
  """A configuration that cannot be compiled for the requested slice (message names what and why)."""


@dataclasses.dataclass
class Program:
  name: str
  compiled: object | None  # None: the TPU compiler refused it for lack of HBM (see out_of_memory)
  compile_s: float
  out_of_memory: str = ""  # the compiler's RESOURCE_EXHAUSTED message
  required_bytes: int = 0  # the HLO temporaries it asked for, from that message

  @property
  def hlo(self) -> str:
    return "" if self.compiled is None else self.compiled.as_text()


def _with_depth(cfg, llm_layers, vision_layers):
  from kangaroo_jax.config import ConfigError

  if llm_layers is None and vision_layers is None:
    return cfg
  for name, v in (("--llm-layers", llm_layers), ("--vision-layers", vision_layers)):
    if v is not None and v < 1:
      raise ConfigError(f"{name} must be >= 1, got {v}")
  llm = cfg.llm if llm_layers is None else dataclasses.replace(cfg.llm, num_layers=llm_layers)
  vision = cfg.vision if vision_layers is None else dataclasses.replace(cfg.vision, num_layers=vision_layers)
  return cfg.replace(llm=llm, vision=vision)


_OOM = re.compile(r"total memory required for HLO temporaries \(([\d.]+)([KMGT])\)")


def _timed_compile(name, jitted, *args, **kwargs) -> Program:
  """Lowers and compiles (see `_compile_lowered`)."""
  t = time.perf_counter()
  return _compile_lowered(name, jitted.lower(*args, **kwargs), t)


def _compile_lowered(name, lowered, started: float) -> Program:
  """Compiles; a program the TPU compiler refuses for lack of HBM comes back as a did-not-fit Program.

  `started`: the perf_counter reading the timing counts from (before the lowering)."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XlaRuntimeError is the only kind expected; others re-raise below
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    m = _OOM.search(message)
    required = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024) if m else 0
    return Program(name, None, time.perf_counter() - started, message.splitlines()[0][:400], required)
  return Program(name, compiled, time.perf_counter() - started)


@dataclasses.dataclass
class LoweredTrainStep:
  program: object  # train.program.TrainProgram
  state: object  # the abstract train state (ShapeDtypeStructs with their shardings)
  lowered: object  # jax.stages.Lowered of the jitted step on (state, batch)
  started: float  # perf_counter before the lowering
  mesh: object  # the jax Mesh it was lowered for
  facts: dict


def lower_train_step(cfg, devices) -> LoweredTrainStep:
  """Builds (`train.program`, as `train.loop.train` does) and lowers the train step for `devices`.

  Everything runs under the config's sharding rules (`use_rules(cfg.rules)`, as in `train()`): the
  parameter shardings are read from the table when the program is built, the activation constraints
  when the step is traced, so an experiment's `sharding_rules` reach the ahead-of-time compile too."""
  import jax
  from jax.sharding import NamedSharding

  from kangaroo_jax.data.global_batch import BATCH_AXES
  from kangaroo_jax.parallel.mesh import make_mesh
  from kangaroo_jax.parallel.rules import logical_to_spec, use_rules
  from train.config import validate_for_mesh
  from train.program import build_program

  with use_rules(cfg.rules):
    mesh = make_mesh(cfg.mesh, devices=devices)
    validate_for_mesh(cfg, dict(mesh.shape), 1)
    program = build_program(cfg, mesh)
    state = program.abstract_state()

    d = cfg.data
    b, seq, f, px = d.batch_size, d.seq_len, d.max_frames, d.frame_size
    batch_shapes = dict(
        input_ids=((b, seq), "int32"),
        targets=((b, seq), "int32"),
        loss_mask=((b, seq), "float32"),
        positions=((b, seq), "int32"),
        segment_ids=((b, seq), "int32"),
        frames=((b, f, px, px, 3), "uint8"),
        timestamps=((b, f), "float32"),
        num_frames=((b,), "int32"),
    )
    mesh_shape = dict(mesh.shape)
    batch = {
        k: jax.ShapeDtypeStruct(
            shape, dt, sharding=NamedSharding(mesh, logical_to_spec(BATCH_AXES[k], mesh_shape, shape))
        )
        for k, (shape, dt) in batch_shapes.items()
    }

    started = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = program.jit_step(cfg.optim.grad_accum).lower(state, batch)
  facts = dict(
      mesh=mesh_shape,
      params=program.model_def.num_params(),
      trainable_params=program.model_def.num_params(program.trainable),
      tokens_per_step=b * seq,
  )
  return LoweredTrainStep(program, state, lowered, started, mesh, facts)


def compile_train_step(cfg, devices) -> tuple[list[Program], dict]:
  """Lowers and compiles the train step `train.loop.train` runs (both build it with `train.program`)."""
  import jax
  from kangaroo_jax.parallel.rules import use_rules

  step = lower_train_step(cfg, devices)
  with use_rules(cfg.rules), jax.set_mesh(step.mesh):
    return [_compile_lowered("train_step", step.lowered, step.started)], step.facts


def _parse_mesh(text: str):
  from kangaroo_jax.parallel.mesh import MeshConfig

  values = dict(data=1, fsdp=1, context=1, tensor=1)
  for item in filter(None, text.split(",")):
    k, _, v = item.partition("=")
    if k not in values or not v.lstrip("-").isdigit():
      raise CompileError(f"--mesh {text!r}: expected comma-separated axis=int with axes {sorted(values)}")
    values[k] = int(v)
  return MeshConfig(**values)


def compile_inference(
    cfg, run, devices, *, frames: int, prompt_tokens: int, new_tokens: int, batch: int, mesh_text: str
) -> tuple[list[Program], dict]:
  """Compiles the KV-cache engine's vision encoder, one prefill chunk and one decode step (`cfg` shapes, `run`
  RunOptions)."""
  import jax
  import jax.numpy as jnp
  from kangaroo_jax.attention.context_parallel import context_size
  from kangaroo_jax.inference.cache import KVCache, bucket_length, cache_sharding
  from kangaroo_jax.inference.engine import Engine
  from kangaroo_jax.inference.sampling import SamplingConfig
  from kangaroo_jax.parallel.mesh import make_mesh
  from train.params import ModelDef

  if frames < 2 or frames % 2:
    raise CompileError(f"--frames must be an even number >= 2, got {frames}")
  mesh = make_mesh(_parse_mesh(mesh_text), devices=devices)
  grid = cfg.vision.trained_grid
  visual_tokens = frames // cfg.projector.frames_per_group * cfg.projector.tokens_per_group(grid, grid)
  prompt = prompt_tokens or visual_tokens + 128
  model_def = ModelDef(cfg, run)
  weights = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), model_def.shapes(), model_def.shardings(mesh)
  )
  # Abstract, and made outside the TPU mesh (concrete arrays cannot be placed on described devices).
  key = jax.eval_shape(lambda: jax.random.key(0))
  step = jax.ShapeDtypeStruct((), jnp.int32)
  with jax.set_mesh(mesh):
    engine = Engine(model_def.merge(weights))
    n = context_size()  # the sequence's mesh axis from the rules table (activation_length), as the engine asks
    max_len = bucket_length(prompt + new_tokens, 2 * n)
    llm = cfg.llm
    cache_shape = (llm.num_layers, batch, max_len, llm.num_kv_heads, llm.head_dim)
    kv = jax.ShapeDtypeStruct(cache_shape, run.dtype, sharding=cache_sharding(cache_shape))
    cache = KVCache(kv, kv, jax.ShapeDtypeStruct((batch,), jnp.int32))
    chunk = min(engine.prefill_chunk, bucket_length(prompt, 2 * n))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    px = cfg.vision.image_size
    programs = [
        _timed_compile(
            "vision",
            engine._encode_frames,
            engine.state,  # noqa: SLF001 - the engine's own jitted programs
            jax.ShapeDtypeStruct((batch, frames, px, px, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, frames), jnp.float32),
        ),
        _timed_compile(
            "prefill_chunk",
            engine._prefill_chunk,
            engine.state,
            cache,  # noqa: SLF001
            jax.ShapeDtypeStruct((batch, chunk, llm.hidden_size), run.dtype),
            i32(batch),
            i32(batch),
            i32(batch),
            jax.ShapeDtypeStruct((batch,), jnp.bool_),
            jax.ShapeDtypeStruct((batch, llm.vocab_size), jnp.float32),
        ),
        _timed_compile(
            "decode_step",
            engine._decode_step,
            engine.state,
            cache,
            i32(batch),  # noqa: SLF001
            key,
            step,
            sampling=SamplingConfig(),
        ),
    ]
  facts = dict(
      mesh=dict(mesh.shape), frames=frames, prompt_tokens=prompt, cache_len=max_len, batch=batch, prefill_chunk=chunk
  )
  return programs, facts


def report(slice_, programs: list[Program], facts: dict, what: str) -> dict:
  from kangaroo_jax.aot import MemoryPlan, attention_kernels_in, gib, highest_precision_f32_dots

  plans = {
      p.name: MemoryPlan.of(p.compiled) if p.compiled is not None else MemoryPlan(0, 0, 0, p.required_bytes, 0)
      for p in programs
  }
  refused = {p.name: p.out_of_memory for p in programs if p.compiled is None}
  worst = max(plans, key=lambda k: plans[k].total)
  kernels = sorted({k for p in programs for k in attention_kernels_in(p.hlo)})
  hbm = slice_.hbm_bytes
  for p in programs:
    m = plans[p.name]
    if p.compiled is None:
      print(
          f"{p.name}: does not fit: the TPU compiler needs {gib(m.temp)} of temporaries per chip of {gib(hbm)} HBM "
          f"({slice_.chip.name}); {p.compile_s:.1f} s",
          file=sys.stderr,
      )
      continue
    print(
        f"{p.name}: argument {gib(m.argument)}, output {gib(m.output)}, alias {gib(m.alias)}, temp {gib(m.temp)}, "
        f"total {gib(m.total)} per chip of {gib(hbm)} HBM ({slice_.chip.name}); compiled in {p.compile_s:.1f} s",
        file=sys.stderr,
    )
  result = dict(
      what=what,
      topology=slice_.name,
      topology_string=slice_.topology,
      chips=slice_.chips,
      fits=not refused and plans[worst].total <= hbm,
      per_chip_bytes=plans[worst].total,
      hbm_bytes=hbm,
      compiler_refused=refused,
      largest_program=worst,
      compile_s=round(sum(p.compile_s for p in programs), 2),
      attention_kernel=", ".join(kernels) if kernels else "unknown (not compiled)" if refused else "xla",
      highest_f32_dots=sum(len(highest_precision_f32_dots(p.hlo)) for p in programs),
      programs={k: dataclasses.asdict(v) | {"total": v.total} for k, v in plans.items()},
      memory_kind="compiler plan (memory_analysis), not a measured peak",
      **facts,
  )
  return result


def run(
    argv_config,
    *,
    topology: str,
    llm_layers=None,
    vision_layers=None,
    inference=False,
    frames=64,
    prompt_tokens=0,
    new_tokens=64,
    batch=1,
    mesh="tensor=-1",
    preset="kangaroo-8b",
    hlo_out=None,
) -> dict:
  from kangaroo_jax.aot import parse_slice, tpu_devices

  slice_ = parse_slice(topology)
  devices = tpu_devices(slice_)
  if inference:
    from kangaroo_jax.config import preset as make_preset
    from kangaroo_jax.run_options import RunOptions

    cfg = _with_depth(make_preset(preset), llm_layers, vision_layers)
    run_opts = RunOptions(param_dtype="bfloat16", compute_dtype="bfloat16")
    programs, facts = compile_inference(
        cfg,
        run_opts,
        devices,
        frames=frames,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        batch=batch,
        mesh_text=mesh,
    )
    what = f"inference {preset}"
  else:
    from train.config import from_configdict

    config = argv_config.copy_and_resolve_references()
    if config.data.source == "grain" and not config.data.dataset:
      # No data is read ahead of time; the synthetic source has the same batch contract and shapes.
      config.data.source = "synthetic"
    train_cfg = from_configdict(config)
    train_cfg = dataclasses.replace(train_cfg, model=_with_depth(train_cfg.model, llm_layers, vision_layers))
    programs, facts = compile_train_step(train_cfg, devices)
    what = f"train {train_cfg.stage}"
    facts["attention_impl"] = train_cfg.run.attention_impl
    if train_cfg.run.attention_impl == "usp":
      facts["ulysses_degree"] = train_cfg.run.ulysses_degree
  facts["llm_layers"] = llm_layers
  facts["vision_layers"] = vision_layers
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(programs[-1 if inference else 0].hlo)
  return report(slice_, programs, facts, what)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _TOPOLOGY.value is None:
    raise app.UsageError("--topology is required (e.g. v5p-128)")
  if not _INFERENCE.value and _CONFIG.value is None:
    raise app.UsageError("--config is required unless --inference")
  from kangaroo_jax.aot import TopologyError
  from kangaroo_jax.config import ConfigError
  from kangaroo_jax.parallel.mesh import MeshError

  try:
    result = run(
        _CONFIG.value,
        topology=_TOPOLOGY.value,
        llm_layers=_LLM_LAYERS.value,
        vision_layers=_VISION_LAYERS.value,
        inference=_INFERENCE.value,
        frames=_FRAMES.value,
        prompt_tokens=_PROMPT_TOKENS.value,
        new_tokens=_NEW_TOKENS.value,
        batch=_BATCH.value,
        mesh=_MESH.value,
        preset=_PRESET.value,
        hlo_out=_HLO_OUT.value,
    )
  except (TopologyError, ConfigError, MeshError, CompileError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(
      f"fits: {result['fits']} ({result['per_chip_bytes'] / 2**30:.2f} of {result['hbm_bytes'] / 2**30:.0f} GiB "
      f"per chip, {result['largest_program']}); attention kernel: {result['attention_kernel']}; "
      f"compile {result['compile_s']} s",
      file=sys.stderr,
  )
  print(json.dumps(result), flush=True)
  return 0


def _normalise_argv(argv: list[str]) -> list[str]:
  out = []
  for a in argv:
    for h in _HYPHENATED:
      if a == h or a.startswith(h + "="):
        a = a.replace(h, "--" + h[2:].replace("-", "_"), 1)
    out.append(a)
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse, with --help exiting 0 (absl's own exits 1), as `python -m train` does."""
  asked = [a for a in argv[1:] if a in ("--help", "-h", "-?", "--helpshort", "--helpfull")]
  if asked:
    app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True, exitcode=0)
  return flags.FLAGS(argv)


def console() -> None:
  """The `kangaroo-compile` console script (same as `python -m train.compile`)."""
  sys.modules["__main__"].__doc__ = __doc__  # absl's usage text is the main module's docstring
  sys.argv = _normalise_argv(sys.argv)
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  sys.argv = _normalise_argv(sys.argv)
  sys.exit(app.run(main, flags_parser=_parse_flags))
