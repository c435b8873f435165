"""kangaroo-jax: a JAX/Flax NNX implementation of the Kangaroo long-context video-language model."""

import flax as _flax

# Parameters carry logical axis names that kangaroo_jax.parallel.rules resolves to mesh shardings;
# flax's eager sharding would demand a mesh at construction time and bypass that single table.
_flax.config.update("flax_always_shard_variable", False)

from kangaroo_jax.config import KangarooConfig, LlamaConfig, ProjectorConfig, VisionConfig, preset  # noqa: E402
from kangaroo_jax.models import Kangaroo  # noqa: E402
from kangaroo_jax.pretrained import from_pretrained  # noqa: E402
from kangaroo_jax.run_options import RunOptions  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Kangaroo", "KangarooConfig", "LlamaConfig", "ProjectorConfig", "RunOptions", "VisionConfig",
           "from_pretrained", "preset"]
