"""Generation with a KV cache, chat, and the pieces they are built from."""

from kangaroo_jax.inference.cache import KVCache, bucket_length, grow_cache, init_cache, with_lengths
from kangaroo_jax.inference.engine import Engine, Generation
from kangaroo_jax.inference.sampling import SamplingConfig, filter_logits, sample

__all__ = [
    "Engine",
    "Generation",
    "KVCache",
    "SamplingConfig",
    "bucket_length",
    "filter_logits",
    "grow_cache",
    "init_cache",
    "sample",
    "with_lengths",
]
