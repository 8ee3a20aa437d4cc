"""Plain-Python (float64) references of the published algorithms.

These follow the authors' code line by line, with no JAX, so that the
transformations can be checked step by step against them.
"""

import math

import numpy as np


class ZClipReference:
  """ZClip as in bluorion-com/ZClip ``zclip/zclip.py``, on scalar norms.

  ``step(norm)`` returns the threshold the step was clipped to (``inf`` when
  none), after updating the statistics exactly as the reference does. The
  only difference is ours too: a non-finite norm is ignored.
  """

  def __init__(self, alpha=0.97, z_thresh=2.5, max_norm=None, eps=1e-6,
               warmup_steps=25, mode='zscore', clip_option='adaptive_scaling',
               clip_factor=1.0, skip_update_on_spike=False):
    self.alpha, self.z_thresh, self.max_norm, self.eps = (
        alpha, z_thresh, max_norm, eps)
    self.warmup_steps, self.mode, self.clip_option = (
        warmup_steps, mode, clip_option)
    self.clip_factor, self.skip_update_on_spike = (
        clip_factor, skip_update_on_spike)
    self.buffer, self.initialized, self.mean, self.var = [], False, None, None

  def _compute_clip_val(self, norm):
    std = self.var ** 0.5
    if self.mode == 'percentile':
      threshold = self.mean + self.z_thresh * std
      return threshold if norm > threshold else None
    z = (norm - self.mean) / (std + self.eps)
    if z > self.z_thresh:
      if self.clip_option == 'adaptive_scaling':
        eta = z / self.z_thresh
        return (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
      return self.mean
    return None

  def step(self, norm):
    if not math.isfinite(norm):
      return math.inf
    if not self.initialized:
      self.buffer.append(norm)
      if len(self.buffer) >= self.warmup_steps:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(
            self.buffer)
        self.initialized, self.buffer = True, []
      if self.max_norm is not None and norm > self.max_norm:
        return self.max_norm
      return math.inf
    clip_val = self._compute_clip_val(norm)
    adaptive = clip_val if clip_val is not None else norm
    effective = adaptive if self.max_norm is None else min(adaptive,
                                                           self.max_norm)
    threshold = effective if norm > effective else math.inf
    if not (clip_val is not None and self.skip_update_on_spike):
      observed = clip_val if clip_val is not None else norm
      self.mean = self.alpha * self.mean + (1 - self.alpha) * observed
      self.var = self.alpha * self.var + (1 - self.alpha) * (
          observed - self.mean) ** 2
    return threshold


def autoclip_thresholds(norms, quantile, history_length):
  """AutoClip's per-step clip value (Seetharaman et al., Algorithm 1)."""
  history, thresholds = [], []
  for norm in norms:
    if math.isfinite(norm):
      history = (history + [norm])[-history_length:]
    thresholds.append(
        float(np.quantile(history, quantile)) if history else math.inf)
  return thresholds
