"""The benchmark runner, run end to end at tiny sizes so that it never rots.

Nothing here checks a timing: only that every section runs, that the JSON
and the markdown hold what they should, and that the numbers are sane.
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import optax
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pytest

from benchmarks import __main__ as runner
from benchmarks import report
from benchmarks import timing
from benchmarks import train_step
from benchmarks import update_cost
from benchmarks import workloads
from optax_guard.transforms import fused as _apply

TINY = [
    '--sizes', '20k', '--groups', 'headline', '--layers', '1',
    '--repeats', '2', '--step-rounds', '2', '--warmup', '1',
    '--min-sample-ms', '1', '--lm', 'tiny',
    '--checkpoint-size', '20k', '--checkpoint-rounds', '1', '--faults', '2',
]


def _no_constant(name):
  raise ValueError(f'{name} is not strict JSON')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench')
  status = runner.main([*TINY, '--out', str(out)])
  results = json.loads((out / 'results.json').read_text(),
                       parse_constant=_no_constant)
  return status, results, (out / 'BENCHMARKS.md').read_text()


def _positive(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_section_runs(run):
  status, results, _ = run
  assert status == 0
  assert list(results['sections']) == list(runner.SECTIONS)
  for name, section in results['sections'].items():
    assert section['status'] == 'ok', (name, section)


def test_update_rows_have_sane_times_and_ratios(run):
  rows = run[1]['sections']['update']['rows']
  assert [r['name'] for r in rows] == [
      update_cost.BARE, update_cost.OPTAX_CLIP,
      update_cost.OPTAX_APPLY_IF_FINITE, update_cost.GUARD_PURE,
      update_cost.GUARD_FUSED, update_cost.UNCHECKED_PURE,
      update_cost.UNCHECKED_FUSED, update_cost.CHAINED_GUARD,
      update_cost.FLOOR, update_cost.CHECKED_FLOOR,
  ]
  for row in rows:
    assert row['params'] == 20_000 and row['rounds'] == 2
    assert _positive(row['median_ms'])
    assert row['q1_ms'] <= row['median_ms'] <= row['q3_ms']
    if row['baseline'] is not None:
      assert _positive(row['ratio'])
      assert row['ratio_q1'] <= row['ratio'] <= row['ratio_q3']
  comparison = run[1]['sections']['update']['comparisons']['20000']
  assert _positive(comparison['guard_pure_over_apply_if_finite']['ratio'])
  assert _positive(comparison['guard_fused_over_floor']['ratio'])
  assert _positive(comparison['guard_fused_over_checked_floor']['ratio'])
  assert _positive(comparison['chained_guard_over_guard']['ratio'])
  assert _positive(comparison['guard_fused_over_unchecked_fused']['ratio'])


def test_memory_rows_verify_donation(run):
  rows = run[1]['sections']['memory']['rows']
  assert {r['name'] for r in rows} == {
      r['name'] for r in run[1]['sections']['update']['rows']
  }
  params_bytes = 20_000 * 4
  for row in rows:
    assert row['params_bytes'] == params_bytes
    assert row['peak_bytes'] >= row['argument_bytes'] > 2 * params_bytes
    assert row['donated'] and row['donated_at_run_time']
  guard = next(r for r in rows if r['name'] == update_cost.GUARD_FUSED)
  assert guard['guard_state_bytes'] > 0


def test_other_sections_hold_their_measurements(run):
  sections = run[1]['sections']
  for name, rows in (('train_step', 'rows'), ('checkpointing', 'save_rows'),
                     ('checkpointing', 'train_rows')):
    for row in sections[name][rows]:
      assert _positive(row['median_ms'])
      if row['baseline'] is not None:
        assert _positive(row['ratio'])
  step = sections['train_step']
  assert step['model']['lm'] == 'tiny'
  assert {r['name'] for r in step['rows']} == {
      train_step.PLAIN, train_step.GUARDED, train_step.BARE,
      train_step.GUARDED_NNX, train_step.GUARDED_NNX_OPTIMIZER}
  assert set(step['comparisons']) == set(train_step.COMPARISONS)
  for comparison in step['comparisons'].values():
    assert _positive(comparison['ratio'])
  faults = sections['faults']
  assert faults['survived'] and faults['params_always_finite']
  assert faults['injected_total'] >= 2
  fit_blocking = sections['fit']['orbax_save_blocking_ms']
  assert set(fit_blocking) == {'nnx_state', 'nested_dicts'}
  assert all(_positive(b['median']) and b['saves'] >= 1
             for b in fit_blocking.values())
  growth = sections['growth']
  assert growth['sizes'] == [20_000]
  # One growth row per candidate of the update section but its baseline.
  assert [r['change'] for r in growth['rows']] == [None] * (
      len(sections['update']['rows']) - 1)


def test_targets_cover_every_item(run):
  found = run[1]['targets']
  assert {t['item'] for t in found} == {2, 3, 4, 6, 7, 24}
  # Issue 21, items 6 and 7: og.fit against a hand loop, an async save's
  # blocking.
  item_7 = [t['what'] for t in found if t['item'] == 7]
  assert any('og.fit ÷ a hand-written loop' in what for what in item_7)
  assert any('async save blocks the loop' in what for what in item_7)
  # Issue 24: the guard in optax.chain against the guard alone, at every
  # size (the per-mode targets are set at 1M and 12.6M only).
  item_24 = [t['what'] for t in found if t['item'] == 24]
  assert item_24 == ['20k: optax.chain(og.guard) ÷ og.guard (fused)']
  for target in found:
    assert isinstance(target['met'], bool)
    assert (target['shortfall'] is None) == target['met']


def test_markdown_has_machine_targets_and_every_section(run):
  _, results, markdown = run
  titles = [f'## {title}' for title in report.SECTION_TITLES.values()]
  assert markdown.startswith('# Benchmarks\n')
  assert 'numbers are also in `results.json`' in markdown  # Beside it.
  assert 'One save costs the training loop' in markdown
  assert results['sections']['checkpointing']['default_interval'] == 1000
  for heading in ['## Machine', '## Targets', *titles,
                  '## How these numbers are taken', '## Notes']:
    assert f'\n{heading}\n' in markdown
  assert results['machine']['cpu'] in markdown
  assert results['machine']['versions']['jax'] in markdown
  assert '*Skipped' not in markdown and '*Failed' not in markdown


def test_render_rewrites_the_markdown_from_saved_results(run, tmp_path):
  _, results, markdown = run
  saved = tmp_path / 'saved.json'
  saved.write_text(json.dumps(results))
  out = tmp_path / 'out'
  assert runner.main(['--render', str(saved), '--out', str(out)]) == 0
  assert (out / 'BENCHMARKS.md').read_text() == markdown
  assert json.loads((out / 'results.json').read_text()) == results


def test_growth_alone_is_skipped_with_a_reason(tmp_path):
  assert runner.main(['--only', 'growth', '--out', str(tmp_path)]) == 0
  results = json.loads((tmp_path / 'results.json').read_text())
  growth = results['sections']['growth']
  assert growth['status'] == 'skipped' and 'update' in growth['reason']
  assert 'Skipped: it is computed from the update section' in (
      tmp_path / 'BENCHMARKS.md').read_text()


@pytest.mark.parametrize('argv, message', [
    (['--only', 'update,bogus'], 'unknown sections'),
    (['--sizes', '12x'], 'bad size'),
    (['--sizes', '500'], 'below 1000'),
    (['--groups', 'nope'], 'unknown groups'),
    (['--repeats', '0'], 'must be > 0'),
])
def test_bad_options_are_named(argv, message, capsys):
  with pytest.raises(SystemExit):
    runner.build_parser().parse_args(argv)
  assert message in capsys.readouterr().err


def test_growth_is_the_change_of_each_ratio():
  def row(count, group, name, ratio=None, ms=1.0):
    return {'params': count, 'group': group, 'name': name, 'ratio': ratio,
            'median_ms': ms}
  update = {'families': ['headline'], 'rows': [
      row(10**6, 'headline', update_cost.BARE, ms=2.0),
      row(10**6, 'headline', update_cost.GUARD_PURE, 1.5),
      row(10**8, 'headline', update_cost.BARE, ms=300.0),
      row(10**8, 'headline', update_cost.GUARD_PURE, 1.25),
  ]}
  growth = update_cost.growth(update)
  assert growth['sizes'] == [10**6, 10**8]
  assert growth['bare_ms'] == [2.0, 300.0]
  pure = next(r for r in growth['rows'] if r['name'] == update_cost.GUARD_PURE)
  assert pure['ratios'] == [1.5, 1.25] and pure['change'] == -0.25
  clip = next(r for r in growth['rows'] if r['name'] == update_cost.OPTAX_CLIP)
  assert clip['ratios'] == [None, None] and clip['change'] is None


def test_ratios_pair_samples_of_the_same_round():
  timings = timing.Timings(
      seconds={'base': [1.0, 2.0, 4.0], 'other': [2.0, 2.0, 2.0]},
      calls_per_sample={'base': 1, 'other': 1},
      baselines={'base': None, 'other': 'base'},
  )
  # Per round: 2, 1, 0.5 -- the median of those, not 2 / median(base) = 1.
  assert timings.ratio('other', 'base') == timing.Spread(1.0, 0.75, 1.5)
  other = timings.rows()[1]
  assert (other['ratio'], other['median_ms']) == (1.0, 2000.0)
  # Pairs with a candidate not measured here are left out.
  assert timings.comparisons({'kept': ('other', 'base'),
                              'dropped': ('other', 'absent')}) == {
      'kept': {'ratio': 1.0, 'ratio_q1': 0.75, 'ratio_q3': 1.5}}


def test_measure_interleaves_every_candidate_every_round():
  calls = []
  candidates = [
      timing.Candidate(name, lambda name=name: calls.append(name))
      for name in 'abc'
  ]
  timings = timing.measure(candidates, rounds=3, warmup=1, min_sample_s=0.0)
  # Warm-up once each, then rounds in rotated order.
  assert calls == list('abc' 'abc' 'bca' 'cab')
  assert all(len(s) == 3 for s in timings.seconds.values())


def _clean_step_as_bare_adamw(floor):
  """One clean fused step of ``floor``, checked equal to bare adamw's."""
  params = {'w': jnp.arange(3.0), 'b': jnp.ones(2)}
  grads = {'w': jnp.array([0.1, -0.2, 0.3]), 'b': jnp.array([1.0, 2.0])}
  bare = workloads.adamw()
  updates, bare_state = bare.update(grads, bare.init(params), params)
  fused = _apply.update_and_apply(floor)
  new_params, state = fused(grads, floor.init(params), params)
  chex.assert_trees_all_equal(new_params, optax.apply_updates(params, updates))
  chex.assert_trees_all_equal(state, bare_state)
  return params, grads, fused, new_params, state


