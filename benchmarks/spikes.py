"""Spike rules compared on seeded sequences: ours, OLMo-core's and MaxText's.

``python -m benchmarks.spikes`` prints, for each rule, how it does on
synthetic loss / gradient-norm sequences (a slowly falling loss with noise)
with faults injected after the warm-up:

* ``isolated``: single spike steps (norm x3..x100, loss up by 5% per x);
* ``bursts``: one burst of each length 2..10, same magnitudes;
* ``nan``: isolated non-finite steps, each followed by a spike 5..20 steps
  later (a rule whose statistics a NaN poisoned skips the steps between);
* ``shift up``: from step 200 the data is 20x noisier for good (norm x20,
  loss noise x20 and up 0.5), as in issue 12;
* ``shift down``: from step 200 the loss is 1.0 lower and the norm 10x
  smaller, then isolated spikes from step 260;
* ``ramp``: from step 200 the loss climbs by 1.0 and the norm 3x over 100
  steps, then stays;
* ``wider``: from step 200 the spread grows for good (log-norm std 0.1 ->
  0.6, loss noise 0.03 -> 0.15) with no jump of the level.

Columns: the share of injected spike steps skipped (``caught``), the skips of
normal steps per 1000 (``false``), the skips of normal steps in the ``nan``
sequences (``after NaN``), the skipped steps after the shift up (mean and
maximum over seeds) and the skips from step 200 on in ``ramp`` and
``wider`` together.

The peers are ported in ``tests/spike_peers.py`` from their sources.
"""

import argparse
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tests import spike_peers

LENGTH = 600
START = 150  # faults come after every rule's warm-up
SHIFT = 200
SEEDS = 20

NORMAL, SPIKE, NONFINITE, SHIFTED = 0, 1, 2, 3


class Sequences(NamedTuple):
  """Seeded sequences of one scenario, ``(seeds, LENGTH)`` each."""

  losses: np.ndarray
  grad_norms: np.ndarray
  labels: np.ndarray


def _base(rng: np.random.Generator):
  t = np.arange(LENGTH)
  loss = 2.0 + np.exp(-t / 300) + 0.03 * rng.standard_normal(LENGTH)
  norm = np.exp(0.1 * rng.standard_normal(LENGTH))
  return loss, norm, np.full(LENGTH, NORMAL)


def _spike(loss, norm, labels, rng, t):
  factor = np.exp(rng.uniform(np.log(3), np.log(100)))
  norm[t] *= factor
  loss[t] *= 1 + 0.05 * factor
  labels[t] = SPIKE


def _positions(rng, count, start, stop, gap):
  """``count`` sorted positions in ``[start, stop)``, ``gap`` or more apart."""
  free = stop - start - gap * (count - 1)
  offsets = np.sort(rng.choice(free, count, replace=False))
  return start + offsets + gap * np.arange(count)


def isolated(rng):
  loss, norm, labels = _base(rng)
  for t in _positions(rng, 8, START, LENGTH, 25):
    _spike(loss, norm, labels, rng, t)
  return loss, norm, labels


def bursts(rng):
  loss, norm, labels = _base(rng)
  lengths = rng.permutation(np.arange(2, 11))
  starts = _positions(rng, len(lengths), START, LENGTH - 10, 12)
  for start, length in zip(starts, lengths):
    for t in range(start, start + length):
      _spike(loss, norm, labels, rng, t)
  return loss, norm, labels


def nonfinite(rng):
  loss, norm, labels = _base(rng)
  for i, t in enumerate(_positions(rng, 4, START, LENGTH - 25, 45)):
    if i % 2:
      norm[t] = np.inf
    else:
      loss[t] = np.nan
    labels[t] = NONFINITE
    _spike(loss, norm, labels, rng, t + rng.integers(5, 21))
  return loss, norm, labels


def shift_up(rng):
  loss, norm, labels = _base(rng)
  after = slice(SHIFT, LENGTH)
  loss[after] += 0.5 + 19 * 0.03 * rng.standard_normal(LENGTH - SHIFT)
  norm[after] *= 20
  labels[after] = SHIFTED
  return loss, norm, labels


def shift_down(rng):
  loss, norm, labels = _base(rng)
  loss[SHIFT:] -= 1.0
  norm[SHIFT:] *= 0.1
  for t in _positions(rng, 6, SHIFT + 60, LENGTH, 25):
    _spike(loss, norm, labels, rng, t)
  return loss, norm, labels


def ramp(rng):
  loss, norm, labels = _base(rng)
  rise = np.clip((np.arange(LENGTH) - SHIFT) / 100, 0, 1)
  loss += 1.0 * rise
  norm *= 1 + 2 * rise
  labels[SHIFT:] = SHIFTED
  return loss, norm, labels


