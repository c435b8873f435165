"""Video-text input pipeline: prompt layout, video decoding/preprocessing, ArrayRecord datasets, Grain packing.

See docs/pipeline_contracts.md for the interfaces the trainer and inference code rely on.
"""

from kangaroo_jax.data.prompt import EncodedConversation, PromptError, VideoMarkers, encode_conversation
from kangaroo_jax.data.tiny_tokenizer import LLAMA3_SPECIALS, build_chat_sentencepiece
from kangaroo_jax.data.video import (
    CLIP_MEAN,
    CLIP_STD,
    DecodedVideo,
    VideoError,
    frame_size_for,
    load_video,
    normalize_frames,
    preprocess_frames,
    sample_indices,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DecodedVideo",
    "EncodedConversation",
    "LLAMA3_SPECIALS",
    "PromptError",
    "VideoError",
    "VideoMarkers",
    "build_chat_sentencepiece",
    "encode_conversation",
    "frame_size_for",
    "load_video",
    "normalize_frames",
    "preprocess_frames",
    "sample_indices",
]
