"""TEST-ONLY torchvision.ops.misc stand-in (see tests/_stubs/torchvision/__init__.py)."""

import torch


class FrozenBatchNorm2d(torch.nn.Module):
  """Placeholder so timm's `isinstance` / import checks resolve; the EVA tests never build one."""

  def __init__(self, *args, **kwargs):
    raise NotImplementedError("torchvision test stub: FrozenBatchNorm2d is not available")
