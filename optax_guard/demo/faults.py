"""The demo's fault schedule: what breaks, and at which step.

A schedule is a list of ``NAME@STEP`` specs (``poison@START-END`` for a
window). Step ``s`` reads batch ``s - 1`` in both runs (after a rollback the
guarded run's step keeps counting batches drawn, as :func:`optax_guard.fit`
does), so a fault hits the same batch in both. The faults themselves are
:mod:`optax_guard.testing`'s; the preemption is a real SIGTERM after its
step.
"""

import re
from typing import Sequence

from optax_guard import testing

SPIKE_SCALE = 1e4
POISON_SCALE = 30.0

DESCRIPTIONS = {
    'spike': f'{SPIKE_SCALE:.0e}x gradient spike (loss weights scaled)',
    'poison': f'corrupt data shard (loss weights x{POISON_SCALE:g})',
    'preempt': 'simulated preemption (SIGTERM; the run restarts from disk)',
    'nan': 'NaN batch (loss weights NaN)',
}
# All three break the batch's data (its float loss weights), so the steps
# are the plain ones: no fault code in the compiled step.
_KINDS = {
    'spike': testing.Fault('poisoned_batch', SPIKE_SCALE),
    'poison': testing.Fault('poisoned_batch', POISON_SCALE),
    'nan': testing.Fault('poisoned_batch', float('nan')),
}
_SPEC = re.compile(r'^(?P<name>[a-z]+)(@(?P<start>\d+)(-(?P<end>\d+))?)?$')


def default_specs(steps: int) -> tuple[str, ...]:
  """One fault of each kind at 30%, 45%, 70% and 80% of the run."""
  poison = round(0.45 * steps)
  return (f'spike@{round(0.3 * steps)}',
          f'poison@{poison}-{poison + max(12, steps // 12) - 1}',
          f'preempt@{round(0.7 * steps)}', f'nan@{round(0.8 * steps)}')


def schedule(specs: Sequence[str], steps: int) -> dict[str, tuple[int, int]]:
  """``{name: (first_step, last_step)}`` from specs, sorted by step.

  ``none`` means no faults; a bare ``NAME`` takes its default step.

  Examples:
    >>> from optax_guard.demo.faults import schedule
    >>> schedule(['nan@30', 'poison@10-19'], steps=50)
    {'poison': (10, 19), 'nan': (30, 30)}
  """
  if list(specs) == ['none']:
    return {}
  defaults = {spec.split('@')[0]: spec for spec in default_specs(steps)}
  windows = {}
  for spec in specs:
    match = _SPEC.match(spec)
    if match is None or match['name'] not in defaults:
      raise ValueError(
          f'bad fault {spec!r}: expected NAME, NAME@STEP or poison@START-END'
          f' with NAME in {sorted(defaults)}, or "none".'
      )
    name = match['name']
    if match['start'] is None:
      match = _SPEC.match(defaults[name])
    start = int(match['start'])
    end = int(match['end'] or start)
    if name == 'poison' and match['end'] is None:
      end = start + max(12, steps // 12) - 1
    if name != 'poison' and end != start:
      raise ValueError(f'only poison takes a window, got {spec!r}.')
    if end < start:
      raise ValueError(f'empty poison window in {spec!r}.')
    if not 1 <= start <= steps:
      raise ValueError(f'fault {spec!r} is outside the run (steps={steps}).')
    if name in windows:
      raise ValueError(f'fault {name!r} is given twice.')
    windows[name] = (start, end)
  return dict(sorted(windows.items(), key=lambda item: item[1]))


def describe(name: str, window: tuple[int, int]) -> str:
  """``'steps 10-19: corrupt data shard ...'``."""
  start, end = window
  where = f'steps {start}-{end}' if end > start else f'step {start}'
  if name == 'preempt':
    where = f'after step {start}'
  return f'{where}: {DESCRIPTIONS[name]}'


def fault_at(windows: dict[str, tuple[int, int]], step: int):
  """The name of the fault that breaks ``step``'s batch, or ``None``."""
  for name, (start, end) in windows.items():
    if name != 'preempt' and start <= step <= end:
      return name
  return None


def plan(windows: dict[str, tuple[int, int]], steps: int):
  """``{batch index: optax_guard.testing.Fault}`` for a FaultInjector."""
  return {
      step - 1: _KINDS[name]
      for step in range(1, steps + 1)
      if (name := fault_at(windows, step)) is not None
  }
