"""Conversion benchmark: peak memory and throughput of `tools.convert_weights import` on a >= 1 GB checkpoint.

Synthesizes a bf16 model.safetensors in the released naming for a widened tiny config (random values,
written one tensor at a time), then runs, each in its own child process:
  plain read:   a plain sequential read of the same file (16 MiB blocks, data discarded); the
                throughput target is measured against its cold (from disk) median;
  plain copy:   the same read, each block written to a new file, fsync at the end (the I/O floor of
                any conversion that has to write the data once);
  import floor: the interpreter with the converter's modules imported, converting nothing;
  convert:      `python -m tools.convert_weights import SRC DST --quiet` (bf16 -> bf16 Orbax/OCDBT;
                the durable fsync of every file and folder before the final rename is included);
  bin:          (with torch installed, to write the file; --no-bin skips it) the same tensors saved as
                pytorch_model.bin by torch.save and converted once, cache warm (the converter reads it
                without torch, mapping each tensor's bytes in the zip as for safetensors).
"cold" runs start right after the file was evicted from the page cache (posix_fadvise DONTNEED) and
are repeated (median reported: disk timings on a shared VM vary by several x between runs); "warm"
runs read the cached file. Peak RSS is the child's VmHWM at exit (max over all conversion runs).
Throughput uses the conversion's own wall time (the CLI reports it, from reading the headers to the
rename; interpreter start-up and imports are in process_s). The conversion uses several threads; the
plain read uses one and is I/O bound, so on a machine shared with other CPU-heavy work the ratio
drops: `loadavg_1min` (before, after) and the conversion's CPU seconds are printed for that reason.
`convert_no_sync` is the same conversion with `--no-sync` (no durable fsync before the rename: the
rate of the converter itself, data left in the page cache); plain_copy_ratio_to_read shows what writing the
bytes once durably costs on this disk by itself.
Targets (issue 3): peak RSS <= 2 x largest tensor + 500 MB; throughput >= 50 % of the plain read.
Prints one JSON line. Run: python benchmarks/convert.py [--keep DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

MB = 1e6


def widened_config():
  """~1.1 GB in bf16: tiny's structure with a 2048-wide, 8-layer LLM and a 1024-wide, 4-block EVA at 224 px."""
  from kangaroo_jax.config import KangarooConfig, LlamaConfig, ProjectorConfig, VisionConfig

  return KangarooConfig(
      llm=LlamaConfig(
          vocab_size=32000,
          hidden_size=2048,
          intermediate_size=5632,
          num_layers=8,
          num_heads=16,
          num_kv_heads=4,
          head_dim=128,
          max_position_embeddings=4096,
          bos_token_id=1,
          eos_token_ids=(2,),
      ),
      vision=VisionConfig(
          image_size=224, patch_size=14, width=1024, num_layers=4, head_width=64, mlp_hidden=2730, pt_hw_seq_len=16
      ),
      projector=ProjectorConfig(),
  )  # written in bf16: the import's --dtype default


# Runs `-m module args...` or `-c code args...` and prints the process's peak RSS (VmHWM), run time and
# CPU time (user + sys, all threads; start-up and imports included).
# VmHWM starts afresh at exec; ru_maxrss of a forked child would include the parent's memory at fork.
_WRAPPER = """
import runpy, sys, time
t0 = time.perf_counter()
code = 0
try:
  mode, target = sys.argv[1], sys.argv[2]
  sys.argv = [target] + sys.argv[3:]
  if mode == '-m':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
  else:
    exec(compile(target, '<bench>', 'exec'), {'__name__': '__main__'})
except SystemExit as e:
  code = e.code or 0
import resource
hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
ru = resource.getrusage(resource.RUSAGE_SELF)
print('BENCH', hwm, time.perf_counter() - t0, ru.ru_utime + ru.ru_stime, flush=True)
sys.exit(code)
"""


