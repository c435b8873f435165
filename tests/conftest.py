"""Test setup: 8 fake CPU devices, float32 matmuls, no network.

XLA_FLAGS must be set before jax is imported anywhere, so it is done here at collection time.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TPU ahead-of-time tests (libtpu, no TPU): no metadata server to ask, and both xdist workers may load libtpu.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# CLIs enable a persistent compilation cache; tests keep it inside the checkout, never in ~/.cache.
os.environ.setdefault(
    "KANGAROO_JAX_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
