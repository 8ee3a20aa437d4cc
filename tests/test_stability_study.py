"""The learning-rate stability study, run at a tiny size so it never rots."""

import math

import pytest

from benchmarks import stability


def test_spikes_are_counted_against_the_recent_median():
  calm = [2.0] * 30
  assert stability._spikes(calm) == 0
  # 3.1 > 1.5 * 2.0 and NaN are spikes; 2.9 is not.
  assert stability._spikes(calm[:25] + [3.1, 2.0, 2.9, float('nan')]) == 2


def test_the_largest_stable_rate_stops_at_the_first_divergence():
  cells = [{'method': 'm', 'learning_rate': lr, 'diverged_runs': d}
           for lr, d in ((0.1, 0), (0.3, 1), (1.0, 0))]
  assert stability._largest_stable(cells, 'm') == 0.1
  cells[0]['diverged_runs'] = 1
  assert stability._largest_stable(cells, 'm') is None


@pytest.fixture(scope='module')
def tiny_study():
  return stability.run(
      learning_rates=(1e-2, 10.0), seeds=(0,), steps=12, batch_size=4,
      seq_len=16, width=16, depth=1, heldout_batches=1,
      methods=('adamw (no clipping)', 'og.guard (defaults)'), say=print)


def test_every_method_rate_and_seed_is_run_and_summarised(tiny_study):
  runs = tiny_study['runs']
  assert [(r['method'], r['learning_rate']) for r in runs] == [
      ('adamw (no clipping)', 1e-2), ('adamw (no clipping)', 10.0),
      ('og.guard (defaults)', 1e-2), ('og.guard (defaults)', 10.0)]
  for r in runs:
    assert math.isfinite(r['initial_heldout_loss'])
    assert r['diverged'] == (not math.isfinite(r['final_heldout_loss'])
                             or r['final_heldout_loss']
                             > 0.9 * r['initial_heldout_loss'])
  # Twelve steps at 1e-2 train; plain adamw at a peak of 10 does not.
  assert not runs[0]['diverged'] and runs[1]['diverged']
  assert tiny_study['largest_stable_learning_rate']['adamw (no clipping)'] \
      == 1e-2
  assert len(tiny_study['cells']) == 4


def test_only_the_methods_run_are_summarised(tiny_study):
  # The study ran two of the methods: the others (the ceiling variant of
  # --more-methods among them) get neither cells nor a largest stable rate.
  assert set(tiny_study['largest_stable_learning_rate']) == {
      'adamw (no clipping)', 'og.guard (defaults)'}
  assert {c['method'] for c in tiny_study['cells']} == {
      'adamw (no clipping)', 'og.guard (defaults)'}


def test_the_ceiling_variant_runs_when_asked():
  (name,) = stability.MORE_METHODS
  study = stability.run(
      learning_rates=(1e-2,), seeds=(0,), steps=4, batch_size=4,
      seq_len=16, width=16, depth=1, heldout_batches=1, methods=(name,),
      say=print)
  assert [r['method'] for r in study['runs']] == [name]
  assert set(study['largest_stable_learning_rate']) == {name}
