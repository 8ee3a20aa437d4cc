"""The demo's fault schedule: what breaks, and at which step.

A schedule is a list of ``NAME@STEP`` specs (``poison@START-END`` and
``ramp@START-END`` for a window; ``shift@STEP`` lasts to the end). Step
``s`` reads the ``s``-th batch in both runs (after a rollback ``og.fit``
keeps counting batches drawn), so a fault hits the same batch in both. The
faults are :mod:`optax_guard.testing`'s: the sudden ones scale the batch's
loss weights or make them NaN, the slow ones replace whole rows of its
tokens with random characters (a ramp 0% -> 100% -> 0%, then a noisier data
mix). The preemption is a real SIGTERM after its step.
"""

import re
from typing import Sequence

from optax_guard import testing

SPIKE_SCALE = 1e4
POISON_SCALE = 30.0
SHIFT_FRACTION = 0.1
WINDOWS = ('poison', 'ramp')  # The faults that take a START-END window.
MULTI_STEP = WINDOWS + ('shift',)  # The faults that hit several steps.
DESCRIPTIONS = {
    'spike': f'{SPIKE_SCALE:.0e}x gradient spike (loss weights scaled)',
    'poison': f'corrupt data shard (loss weights x{POISON_SCALE:g})',
    'preempt': 'simulated preemption (SIGTERM; the run restarts from disk)',
    'nan': 'NaN batch (loss weights NaN)',
    'ramp': 'slow poison: random-character rows ramp 0% -> 100% -> 0%',
    'shift': (f'level shift: {SHIFT_FRACTION:.0%} of the rows random'
              ' characters from here on'),
}
_SCALES = {'spike': SPIKE_SCALE, 'poison': POISON_SCALE}
_SPEC = re.compile(r'^(?P<name>[a-z]+)(@(?P<start>\d+)(-(?P<end>\d+))?)?$')


def default_specs(steps: int) -> tuple[str, ...]:
  """One fault of each kind, at 30%, 33-41%, 45-53%, 70%, 80% and 88%+."""
  poison, ramp = round(0.45 * steps), round(0.33 * steps)
  return (f'spike@{round(0.3 * steps)}',
          f'ramp@{ramp}-{ramp + _length("ramp", steps) - 1}',
          f'poison@{poison}-{poison + _length("poison", steps) - 1}',
          f'preempt@{round(0.7 * steps)}', f'nan@{round(0.8 * steps)}',
          f'shift@{round(0.88 * steps)}')


def _length(name: str, steps: int) -> int:
  """A window's default steps (the ramp's odd: one step holds the peak)."""
  return max(12, steps // 12) if name == 'poison' else 2 * max(
      4, steps // 25) - 1


def schedule(specs: Sequence[str], steps: int) -> dict[str, tuple[int, int]]:
  """``{name: (first_step, last_step)}`` sorted by step; ``none``: no faults.

  Examples:
    >>> from optax_guard.demo.faults import schedule
    >>> schedule(['nan@30', 'poison@10-19', 'shift@40'], steps=50)
    {'poison': (10, 19), 'nan': (30, 30), 'shift': (40, 50)}
  """
  if list(specs) == ['none']:
    return {}
  defaults = {spec.split('@')[0]: spec for spec in default_specs(steps)}
  windows = {}
  for spec in specs:
    match = _SPEC.match(spec)
    if match is None or match['name'] not in defaults:
      raise ValueError(
          f'bad fault {spec!r}: expected NAME, NAME@STEP or NAME@START-END'
          f' ({" or ".join(WINDOWS)}) with NAME in {sorted(defaults)}, or'
          ' "none".')
    name = match['name']
    if match['start'] is None:  # A bare NAME takes its default step.
      match = _SPEC.match(defaults[name])
    start = int(match['start'])
    end = int(match['end'] or start)
    if name in WINDOWS and match['end'] is None:
      end = start + _length(name, steps) - 1
    if name not in WINDOWS and end != start:
      raise ValueError(f'only {" and ".join(WINDOWS)} take a window, got'
                       f' {spec!r}.')
    if end < start:
      raise ValueError(f'empty {name} window in {spec!r}.')
    if not 1 <= start <= steps:
      raise ValueError(f'fault {spec!r} is outside the run (steps={steps}).')
    if name in windows:
      raise ValueError(f'fault {name!r} is given twice.')
    windows[name] = (start, steps if name == 'shift' else end)
  return dict(sorted(windows.items(), key=lambda item: item[1]))


def describe(name: str, window: tuple[int, int]) -> str:
  """``'steps 10-19: corrupt data shard ...'``."""
  start, end = window
  where = {'preempt': f'after step {start}', 'shift': f'steps {start}-'}.get(
      name, f'steps {start}-{end}' if end > start else f'step {start}')
  return f'{where}: {DESCRIPTIONS[name]}'


def fault_at(windows: dict[str, tuple[int, int]], step: int):
  """The fault that breaks ``step``'s batch, or ``None``; where windows
  overlap, the one that started last (a NaN batch in a shift is a NaN)."""
  found = None
  for name, (start, end) in windows.items():
    if name != 'preempt' and start <= step <= end:
      found = name
  return found


def plan(windows: dict[str, tuple[int, int]]) -> dict[int, testing.Fault]:
  """``{step: optax_guard.testing.Fault}`` for a ``FaultInjector`` with
  ``keys='step'``; a later window overrides an earlier one, as in
  :func:`fault_at`."""
  faults = {}
  for name, (start, end) in windows.items():
    if name == 'ramp':  # Up to all the rows at the middle, and back.
      faults.update(testing.ramp(start, (end - start) // 2 + 1))
    elif name == 'shift':
      faults.update(testing.level_shift(start, end + 1, SHIFT_FRACTION,
                                        kind='poisoned_rows'))
    elif name == 'nan':
      faults[start] = testing.Fault('nan_batch')
    elif name != 'preempt':
      faults.update({step: testing.Fault('poisoned_batch', _SCALES[name])
                     for step in range(start, end + 1)})
  return faults
