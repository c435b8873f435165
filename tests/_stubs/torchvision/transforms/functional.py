"""TEST-ONLY torchvision.transforms.functional stand-in (see tests/_stubs/torchvision/__init__.py)."""

import enum


class InterpolationMode(enum.Enum):
  """Names timm maps its interpolation strings onto; values follow the PIL-style strings."""

  NEAREST = "nearest"
  NEAREST_EXACT = "nearest-exact"
  BILINEAR = "bilinear"
  BICUBIC = "bicubic"
  BOX = "box"
  HAMMING = "hamming"
  LANCZOS = "lanczos"
