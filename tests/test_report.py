"""og.read_run_log and og.plot_runs on the logs of real og.fit runs."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import cli, testing

NUM_STEPS = 30
# The guarded run: a NaN gradient at step 5 (skipped), four in a row from
# step 12 (the third makes the guard report diverged: a rollback), and a
# restart of the process after step 18 (a resume from disk).
GUARDED_FAULTS = {5: 'nan_grad', **{s: 'nan_grad' for s in range(12, 16)}}
PLAIN_NAN_STEP = 8  # The plain run's parameters are NaN after this step.


def loss_fn(params, batch):
  return jnp.mean((jnp.tanh(batch['x'] @ params['w']) @ params['v']
                   - batch['y']) ** 2)


def _data(faults):
  arrays = testing.regression_data(seed=2, num_examples=256)
  plan = {step: testing.Fault(kind) for step, kind in faults.items()}
  return testing.FaultInjector(og.batches(arrays, 16, seed=2), plan,
                               keys='step')


def _init(tx):
  key1, key2 = jax.random.split(jax.random.key(3))
  params = {'w': jax.random.normal(key1, (8, 8)) / 3,
            'v': jax.random.normal(key2, (8, 1)) / 3}
  return og.TrainState(0, params, tx.init(params))


_HELDOUT = testing.regression_data(seed=5, num_examples=64)


def _evaluate(state):
  return {'eval_loss': loss_fn(state.params, _HELDOUT)}


@pytest.fixture(scope='module')
def logs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  tx = og.guard(optax.adam(0.05), clip=og.clip_by_global_norm(0.5),
                max_consecutive_skips=3)
  step = og.make_train_step(testing.with_faults(loss_fn), tx)
  fit = {'log_dir': root / 'guarded', 'progress': False, 'tensorboard': False,
         'eval_fn': _evaluate, 'eval_every': 5,
         'recovery': og.RecoveryPolicy(confirm_steps=1, skip_extra_batches=2)}
  for num_steps in (18, NUM_STEPS):  # Stopped after 18, then started again.
    with og.Checkpointer(root / 'checkpoints', save_interval_steps=5,
                         async_save=False) as ckpt:
      og.fit(step, _init(tx), _data(GUARDED_FAULTS), num_steps=num_steps,
             checkpointer=ckpt, **fit)
  plain_tx = optax.adam(0.05)
  plain_step = og.make_train_step(testing.with_faults(loss_fn), plain_tx)
  og.fit(plain_step, _init(plain_tx), _data({PLAIN_NAN_STEP: 'nan_grad'}),
         num_steps=NUM_STEPS, log_dir=root / 'plain', progress=False,
         tensorboard=False, eval_fn=_evaluate, eval_every=5)
  return root


def test_read_run_log_reads_the_metrics_and_events_as_logged(logs):
  guarded = og.read_run_log(logs / 'guarded')
  rollback, = [e for e in guarded.events if e['kind'] == 'rollback']
  # The steps a rollback jumped over were never run; the ones it undid
  # were, and stay in the log.
  jumped = range(rollback['step'] + 1, rollback['resume_step'] + 1)
  assert [r['step'] for r in guarded.metrics] == [
      s for s in range(1, NUM_STEPS + 1) if s not in jumped]
  assert [(e['kind'], e['step']) for e in guarded.events
          if e['kind'] != 'skipped_step'] == [
              ('rollback', 14), ('resumed', 18)]
  assert [e['step'] for e in guarded.events
          if e['kind'] == 'skipped_step'] == [5, 12, 13, 14]
  plain = og.read_run_log(logs / 'plain')
  assert plain.events == []
  # "nan" in the file is a float NaN here, from the step after the fault on.
  losses = {r['step']: r['loss'] for r in plain.metrics}
  assert all(math.isfinite(losses[s]) for s in range(1, PLAIN_NAN_STEP + 1))
  assert all(math.isnan(losses[s])
             for s in range(PLAIN_NAN_STEP + 1, NUM_STEPS + 1))


def test_read_run_log_drops_a_torn_last_line(logs, tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(
      (logs / 'plain' / 'metrics.jsonl').read_text() + '{"step": 31, "lo')
  assert og.read_run_log(tmp_path) == og.read_run_log(logs / 'plain')


def test_read_run_log_names_a_directory_without_logs(tmp_path):
  with pytest.raises(ValueError, match=f'{tmp_path} holds no metrics.jsonl'):
    og.read_run_log(tmp_path)
  with pytest.raises(ValueError, match='runs is empty'):
    og.plot_runs({})


def _lines(ax, color):
  return [line for line in ax.get_lines() if line.get_color() == color]


def _xs(line):
  return [int(x) for x in line.get_xdata()]


@pytest.fixture(scope='module')
def figure(logs):
  return og.plot_runs(
      {'plain': logs / 'plain', 'guarded': logs / 'guarded'},
      colors={'plain': '#d62728', 'guarded': '#1f77b4'},
      labels={'guarded': 'guarded run'}, title='two runs',
      windows={'faults': (12, 15), 'fault': (5, 5), 'nan': (8, 8)})


def test_plot_runs_draws_the_three_panels_and_one_legend(figure, tmp_path):
  assert [ax.get_ylabel() for ax in figure.axes] == [
      'eval loss', 'training loss (log)', 'grad norm (log)']
  assert figure.axes[0].get_title() == 'two runs'
  legend = [t.get_text() for t in figure.legends[0].get_texts()]
  assert legend == ['plain', 'guarded run', 'guarded: skipped step',
                    'clipped to']
  figure.savefig(tmp_path / 'report.png')
  assert (tmp_path / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_plot_runs_marks_skips_and_fades_what_a_rollback_undid(figure, logs):
  _, loss_ax, norm_ax = figure.axes
  guarded = og.read_run_log(logs / 'guarded')
  skips, = [line for line in loss_ax.get_lines()
            if line.get_label() == 'guarded: skipped step']
  assert _xs(skips) == [r['step'] for r in guarded.metrics if r['skipped']]
  rollback, = [e for e in guarded.events if e['kind'] == 'rollback']
  # Undone: from the restored checkpoint to the step that diverged (the
  # faded line starts at the checkpoint, to stay joined to the kept one).
  faded = [line for line in _lines(loss_ax, '#1f77b4')
           if line.get_alpha() == 0.25]
  assert [_xs(line) for line in faded] == [
      list(range(rollback['to_step'], rollback['step'] + 1))]
  kept = [s for line in _lines(loss_ax, '#1f77b4')
          if line.get_alpha() == 1.0 for s in _xs(line)]
  assert set(kept) == {r['step'] for r in guarded.metrics} - set(
      range(rollback['to_step'] + 1, rollback['step'] + 1))
  assert any(t.get_text().startswith(
      f'rollback to step {rollback["to_step"]},\nskipping steps'
      f' {rollback["to_step"] + 1}-{rollback["resume_step"]}')
             for t in loss_ax.texts)
  # The resume from disk is a line across every panel.
  for ax in figure.axes:
    assert any(line.get_linestyle() == '-.' and _xs(line) == [18, 18]
               for line in ax.get_lines())
  # The norm a clip reduced the gradient to: where, and only where, clipped.
  clipped = {r['step']: r['clip_threshold'] for r in guarded.metrics}
  drawn = {int(x): y for line in _lines(norm_ax, '#1f77b4')
           if line.get_linestyle() == '--' and line.get_alpha() == 1.0
           for x, y in zip(line.get_xdata(), line.get_ydata())}
  assert {s for s, y in drawn.items() if np.isfinite(y)} == {
      s for s in drawn if math.isfinite(clipped[s])}
  assert all(drawn[s] == clipped[s] for s in drawn if np.isfinite(drawn[s]))


def test_plot_runs_marks_where_a_run_turned_nan_for_good(figure):
  for ax in figure.axes:
    assert any(line.get_linestyle() == ':' and _xs(line) == [
        PLAIN_NAN_STEP + 1] * 2 for line in _lines(ax, '#d62728'))
  assert [t.get_text() for t in figure.axes[0].texts
          if 'NaN' in t.get_text()] == ['  plain is NaN from here']


def test_plot_runs_names_the_windows_apart(figure):
  renderer = figure.canvas.get_renderer()
  names = [t for t in figure.axes[0].texts
           if t.get_text() in ('faults', 'fault', 'nan')]
  assert sorted(t.get_text() for t in names) == ['fault', 'faults', 'nan']
  boxes = [t.get_window_extent(renderer) for t in names]
  assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
  title = figure.axes[0].title.get_window_extent(renderer)
  assert not any(box.overlaps(title) for box in boxes)
  # The windows take colors no run has.
  run_colors = {'#d62728', '#1f77b4'}
  assert not {t.get_color() for t in names} & run_colors


def test_plot_runs_of_one_log_dir_without_evaluations(tmp_path):
  # A run with no eval_fn: no evaluation panel.
  tx = og.guard(optax.adam(0.05))
  og.fit(og.make_train_step(testing.with_faults(loss_fn), tx), _init(tx),
         _data({3: 'nan_loss'}), num_steps=6, log_dir=tmp_path / 'run',
         progress=False, tensorboard=False)
  figure = og.plot_runs(tmp_path / 'run')
  assert [ax.get_ylabel() for ax in figure.axes] == [
      'training loss (log)', 'grad norm (log)']
  assert [t.get_text() for t in figure.legends[0].get_texts()] == [
      'run', 'run: skipped step', 'clipped to']
  records = [json.loads(line) for line in
             (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert records[2]['loss'] == 'nan'  # What the picture drew as a gap.


def test_optax_guard_report_draws_a_log_dir_of_og_fit(logs, tmp_path, capsys):
  png = tmp_path / 'guarded.png'
  assert cli.main(['report', str(logs / 'guarded'), '--output', str(png)]) == 0
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # The console wraps a long path at its width.
  assert f'Wrote{png}' in ''.join(capsys.readouterr().out.split())
  assert cli.main(['report', str(tmp_path)]) == 2
  assert 'nor a log_dir of og.fit' in capsys.readouterr().out
