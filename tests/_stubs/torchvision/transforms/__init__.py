"""TEST-ONLY torchvision.transforms stand-in (see tests/_stubs/torchvision/__init__.py).

Only the names timm subclasses or references while its modules load are defined.
"""

from torchvision.transforms.functional import InterpolationMode  # noqa: F401


class _Unavailable:

  def __init__(self, *args, **kwargs):
    raise NotImplementedError(f"torchvision test stub: {type(self).__name__} is not available")


class ToTensor(_Unavailable):
  pass
