"""Interleaved timing: every candidate is measured in the same rounds.

A lone wall-clock time on a shared machine says little: another process, a
thermal limit or the allocator's mood moves it by tens of per cent. What does
hold is a *ratio* taken between candidates measured side by side. So
:func:`measure` warms every candidate up (compilation included), then runs
``rounds`` rounds; in each round every candidate runs one sample (a few
calls, blocked on at the end) in an order rotated from round to round.
:class:`Timings` quotes medians with their inter-quartile range, and the
ratio of two candidates is the median of their per-round ratios.
"""

import dataclasses
import gc
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np


@dataclasses.dataclass
class Candidate:
  """One thing to time.

  Attributes:
    name: how tables and ratios call it.
    run: runs one iteration (e.g. one train step, threading its own state)
      and returns arrays that are ready when the iteration is done. It may
      dispatch asynchronously: the timer blocks on the last call's result.
    baseline: the name of the candidate its ratio is quoted against, if any.
    settle: called after each of its samples, untimed, e.g. to wait for a
      background write that must not slow down the next candidate.
  """

  name: str
  run: Callable[[], Any]
  baseline: Optional[str] = None
  settle: Optional[Callable[[], Any]] = None


@dataclasses.dataclass(frozen=True)
class Spread:
  """The median and the quartiles of a sample."""

  median: float
  q1: float
  q3: float

  @classmethod
  def of(cls, values: Sequence[float]) -> 'Spread':
    q1, median, q3 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
    return cls(float(median), float(q1), float(q3))

  @property
  def iqr(self) -> float:
    return self.q3 - self.q1


@dataclasses.dataclass
class Timings:
  """Per-round seconds per call of every candidate of one :func:`measure`."""

  seconds: dict[str, list[float]]
  calls_per_sample: dict[str, int]
  baselines: dict[str, Optional[str]]

  def time(self, name: str) -> Spread:
    """Seconds per call of ``name``."""
    return Spread.of(self.seconds[name])

  def ratio(self, name: str, baseline: str) -> Spread:
    """``name``'s time over ``baseline``'s, round by round."""
    ratios = np.asarray(self.seconds[name]) / np.asarray(self.seconds[baseline])
    return Spread.of(ratios)

  def ratio_fields(self, name: str, baseline: str) -> dict[str, float]:
    """``ratio``, ``ratio_q1`` and ``ratio_q3`` of ``name`` over ``baseline``,
    JSON-ready."""
    ratio = self.ratio(name, baseline)
    return {'ratio': ratio.median, 'ratio_q1': ratio.q1, 'ratio_q3': ratio.q3}

  def comparisons(
      self, pairs: Mapping[str, tuple[str, str]]
  ) -> dict[str, dict[str, float]]:
    """:meth:`ratio_fields` of every ``key: (name, other)`` pair of which
    both candidates were measured here."""
    return {
        key: self.ratio_fields(name, other)
        for key, (name, other) in pairs.items()
        if name in self.seconds and other in self.seconds
    }

  def rows(self) -> list[dict[str, Any]]:
    """One JSON-ready row per candidate, ratios against its baseline."""
    rows = []
    for name, seconds in self.seconds.items():
      spread = self.time(name)
      row = {
          'name': name,
          'median_ms': spread.median * 1e3,
          'q1_ms': spread.q1 * 1e3,
          'q3_ms': spread.q3 * 1e3,
          'rounds': len(seconds),
          'calls_per_sample': self.calls_per_sample[name],
          'baseline': self.baselines[name],
      }
      if self.baselines[name] is not None:
        row.update(self.ratio_fields(name, self.baselines[name]))
      rows.append(row)
    return rows


def _run_sample(candidate: Candidate, calls: int) -> float:
  """Seconds per call of ``calls`` back-to-back calls of ``candidate``."""
  start = time.perf_counter()
  for _ in range(calls):
    result = candidate.run()
  jax.block_until_ready(result)
  seconds = (time.perf_counter() - start) / calls
  if candidate.settle is not None:
    candidate.settle()
  return seconds


def measure(
    candidates: Sequence[Candidate],
    *,
    rounds: int,
    warmup: int = 2,
    min_sample_s: float = 0.05,
    progress: Optional[Callable[[str], None]] = None,
) -> Timings:
  """Times ``candidates`` interleaved, in the same ``rounds``.

  Args:
    candidates: what to time; names must be unique and every ``baseline``
      must name one of them.
    rounds: how many samples of each candidate (>= 1).
    warmup: untimed calls of each candidate before the rounds (>= 1: the
      first call compiles).
    min_sample_s: a sample repeats a fast candidate until it lasts about this
      long, so that timer and dispatch noise stay small against it; the
      number of calls is fixed during warm-up and the same in every round.
    progress: called with a line of text after warm-up and after each round.

  Returns:
    The :class:`Timings`.
  """
  names = [c.name for c in candidates]
  if len(set(names)) != len(names):
    raise ValueError(f'candidate names must be unique, got {names}.')
  for c in candidates:
    if c.baseline is not None and c.baseline not in names:
      raise ValueError(f'{c.name!r} has an unknown baseline {c.baseline!r}.')
  if rounds < 1 or warmup < 1:
    raise ValueError(f'rounds and warmup must be >= 1, got {rounds}, {warmup}.')
  say = progress or (lambda line: None)

  calls = {}
  for c in candidates:
    for _ in range(warmup - 1):
      jax.block_until_ready(c.run())
    single = _run_sample(c, 1)
    calls[c.name] = max(1, math.ceil(min_sample_s / max(single, 1e-9)))
  say(f'warm: {", ".join(f"{n} x{calls[n]}" for n in names)}')

  seconds = {name: [] for name in names}
  gc_was_enabled = gc.isenabled()
  gc.disable()  # A collection inside one sample would bias that candidate.
  try:
    for r in range(rounds):
      # Rotating the order keeps any candidate from always following the
      # same neighbour (caches, allocator state, turbo budget).
      shift = r % len(candidates)
      for c in list(candidates[shift:]) + list(candidates[:shift]):
        seconds[c.name].append(_run_sample(c, calls[c.name]))
      say(f'round {r + 1}/{rounds}')
  finally:
    if gc_was_enabled:
      gc.enable()
  return Timings(
      seconds=seconds,
      calls_per_sample=calls,
      baselines={c.name: c.baseline for c in candidates},
  )
