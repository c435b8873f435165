"""Shared test utilities."""

import numpy as np


def max_rel_error(ours, reference) -> float:
  """max |ours - ref| / max |ref|: one number that is scale-free and does not blow up near zeros."""
  ours = np.asarray(ours, dtype=np.float64)
  reference = np.asarray(reference, dtype=np.float64)
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  scale = np.max(np.abs(reference))
  diff = np.max(np.abs(ours - reference))
  # An all-zero reference (e.g. the gradient of an unused final norm) must be matched exactly-ish.
  return float(diff / scale) if scale > 0 else float(diff)


def torch_state_numpy(module) -> dict:
  """A torch module's state_dict as float32 numpy arrays."""
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}
