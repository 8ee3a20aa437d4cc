"""The demo's fault schedule: what breaks, and at which step.

A schedule is a list of ``NAME@STEP`` specs (``poison@START-END`` and
``ramp@START-END`` for a window; ``shift@STEP`` lasts to the end of the
run). Step ``s`` reads batch ``s - 1`` in both runs (after a rollback the
guarded run's step keeps counting batches drawn, as :func:`optax_guard.fit`
does), so a fault hits the same batch in both. The faults themselves are
:mod:`optax_guard.testing`'s; the preemption is a real SIGTERM after its
step.

The sudden faults (``spike``, ``poison``, ``nan``) scale the batch's float
loss weights; the slow ones (``ramp``, ``shift``) replace whole rows of the
batch's tokens with random characters (``poisoned_rows``): a ramp from 0%
of the rows to 100% and back, and a permanent noisier data mix.
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
# All of them break the batch's data (its loss weights or its tokens), so
# the steps are the plain ones: no fault code in the compiled step.
_KINDS = {
    'spike': testing.Fault('poisoned_batch', SPIKE_SCALE),
    'poison': testing.Fault('poisoned_batch', POISON_SCALE),
    'nan': testing.Fault('poisoned_batch', float('nan')),
}
_SPEC = re.compile(r'^(?P<name>[a-z]+)(@(?P<start>\d+)(-(?P<end>\d+))?)?$')


def default_specs(steps: int) -> tuple[str, ...]:
  """One fault of each kind: spike, ramp, poison, preempt, nan and shift.

  At 30%, 33-41%, 45-53%, 70%, 80% and from 88% of the run.
  """
  poison = round(0.45 * steps)
  ramp = round(0.33 * steps)
  return (f'spike@{round(0.3 * steps)}',
          f'ramp@{ramp}-{ramp + _ramp_length(steps) - 1}',
          f'poison@{poison}-{poison + max(12, steps // 12) - 1}',
          f'preempt@{round(0.7 * steps)}', f'nan@{round(0.8 * steps)}',
          f'shift@{round(0.88 * steps)}')


def _ramp_length(steps: int) -> int:
  """The default ramp's steps: odd, so that one step holds the peak."""
  return 2 * max(4, steps // 25) - 1


def schedule(specs: Sequence[str], steps: int) -> dict[str, tuple[int, int]]:
  """``{name: (first_step, last_step)}`` from specs, sorted by step.

  ``none`` means no faults; a bare ``NAME`` takes its default step.

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
          ' "none".'
      )
    name = match['name']
    if match['start'] is None:
      match = _SPEC.match(defaults[name])
    start = int(match['start'])
    end = int(match['end'] or start)
    if name == 'poison' and match['end'] is None:
      end = start + max(12, steps // 12) - 1
    if name == 'ramp' and match['end'] is None:
      end = start + _ramp_length(steps) - 1
    if name not in WINDOWS and end != start:
      raise ValueError(f'only {" and ".join(WINDOWS)} take a window, got'
                       f' {spec!r}.')
    if end < start:
      raise ValueError(f'empty {name} window in {spec!r}.')
    if name == 'shift':
      end = steps
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
  if name == 'shift':
    where = f'steps {start}-'
  return f'{where}: {DESCRIPTIONS[name]}'


def fault_at(windows: dict[str, tuple[int, int]], step: int):
  """The name of the fault that breaks ``step``'s batch, or ``None``.

  Where windows overlap, the one that started last wins (a NaN batch in
  the middle of a level shift is a NaN batch).
  """
  found = None
  for name, (start, end) in windows.items():
    if name != 'preempt' and start <= step <= end:
      found = name
  return found


def ramp_fraction(window: tuple[int, int], step: int) -> float:
  """The fraction of random rows at ``step`` of a ramp over ``window``.

  It rises linearly to 1 at the window's middle and falls back as
  :func:`optax_guard.testing.ramp` does.

  Examples:
    >>> from optax_guard.demo.faults import ramp_fraction
    >>> [ramp_fraction((10, 16), s) for s in range(10, 17)]
    [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25]
  """
  start, end = window
  length = (end - start) // 2 + 1
  return testing.ramp(start, length)[step].scale


def fault(windows: dict[str, tuple[int, int]], step: int):
  """The :class:`optax_guard.testing.Fault` of ``step``'s batch, or ``None``."""
  name = fault_at(windows, step)
  if name == 'ramp':
    return testing.Fault('poisoned_rows', ramp_fraction(windows[name], step))
  if name == 'shift':
    return testing.Fault('poisoned_rows', SHIFT_FRACTION)
  return None if name is None else _KINDS[name]


def plan(windows: dict[str, tuple[int, int]], steps: int):
  """``{batch index: optax_guard.testing.Fault}`` for a FaultInjector."""
  return {
      step - 1: planned
      for step in range(1, steps + 1)
      if (planned := fault(windows, step)) is not None
  }
