"""The demo's faults: what breaks, and at which step.

Steps are numbered from 1. The spike, the NaN batch and the preemption hit
whatever runs at their step. The poisoned data is part of the data stream:
it covers the batches that the steps of its window read in a run that never
skips data (the plain run), so a run that rolls back and skips past them does
not meet them again.
"""

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

SPIKE_FACTOR = 1e4

DESCRIPTIONS = {
    'spike': f'{SPIKE_FACTOR:.0e}x gradient spike (loss weights scaled)',
    'poison': 'poisoned data: a growing share of the targets replaced by noise',
    'preempt': 'simulated preemption (the guarded run restarts from disk)',
    'nan': 'NaN batch (one loss weight is NaN)',
}


@dataclasses.dataclass(frozen=True)
class Fault:
  """One fault: ``name`` at steps ``start`` to ``start + length - 1``.

  The preemption comes after step ``start``.
  """

  name: str
  start: int
  length: int = 1

  @property
  def end(self) -> int:
    return self.start + self.length

  def __str__(self) -> str:
    where = f'step {self.start}'
    if self.length > 1:
      where = f'steps {self.start}-{self.end - 1}'
    elif self.name == 'preempt':
      where = f'after step {self.start}'
    return f'{where}: {DESCRIPTIONS[self.name]}'

  def covers_data(self, position: int) -> bool:
    """Whether the batch at ``position`` (from 0) is in a poisoned window."""
    return self.name == 'poison' and self.start <= position + 1 < self.end

  def hits_step(self, step: int) -> bool:
    return self.name in ('spike', 'nan') and self.start == step


def default_faults(steps: int) -> tuple[Fault, ...]:
  """One fault of each kind at fixed fractions of a ``steps``-long run."""
  return (
      Fault('spike', round(0.3 * steps)),
      Fault('poison', round(0.45 * steps), max(12, steps // 12)),
      Fault('preempt', round(0.62 * steps)),
      Fault('nan', round(0.8 * steps)),
  )


_SPEC = re.compile(r'^(?P<name>[a-z]+)(@(?P<start>\d+)(-(?P<end>\d+))?)?$')


def parse_faults(specs: Sequence[str], steps: int) -> tuple[Fault, ...]:
  """Faults from ``NAME[@STEP]`` specs (``poison@START-END`` for a window).

  ``none`` means no faults; a bare ``NAME`` takes its default step.

  Examples:
    >>> from optax_guard.demo.faults import parse_faults
    >>> for fault in parse_faults(['nan@30', 'poison@10-19'], steps=50):
    ...   print(fault)
    steps 10-19: poisoned data: a growing share of the targets replaced by noise
    step 30: NaN batch (one loss weight is NaN)
  """
  if list(specs) == ['none']:
    return ()
  defaults = {fault.name: fault for fault in default_faults(steps)}
  faults = {}
  for spec in specs:
    match = _SPEC.match(spec)
    if match is None or match['name'] not in defaults:
      raise ValueError(
          f'bad fault {spec!r}: expected NAME, NAME@STEP or poison@START-END'
          f' with NAME in {sorted(defaults)}, or "none".'
      )
    name = match['name']
    fault = defaults[name]
    if match['start'] is not None:
      start = int(match['start'])
      length = fault.length if name == 'poison' else 1
      if match['end'] is not None:
        if name != 'poison':
          raise ValueError(f'only poison takes a window, got {spec!r}.')
        length = int(match['end']) - start + 1
        if length < 1:
          raise ValueError(f'empty poison window in {spec!r}.')
      fault = Fault(name, start, length)
    if not 1 <= fault.start <= steps:
      raise ValueError(f'fault {spec!r} is outside the run (steps={steps}).')
    if name in faults:
      raise ValueError(f'fault {name!r} is given twice.')
    faults[name] = fault
  return tuple(sorted(faults.values(), key=lambda f: f.start))


class FaultInjector:
  """Breaks the batches of a stream at the planned positions."""

  def __init__(self, faults: Sequence[Fault], *, vocab_size: int, seed: int):
    self.faults = tuple(faults)
    self.vocab_size = vocab_size
    self.seed = seed

  @property
  def preempt_step(self) -> Optional[int]:
    for fault in self.faults:
      if fault.name == 'preempt':
        return fault.start
    return None

  def fault_at(self, step: int, position: int) -> Optional[Fault]:
    for fault in self.faults:
      if fault.hits_step(step) or fault.covers_data(position):
        return fault
    return None

  def apply(self, step: int, position: int, batch: dict[str, np.ndarray]):
    """Returns ``(batch, fault)``: the batch of data ``position`` as broken
    for ``step``."""
    fault = self.fault_at(step, position)
    if fault is None:
      return batch, None
    tokens, weights = batch['tokens'].copy(), batch['weights'].copy()
    if fault.name == 'nan':
      weights[0, 0] = np.nan
    elif fault.name == 'spike':
      weights *= SPIKE_FACTOR
    elif fault.name == 'poison':
      # The share of noise grows over the window, from 1/length to all, like
      # a data source going bad.
      share = (position + 2 - fault.start) / fault.length
      rng = np.random.default_rng((self.seed, position, 1))
      noisy = rng.random(tokens.shape) < share
      noise = rng.integers(0, self.vocab_size, tokens.shape, dtype=np.int32)
      tokens = np.where(noisy, noise, tokens).astype(np.int32)
    return {'tokens': tokens, 'weights': weights}, fault
