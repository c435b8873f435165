"""kangaroo-jax: a JAX/Flax NNX implementation of the Kangaroo long-context video-language model."""

# First: sets flax's variable-sharding mode before any model is built (see the comment there).
from kangaroo_jax import model_tree as _model_tree  # noqa: F401

from kangaroo_jax.config import KangarooConfig, LlamaConfig, ProjectorConfig, VisionConfig, preset  # noqa: E402
from kangaroo_jax.inference.chat import Chat  # noqa: E402
from kangaroo_jax.models import Kangaroo  # noqa: E402
from kangaroo_jax.pretrained import PretrainedKangaroo, from_pretrained  # noqa: E402
from kangaroo_jax.run_options import RunOptions  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Chat",
    "Kangaroo",
    "KangarooConfig",
    "LlamaConfig",
    "PretrainedKangaroo",
    "ProjectorConfig",
    "RunOptions",
    "VisionConfig",
    "from_pretrained",
    "preset",
]
