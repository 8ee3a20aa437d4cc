"""The demo's faults: what breaks, and at which step.

Steps are numbered from 1 and step ``s`` reads batch ``s - 1`` of the data
stream in both runs (after a rollback the guarded run's step keeps counting
batches drawn, as in :func:`optax_guard.fit`). The spike, the NaN batch and
the poisoned window break the batches of their steps; the preemption stops
the guarded run after its step.
"""

import dataclasses
import re
from typing import Any, Optional, Sequence

import numpy as np

SPIKE_FACTOR = 1e4

DESCRIPTIONS = {
    'spike': f'{SPIKE_FACTOR:.0e}x gradient spike (loss weights scaled)',
    'poison': 'poisoned data: 50% to 100% of the characters replaced by noise',
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

  def breaks(self, step: int) -> bool:
    """Whether this fault breaks the batch of ``step``."""
    return self.name != 'preempt' and self.start <= step < self.end


def default_faults(steps: int) -> tuple[Fault, ...]:
  """One fault of each kind at fixed fractions of a ``steps``-long run."""
  return (
      Fault('spike', round(0.3 * steps)),
      Fault('poison', round(0.45 * steps), max(12, steps // 12)),
      Fault('preempt', round(0.7 * steps)),
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
    steps 10-19: poisoned data: 50% to 100% of the characters replaced by noise
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


class FaultyBatches:
  """A :class:`~optax_guard.demo.data.BatchIterator` with faults injected.

  Restorable like the stream it wraps: its state is the stream's position.
  """

  def __init__(self, batches: Any, faults: Sequence[Fault], *,
               vocab_size: int, seed: int):
    self.batches = batches
    self.faults = tuple(faults)
    self.vocab_size = vocab_size
    self.seed = seed

  def __iter__(self) -> 'FaultyBatches':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = self.batches.position + 1
    return self.apply(step, next(self.batches))

  def get_state(self) -> dict[str, Any]:
    return self.batches.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self.batches.set_state(state)

  @property
  def preempt_step(self) -> Optional[int]:
    for fault in self.faults:
      if fault.name == 'preempt':
        return fault.start
    return None

  def fault_at(self, step: int) -> Optional[Fault]:
    for fault in self.faults:
      if fault.breaks(step):
        return fault
    return None

  def apply(self, step: int, batch: dict[str, np.ndarray]):
    """The batch of ``step`` as the faults break it."""
    fault = self.fault_at(step)
    if fault is None:
      return batch
    tokens, weights = batch['tokens'].copy(), batch['weights'].copy()
    if fault.name == 'nan':
      weights[0, 0] = np.nan
    elif fault.name == 'spike':
      weights *= SPIKE_FACTOR
    elif fault.name == 'poison':
      # The share of noise grows over the window, from a half to all, like
      # a data source going bad.
      share = 0.5 + 0.5 * (step + 1 - fault.start) / fault.length
      rng = np.random.default_rng((self.seed, step, 1))
      noisy = rng.random(tokens.shape) < share
      noise = rng.integers(0, self.vocab_size, tokens.shape, dtype=np.int32)
      tokens = np.where(noisy, noise, tokens).astype(np.int32)
    return {'tokens': tokens, 'weights': weights}