def wider(rng):
  loss, norm, labels = _base(rng)
  spread = rng.standard_normal(LENGTH - SHIFT)
  norm[SHIFT:] = np.exp(0.6 * spread)
  loss[SHIFT:] += 0.15 * spread
  labels[SHIFT:] = SHIFTED
  return loss, norm, labels


SCENARIOS = {
    'isolated': isolated,
    'bursts': bursts,
    'nan': nonfinite,
    'shift up': shift_up,
    'shift down': shift_down,
    'ramp': ramp,
    'wider': wider,
}


def sequences(scenario: str, seeds: int = SEEDS, seed: int = 0) -> Sequences:
  """The scenario's sequences for ``seeds`` seeds starting at ``seed``."""
  made = [SCENARIOS[scenario](np.random.default_rng([seed + i, 12]))
          for i in range(seeds)]
  losses, norms, labels = (np.stack(parts) for parts in zip(*made))
  return Sequences(losses.astype(np.float32), norms.astype(np.float32),
                   labels)


def skips(rule: spike_peers.Rule, seqs: Sequences) -> np.ndarray:
  """The rule's skip decisions, ``(seeds, LENGTH)`` booleans."""
  run = jax.jit(jax.vmap(lambda l, g: spike_peers.run(rule, l, g)))
  return np.asarray(run(jnp.asarray(seqs.losses), jnp.asarray(seqs.grad_norms)))


class Score(NamedTuple):
  """One rule's results over every scenario (counts summed over seeds)."""

  caught: int
  injected: int
  false_skips: int
  normal_steps: int
  after_nan: int
  shift_skips_mean: float
  shift_skips_max: int
  ramp_skips: int


def score(rule: spike_peers.Rule, seeds: int = SEEDS, seed: int = 0) -> Score:
  """Runs ``rule`` on every scenario (one compiled call) and counts."""
  every = [sequences(name, seeds, seed) for name in SCENARIOS]
  skipped_all = skips(rule, Sequences(*(np.concatenate(parts)
                                        for parts in zip(*every))))
  caught = injected = false = normal = 0
  after_nan = shift = ramp_skips = None
  for i, (name, seqs) in enumerate(zip(SCENARIOS, every)):
    skipped = skipped_all[i * seeds:(i + 1) * seeds]
    spikes = seqs.labels == SPIKE
    caught += int(np.sum(skipped & spikes))
    injected += int(np.sum(spikes))
    # The shifted part of a sequence is new normal, counted on its own.
    steady = seqs.labels == NORMAL
    if name == 'nan':
      after_nan = int(np.sum(skipped & steady))
    else:
      false += int(np.sum(skipped & steady))
      normal += int(np.sum(steady))
    if name == 'shift up':
      shift = np.sum(skipped[:, SHIFT:], axis=1)
    if name in ('ramp', 'wider'):
      ramp_skips = (ramp_skips or 0) + int(np.sum(skipped[:, SHIFT:]))
  return Score(caught, injected, false, normal, after_nan,
               float(np.mean(shift)), int(np.max(shift)), ramp_skips)


def rules(window: int = 128) -> list[spike_peers.Rule]:
  """The rules compared: the peers, optax_guard before, ours and variants."""
  return [
      spike_peers.maxtext(window),
      spike_peers.olmo_core(window),
      spike_peers.previous(window),
      spike_peers.ours(window=window),
      spike_peers.ours(window=window, winsorize=True),
      spike_peers.ours(window=window, rebase_down=False),
      spike_peers.ours(window=window, shift_after=4),
  ]


def table(window: int = 128, seeds: int = SEEDS) -> str:
  """The comparison as a Markdown table."""
  lines = [
      f'window {window}, sigma 6, {seeds} seeds x {LENGTH} steps per scenario',
      '',
      '| rule | caught | false / 1000 | skips after NaN | skips after shift'
      ' (mean / max) | skips on ramp + wider |',
      '|---|---|---|---|---|---|',
  ]
  for rule in rules(window):
    s = score(rule, seeds)
    lines.append(
        f'| {rule.name} | {s.caught}/{s.injected}'
        f' ({100 * s.caught / s.injected:.1f}%)'
        f' | {1000 * s.false_skips / s.normal_steps:.2f}'
        f' | {s.after_nan} | {s.shift_skips_mean:.1f} / {s.shift_skips_max}'
        f' | {s.ramp_skips} |'
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--window', type=int, nargs='+', default=[128, 32])
  parser.add_argument('--seeds', type=int, default=SEEDS)
  args = parser.parse_args()
  for window in args.window:
    print(table(window, args.seeds))
    print()


if __name__ == '__main__':
  main()
