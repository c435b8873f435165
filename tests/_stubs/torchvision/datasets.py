"""TEST-ONLY torchvision.datasets stand-in (see tests/_stubs/torchvision/__init__.py).

timm.data imports these names at module load; the EVA tests never construct a dataset.
"""


class _Unavailable:

  def __init__(self, *args, **kwargs):
    raise NotImplementedError(f"torchvision test stub: {type(self).__name__} is not available")


class CIFAR10(_Unavailable):
  pass


class CIFAR100(_Unavailable):
  pass


class MNIST(_Unavailable):
  pass


class KMNIST(_Unavailable):
  pass


class FashionMNIST(_Unavailable):
  pass


class ImageFolder(_Unavailable):
  pass