def test_floor_is_adamw_that_holds_non_finite_steps():
  floor = workloads.guard_floor()
  params, grads, fused, new_params, state = _clean_step_as_bare_adamw(floor)
  updates, bare_state = workloads.adamw().update(
      grads, floor.init(params), params)
  pure_updates, pure_state = floor.update(grads, floor.init(params), params)
  chex.assert_trees_all_equal((pure_updates, pure_state), (updates, bare_state))

  poisoned = {'w': grads['w'].at[1].set(jnp.nan), 'b': grads['b']}
  held_params, held_state = fused(poisoned, state, new_params)
  chex.assert_trees_all_equal((held_params, held_state), (new_params, state))
  zeros, held_state = floor.update(poisoned, state, new_params)
  chex.assert_trees_all_equal(held_state, state)
  assert all(not x.any() for x in jax.tree.leaves(zeros))


def test_issue_24_targets_are_set_per_mode_at_1m_and_12_6m():
  def row(name, ratio):
    return {'params': 1_000_000, 'group': 'headline', 'name': name,
            'ratio': ratio, 'ratio_q1': ratio, 'ratio_q3': ratio}

  section = {
      'rows': [row(update_cost.GUARD_FUSED, 2.0),
               row(update_cost.UNCHECKED_FUSED, 1.4)],
      'comparisons': {'1000000': {
          'guard_pure_over_apply_if_finite': {
              'ratio': 1.1, 'ratio_q1': 1.0, 'ratio_q3': 1.2}}},
  }
  found = {t['what']: (t['target'], t['met'])
           for t in report._update_targets(section) if t is not None}
  assert found == {
      '1M: og.guard (default, checked) fused update ÷ bare adamw update':
          ('≤ 1.6×', False),
      '1M: og.guard(check_updates=False) fused update ÷ bare adamw update':
          ('≤ 1.45×', True),
      '1M: og.guard (pure transformation) ÷ optax apply_if_finite(chain('
      'clip, adamw))': ('≤ 0.85×', False),
  }


