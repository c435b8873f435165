"""Flax NNX models: EVA02 vision tower, projector, Llama-3 decoder and the assembled Kangaroo."""

from kangaroo_jax.models.eva_vit import EvaVisionTransformer
from kangaroo_jax.models.kangaroo import Kangaroo, check_visual_placeholders, merge_visual_tokens
from kangaroo_jax.models.llama import LlamaForCausalLM, LlamaModel
from kangaroo_jax.models.projector import MultimodalProjector, TemporalPatchify, sinusoidal_time_embedding

__all__ = [
    "EvaVisionTransformer",
    "Kangaroo",
    "LlamaForCausalLM",
    "LlamaModel",
    "MultimodalProjector",
    "TemporalPatchify",
    "check_visual_placeholders",
    "merge_visual_tokens",
    "sinusoidal_time_embedding",
]
