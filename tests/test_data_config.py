"""One DataConfig for the trainer's `data` section and the pipeline, with one-line errors naming data.<field>."""

import ml_collections
import pytest

from configs.common import base
from kangaroo_jax.config import ConfigError
from kangaroo_jax.data.config import DataConfig
from tests.train_helpers import tiny_config
from train.config import from_configdict


def test_the_trainer_and_the_pipeline_share_one_class():
  cfg = tiny_config(**{"data.packing_bins": 2, "data.keep_aspect": True})  # pipeline knobs reach c.data too
  assert type(cfg.data) is DataConfig
  assert (cfg.data.packing_bins, cfg.data.keep_aspect, cfg.data.frame_hw) == (2, True, (56, 56))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(seq_len=0), "data.seq_len: expected >= 1, got 0"),
        (dict(batch_size="8"), "data.batch_size: expected an int, got '8'"),
        (dict(source="files"), "data.source: got 'files', expected one of ('synthetic', 'grain')"),
        (dict(max_frames=5), "data.max_frames: frame counts must be even (patchify pairs frames), got max_frames=5"),
        (dict(num_frames=10), "data.num_frames: 10 frames per video exceed max_frames=8"),
        (dict(fps=1.0), "data.fps: set num_frames or fps, not both (num_frames=8)"),
        (dict(max_skip_rate=float("nan")), "data.max_skip_rate: expected a finite number, got nan"),
        (dict(frame_size=(56,)), "data.frame_size: expected a positive int or (H, W), got (56,)"),
        (dict(source="grain", dataset="d"), "data.tokenizer: required when data.source='grain'"),
        (dict(tfds_mapping="video_caption"), "data.tfds_mapping: only for a TFDS dataset"),
        (dict(dataset="tfds:"), "data.dataset='tfds:': expected tfds:NAME[/CONFIG][:VERSION][:SPLIT]"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(changes, message):
  with pytest.raises(ConfigError) as e:
    DataConfig(**changes)
  assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_the_trainer_reports_the_same_errors_and_takes_square_frames_only():
  with pytest.raises(ConfigError, match=r"^data\.num_frames: 10 frames per video exceed max_frames=4$"):
    tiny_config(**{"data.num_frames": 10})
  c = base("test")
  c.model.preset = "tiny"
  # A pair from the start: a ConfigDict keeps each key's type, so an int frame_size cannot become one.
  c.data = ml_collections.ConfigDict({**c.data.to_dict(), "source": "synthetic", "frame_size": (56, 84)})
  with pytest.raises(ConfigError, match=r"^data\.frame_size: expected an int \(the trainer takes square frames\)"):
    from_configdict(c)
  with pytest.raises(ConfigError, match=r"^data\.max_frame: unknown key\(s\) \['max_frame'\]"):
    tiny_config(**{"data.max_frame": 4})