def test_checked_floor_holds_a_step_whose_adamw_output_overflows():
  _, grads, fused, new_params, state = _clean_step_as_bare_adamw(
      workloads.checked_floor())
  # Finite gradients and state whose update overflows: a first moment of
  # 1e32 over a second moment of 0 (and a zero gradient there) is
  # 1e32 / eps = inf. The gradient check
  # passes; the output check holds the whole step, bit for bit.
  adam = state[0]
  extreme = (adam._replace(
      mu={'w': jnp.array([1e32, 0.0, 0.0]), 'b': adam.mu['b']},
      nu={'w': jnp.zeros(3), 'b': adam.nu['b']}),) + tuple(state[1:])
  still = {'w': jnp.array([0.0, -0.2, 0.3]), 'b': grads['b']}
  held_params, held_state = jax.jit(fused)(still, extreme, new_params)
  chex.assert_trees_all_equal((held_params, held_state),
                              (new_params, extreme))
  # The same inputs through bare adamw do give an inf.
  bare_updates, _ = workloads.adamw().update(still, extreme, new_params)
  assert not jnp.isfinite(bare_updates['w'][0])


@settings(max_examples=50, deadline=None)
@given(count=st.integers(1000, 10**9), layers=st.integers(1, 12))
def test_param_shapes_hold_exactly_the_count(count, layers):
  shapes = workloads.param_shapes(count, layers)
  leaves = [math.prod(shape) for shape in
            jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))]
  assert sum(leaves) == count and min(leaves) >= 1


