"""The demo's fault schedule: what breaks, and at which step.

A schedule is a list of ``NAME@STEP`` or ``NAME@START-END`` specs (a
``shift`` lasts to the end). Step ``s`` reads the ``s``-th batch in both
runs (``og.fit`` counts batches drawn, rollbacks included). The faults are
:mod:`optax_guard.testing`'s: the sudden ones scale the loss weights or make
them NaN, the slow ones replace rows of tokens with random characters (a
ramp 0% -> 100% -> 0%, then a noisier data mix). The preemption is a real
SIGTERM after its step.
"""

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


def window_length(name: str, steps: int) -> int:
  """A window's default steps (the ramp's odd: one step holds the peak)."""
  return max(12, steps // 12) if name == 'poison' else 2 * max(
      4, steps // 25) - 1


def default_specs(steps: int) -> tuple[str, ...]:
  """One fault of each kind, at 30%, 33-41%, 45-53%, 70%, 80% and 88%+."""
  poison, ramp = round(0.45 * steps), round(0.33 * steps)
  return (f'spike@{round(0.3 * steps)}',
          f'ramp@{ramp}-{ramp + window_length("ramp", steps) - 1}',
          f'poison@{poison}-{poison + window_length("poison", steps) - 1}',
          f'preempt@{round(0.7 * steps)}', f'nan@{round(0.8 * steps)}',
          f'shift@{round(0.88 * steps)}')


def schedule(specs, steps: int) -> dict[str, tuple[int, int]]:
  """``{name: (first_step, last_step)}`` of checked specs, sorted by step
  (``optax-guard demo --faults`` checks them); ``['none']``: no faults.

  Examples:
    >>> from optax_guard.demo.faults import schedule
    >>> schedule(['nan@30', 'poison@10-19', 'shift@40'], steps=50)
    {'poison': (10, 19), 'nan': (30, 30), 'shift': (40, 50)}
  """
  windows = {}
  for spec in (spec for spec in specs if spec != 'none'):
    name, where = spec.split('@')
    start, _, end = where.partition('-')
    windows[name] = (int(start), steps if name == 'shift' else int(end or start))
  return dict(sorted(windows.items(), key=lambda item: item[1]))


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
      scale = SPIKE_SCALE if name == 'spike' else POISON_SCALE
      faults.update({step: testing.Fault('poisoned_batch', scale)
                     for step in range(start, end + 1)})
  return faults