def _run_child(mode: str, target: str, *args: str) -> tuple[float, int, str]:
  """(seconds in the child, peak RSS bytes, output); the child's CPU seconds are `_cpu_seconds(output)`."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-c", _WRAPPER, mode, target, *args],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env=env,
      cwd=ROOT,
  )
  out = proc.stdout.decode(errors="replace")
  if proc.returncode != 0:
    raise RuntimeError(f"{mode} {target[:60]} {args} failed ({proc.returncode}):\n{out[-4000:]}")
  fields = [line for line in out.splitlines() if line.startswith("BENCH ")][-1].split()
  return float(fields[2]), int(fields[1]), out


def _cpu_seconds(out: str) -> float:
  return float([line for line in out.splitlines() if line.startswith("BENCH ")][-1].split()[3])


def _evict(path: str) -> None:
  """Drops `path` from the page cache, so the next read comes from disk, after flushing every dirty
  page on the machine (the --no-sync run leaves ~1 GB for the kernel to write back, which would
  otherwise slow down whichever run comes next: the plain read, in the loop below)."""
  os.sync()
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


_PLAIN_READ = """
import sys
n = 0
with open(sys.argv[1], 'rb', buffering=0) as f:
  view = memoryview(bytearray(16 << 20))
  while True:
    got = f.readinto(view)
    if not got:
      break
    n += got
print('READ', n)
"""

_PLAIN_COPY = """
import os, sys
n = 0
with open(sys.argv[1], 'rb', buffering=0) as f, open(sys.argv[2], 'wb', buffering=0) as g:
  view = memoryview(bytearray(16 << 20))
  while True:
    got = f.readinto(view)
    if not got:
      break
    g.write(view[:got])
    n += got
  os.fsync(g.fileno())