def test_sizes_parse_and_format():
  assert workloads.parse_size('12.6M') == 12_600_000
  assert workloads.format_size(12_600_000) == '12.6M'
  assert workloads.format_size(100_000_000) == '100M'



def test_kernel_counts_of_the_candidates(run):
  from benchmarks import kernels  # pylint: disable=g-import-not-at-top
  rows = run[1]['sections']['kernels']['rows']
  assert [r['leaves'] for r in rows] == [17] * 4 + [65] * 4
  for row in rows:
    assert 0 < row['per_call'] <= row['total']
    if row['name'] == update_cost.BARE:  # No branch: every kernel runs.
      assert row['per_call'] == row['total'] and row['branches'] == 0
    else:
      assert row['branches'] >= 1 and row['added_per_call'] > 0
  assert '3b. Kernels' in run[2]
  # A cond of two kernels a branch, a loop around one kernel.
  def f(x):
    y = jax.lax.cond(x.sum() > 0, lambda v: jnp.sin(v) @ v,
                     lambda v: jnp.cos(v) @ v, x)
    return jax.lax.fori_loop(0, y.shape[0], lambda i, v: v @ jnp.tanh(v), y)
  hlo = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
  counts = kernels.kernel_counts(hlo)
  assert counts['branches'] == 2
  assert counts['per_call'] < counts['total']


def test_device_preset_selects_the_headline_ratios_and_yields_to_options():
  args = runner.build_parser().parse_args(
      [*runner.DEVICE_PRESET, '--repeats', '3'])
  assert args.only == ['update', 'kernels'] and args.groups == ['headline']
  assert args.sizes == [1_000_000, 12_600_000] and args.repeats == 3