os.remove(sys.argv[2])
print('READ', n)
"""

_IMPORT_FLOOR = "import tools.convert_weights.convert, kangaroo_jax.pretrained, orbax.checkpoint, tensorstore"


def _convert(src: str, dst: str, cfg_path: str, *extra: str) -> dict:
  shutil.rmtree(dst, ignore_errors=True)
  proc_s, rss, out = _run_child(
      "-m", "tools.convert_weights", "import", src, dst, "--config-json", cfg_path, "--quiet", *extra
  )
  seconds = float(re.search(r"dtype \w+, ([0-9.]+)s;", out).group(1))
  return {"seconds": seconds, "process_seconds": round(proc_s, 2), "peak_rss": rss, "cpu_seconds": _cpu_seconds(out)}


def _plain_read(path: str, size: int) -> float:
  seconds, _, out = _run_child("-c", _PLAIN_READ, path)
  assert f"READ {size}" in out, out
  return seconds


def _plain_copy(path: str, size: int, work: str) -> float:
  seconds, _, out = _run_child("-c", _PLAIN_COPY, path, os.path.join(work, "copy.tmp"))
  assert f"READ {size}" in out, out
  return seconds


_SAVE_BIN = """
import shutil, sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1] + '/model.safetensors'), sys.argv[2] + '/pytorch_model.bin')
shutil.copy(sys.argv[1] + '/config.json', sys.argv[2] + '/config.json')
"""


def _bin_run(src: str, work: str, cfg_path: str, size: int, largest: int) -> dict:
  try:
    import torch  # noqa: F401
  except ImportError:
    return {"skipped": "torch not installed"}
  bin_src, bin_dst = os.path.join(work, "bin"), os.path.join(work, "bin_dst")
  os.makedirs(bin_src, exist_ok=True)
  _run_child("-c", _SAVE_BIN, src, bin_src)
  _, floor_rss, _ = _run_child("-c", _IMPORT_FLOOR)
  run = _convert(bin_src, bin_dst, cfg_path)
  return {
      "file_bytes": os.path.getsize(os.path.join(bin_src, "pytorch_model.bin")),
      "peak_rss_bytes": run["peak_rss"],
      "import_floor_rss_bytes": floor_rss,
      "peak_rss_above_floor_bytes": run["peak_rss"] - floor_rss,
      "peak_rss_ok": run["peak_rss"] <= 2 * largest + 500 * MB,
      "convert_mb_s": round(size / MB / run["seconds"], 1),
  }


def _median(xs):
  return sorted(xs)[len(xs) // 2]


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder, removed)")
  ap.add_argument("--repeats", type=int, default=5, help="cold runs of each measurement (median reported)")
  ap.add_argument("--no-bin", action="store_true", help="skip the pytorch_model.bin conversion")
  args = ap.parse_args()
  import ml_dtypes

  from tools.convert_weights import synthetic

  work = args.keep or tempfile.mkdtemp(prefix="convert-bench-")
  os.makedirs(work, exist_ok=True)
  src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
  try:
    t0 = time.perf_counter()
    cfg = widened_config()
    info = synthetic.write_checkpoint(src, cfg, dtype=ml_dtypes.bfloat16, seed=0)
    synth_s = time.perf_counter() - t0
    cfg_path = os.path.join(work, "bench_config.json")
    with open(cfg_path, "w") as f:
      f.write(cfg.to_json())
    path, size = info["path"], os.path.getsize(info["path"])

    runs = {"read": [], "copy": [], "convert": [], "convert_no_sync": []}
    cpu = []
    peak = 0
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
      _evict(path)
      runs["read"].append(_plain_read(path, size))
      _evict(path)
      runs["copy"].append(_plain_copy(path, size, work))
      _evict(path)
      run = _convert(src, dst, cfg_path)
      runs["convert"].append(run["seconds"])
      cpu.append(run["cpu_seconds"])
      peak = max(peak, run["peak_rss"])
      _evict(path)
      run = _convert(src, dst, cfg_path, "--no-sync")
      runs["convert_no_sync"].append(run["seconds"])
      peak = max(peak, run["peak_rss"])
    cold = {k: _median(v) for k, v in runs.items()}
    warm_read = _plain_read(path, size)
    warm = _convert(src, dst, cfg_path)
    peak = max(peak, warm["peak_rss"])
    _, floor_rss, _ = _run_child("-c", _IMPORT_FLOOR)
    with open(os.path.join(dst, "conversion_report.json")) as f:
      mapped = json.load(f)["mapped"]

    def rate(seconds):
      return round(size / MB / seconds, 1)

    largest = info["largest_tensor_bytes"]
    target_rss = 2 * largest + 500 * MB
    result = {
        "checkpoint_bytes": size,
        "tensors": info["tensors"],
        "mapped": mapped,
        "largest_tensor_bytes": largest,
        "peak_rss_bytes": peak,
        "peak_rss_target_bytes": int(target_rss),
        "peak_rss_ok": peak <= target_rss,
        "import_floor_rss_bytes": floor_rss,
        "peak_rss_above_floor_bytes": peak - floor_rss,
        "cold_median_of": args.repeats,
        "cold": {
            "convert_mb_s": rate(cold["convert"]),
            "plain_read_mb_s": rate(cold["read"]),
            "plain_copy_mb_s": rate(cold["copy"]),
            "ratio_to_read": round(cold["read"] / cold["convert"], 3),
            "ratio_to_copy": round(cold["copy"] / cold["convert"], 3),
            "plain_copy_ratio_to_read": round(cold["read"] / cold["copy"], 3),
            "convert_no_sync_mb_s": rate(cold["convert_no_sync"]),
            "no_sync_ratio_to_read": round(cold["read"] / cold["convert_no_sync"], 3),
            "convert_no_sync_s_runs": runs["convert_no_sync"],
            "convert_s_runs": runs["convert"],
            "read_s_runs": [round(x, 3) for x in runs["read"]],
            "copy_s_runs": [round(x, 3) for x in runs["copy"]],
            "convert_process_cpu_s_runs": [round(x, 2) for x in cpu],
        },
        "warm": {
            "convert_mb_s": rate(warm["seconds"]),
            "plain_read_mb_s": rate(warm_read),
            "ratio_to_read": round(warm_read / warm["seconds"], 3),
            "process_s": warm["process_seconds"],
        },
        "throughput_ok": cold["read"] / cold["convert"] >= 0.5,
        "synthesize_s": round(synth_s, 1),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    if not args.no_bin:
      result["bin"] = _bin_run(src, work, cfg_path, size, largest)
    print(json.dumps(result))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
