"""The ``optax-guard demo`` end to end, in its fast mode (60 steps).

One demo run (a module fixture) serves most tests; the resume test kills a
second run in a subprocess and finishes it in this process.
"""

import contextlib
import io
import itertools
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import optax_guard as og
from optax_guard import cli
from optax_guard.demo import data as data_lib
from optax_guard.demo import faults as faults_lib
from optax_guard.demo import report as report_lib
from optax_guard.demo import run as run_lib
from optax_guard.host.checkpoint import CorruptCheckpointWarning
from optax_guard.host.runlog import Resumed

FAST_STEPS = 60
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  # A relative --out, as the default one: Orbax itself takes absolute paths.
  # What it prints, piped as to a file, is kept beside the run in printed.txt.
  parent = tmp_path_factory.mktemp('demo')
  printed = io.StringIO()
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(parent)
    patch.setenv('COLUMNS', '80')
    with contextlib.redirect_stdout(printed):
      assert cli.main(['demo', '--steps', str(FAST_STEPS), '--out', 'run']) == 0
  (parent / 'printed.txt').write_text(printed.getvalue())
  return parent / 'run'


def _no_constants(name):
  raise ValueError(f'{name} is not JSON')


def _jsonl(path):
  """Strict JSON lines (og.fit writes NaN as "nan"), without the times."""
  with open(path) as f:
    records = [json.loads(line, parse_constant=_no_constants) for line in f]
  for record in records:
    record.pop('time')
  return records


def _records(out, run):
  return _jsonl(out / run / 'metrics.jsonl')


def _events(out, run):
  return _jsonl(out / run / 'events.jsonl')


def test_plain_run_dies_and_guarded_run_recovers(demo):
  summary = report_lib.read_summary(demo / 'summary.json')
  plain, guarded = summary['plain'], summary['guarded']
  assert not plain['finite'] and math.isnan(plain['final_loss'])
  assert guarded['finite']
  # Uniform guessing over ~100 characters scores ln(103) = 4.63; measured:
  # 2.91 without faults (--faults none), 3.06 with them (the ramp and the
  # noisier data of the level shift are trained on).
  assert guarded['final_loss'] < 3.2
  assert guarded['rollbacks'] == 1
  assert len(guarded['params_sha256']) == 64


def test_the_files_the_demo_writes_are_strict_json(demo):
  # Every JSON file outside the checkpoints: config, summary, og.fit's logs.
  written = sorted(p.relative_to(demo).as_posix() for p in demo.rglob('*.json*')
                   if 'checkpoints' not in p.parts)
  assert written == ['config.json', 'guarded/events.jsonl',
                     'guarded/metrics.jsonl', 'plain/events.jsonl',
                     'plain/metrics.jsonl', 'summary.json']
  for name in written:
    text = (demo / name).read_text()
    for document in text.splitlines() if name.endswith('l') else [text]:
      json.loads(document, parse_constant=_no_constants)
  # A NaN is written as the logs write it, and read back as a float.
  summary = json.loads((demo / 'summary.json').read_text(),
                       parse_constant=_no_constants)
  assert summary['plain']['final_loss'] == 'nan'
  assert math.isnan(report_lib.read_summary(demo / 'summary.json')['plain'][
      'final_loss'])


def test_printed_lines_fit_80_columns_and_tell_the_rollback_once(demo):
  printed = (demo.parent / 'printed.txt').read_text()
  lines = printed.splitlines()
  assert [line for line in lines if len(line) > 80] == []
  # The one rollback is told once, by og.fit's recovery (optax_guard's
  # warnings print through the CLI), not a second time by the demo.
  assert printed.count('Rollback 1/') == 1
  assert 'rolled back' not in printed
  assert 'guarded step 60/60' in printed
  # The summary table's header on one line, as the README shows it.
  assert ' run       final held-out loss   finite   skips   rollbacks   params' \
      ' sha256' in [line.rstrip() for line in lines]


def test_the_docs_show_the_layout_the_demo_writes(demo):
  page = (REPO / 'docs' / 'demo.md').read_text()
  tree = page.split('```text\noptax-guard-demo/\n', 1)[1].split('```', 1)[0]
  shown = {line.split()[1]: line.split(None, 2)[2]
           for line in tree.splitlines()}
  written = {p.name + ('/' if p.is_dir() else '') for p in demo.iterdir()}
  assert set(shown) == written
  for run in run_lib.RUNS:
    assert {p.name for p in (demo / run).iterdir()
            if not p.name.startswith('events.out.tfevents.')} == {
                'metrics.jsonl', 'events.jsonl'}
  assert 'metrics.jsonl, events.jsonl, TensorBoard' in shown['plain/']
  assert '/optax-guard-demo/' in (REPO / '.gitignore').read_text().split()
  assert cli.DEFAULT_OUT == 'optax-guard-demo'


def test_guarded_run_reports_its_best_checkpoint(demo):
  guarded = json.loads((demo / 'summary.json').read_text())['guarded']
  evaluated = {r['step']: r['eval_loss'] for r in _records(demo, 'guarded')
               if 'eval_loss' in r}
  # The checkpointer ranks the held-out losses of the steps it saved: the best
  # is the one logged at its step, and no evaluated step scored lower.
  assert guarded['best_loss'] == evaluated[guarded['best_step']]
  assert guarded['best_loss'] == min(evaluated.values())


def test_each_fault_hits_both_runs_at_its_printed_step(demo):
  windows = faults_lib.schedule(faults_lib.default_specs(FAST_STEPS),
                                FAST_STEPS)
  plain = {r['step']: r for r in _records(demo, 'plain')}
  guarded = {r['step']: r for r in _records(demo, 'guarded')}
  (spike, _), (nan, _) = windows['spike'], windows['nan']
  for records in (plain, guarded):
    assert records[spike]['grad_norm'] > 1000
    assert records[nan]['grad_norm'] == 'nan'
  # Plain optax clips the spike and trains on; the NaN gradients kill it.
  assert plain[nan - 1]['loss'] != 'nan'
  assert all(plain[s]['loss'] == 'nan' for s in range(nan + 1, 61))
  # The guard skips the spike and the NaN step, and the poisoned data
  # until it rolls back past it.
  assert guarded[spike]['skipped'] and guarded[spike]['spike']
  assert guarded[nan]['skipped'] and guarded[nan]['nonfinite']
  first, last = windows['poison']
  poisoned = [guarded[s] for s in range(first, last + 1) if s in guarded]
  assert poisoned and all(r['skipped'] for r in poisoned)
  assert math.isfinite(guarded[FAST_STEPS]['loss'])


def test_the_slow_faults_are_outlived_and_the_shift_is_let_in(demo):
  windows = faults_lib.schedule(faults_lib.default_specs(FAST_STEPS),
                                FAST_STEPS)
  plain = {r['step']: r for r in _records(demo, 'plain')}
  guarded = {r['step']: r for r in _records(demo, 'guarded')}
  events = _events(demo, 'guarded')
  # The ramp: random-character rows, all of them at its middle step. Each
  # step a little worse than the last, it slips past the spike check (the
  # issue the ramp stands for) and is trained on; the run outlives it.
  start, end = windows['ramp']
  peak = (start + end) // 2
  for records in (plain, guarded):
    assert records[peak]['loss'] > records[start - 1]['loss'] + 0.5
  assert not any(guarded[s]['skipped'] for s in range(start, end + 1))
  # The level shift: a noisier data mix to the end of the run. The guard
  # lets it in, rolls nothing back, and the run keeps learning on it.
  start, _ = windows['shift']
  assert not any(e['kind'] == 'rollback' and e['step'] >= start
                 for e in events)
  shifted = [guarded[s]['loss'] for s in range(start, FAST_STEPS + 1)]
  assert all(math.isfinite(loss) for loss in shifted)
  assert sum(guarded[s]['skipped'] for s in range(start, FAST_STEPS + 1)) < (
      run_lib.DemoConfig(steps=FAST_STEPS).max_consecutive_skips)


def test_logs_hold_one_line_per_step_and_the_events(demo):
  plain_steps = [r['step'] for r in _records(demo, 'plain')]
  assert plain_steps == list(range(1, FAST_STEPS + 1))
  events = _events(demo, 'guarded')
  kinds = [e['kind'] for e in events if e['kind'] != 'skipped_step']
  assert kinds == ['rollback', 'preempted', 'resumed']
  rollback = next(e for e in events if e['kind'] == 'rollback')
  dropped = range(rollback['step'] + 1, rollback['resume_step'] + 1)
  guarded_steps = [r['step'] for r in _records(demo, 'guarded')]
  assert guarded_steps == [
      s for s in range(1, FAST_STEPS + 1) if s not in dropped
  ]
  # The preemption resumed from the checkpoint it saved.
  preempted, resumed = [e for e in events
                        if e['kind'] in ('preempted', 'resumed')]
  assert preempted['step'] == resumed['step']
  for run in run_lib.RUNS:
    assert list((demo / run).glob('events.out.tfevents.*'))


def test_report_png_is_rendered_and_rerendered(demo, capsys, tmp_path):
  png = demo / 'report.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  out = tmp_path / 'again.png'
  assert cli.main(['report', str(demo), '--output', str(out)]) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'Wrote' in capsys.readouterr().out


def test_report_names_the_faults_apart_and_its_legend_covers_no_panel(demo):
  figure = report_lib.draw(demo)
  figure.draw_without_rendering()
  renderer = figure.canvas.get_renderer()
  names = [t for t in figure.axes[0].texts
           if t.get_text() in faults_lib.DESCRIPTIONS]
  windows = faults_lib.schedule(faults_lib.default_specs(FAST_STEPS),
                                FAST_STEPS)
  assert sorted(t.get_text() for t in names) == sorted(windows)
  # The spike (step 18) and the ramp (from 20) are close enough to collide.
  boxes = [t.get_window_extent(renderer) for t in names]
  assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
  title = figure.axes[0].title.get_window_extent(renderer)
  assert not any(box.overlaps(title) for box in boxes)
  legend = figure.legends[0].get_window_extent(renderer)
  assert not any(legend.overlaps(ax.get_window_extent(renderer))
                 for ax in figure.axes)
  assert not any(ax.get_legend() for ax in figure.axes)


def test_inspect_lists_checkpoints_and_the_last_good_one(demo, capsys,
                                                          monkeypatch):
  monkeypatch.chdir(demo.parent)  # A relative path, as the README gives it.
  monkeypatch.setenv('COLUMNS', '80')
  assert cli.main(['inspect', 'run/checkpoints']) == 0
  table = capsys.readouterr().out
  assert f'{FAST_STEPS} *' in table  # the last good one
  # One data position: the batches drawn, not twice (og.batches' and the
  # fault injector's count).
  assert f'next_index={FAST_STEPS}' in table
  assert ' index=' not in table
  assert 'unreadable' not in table and '…' not in table
  assert max(len(line) for line in table.splitlines()) <= 80


def test_resume_after_kill_ends_with_the_same_params(demo, tmp_path):
  out = tmp_path / 'killed'
  out.mkdir()
  # Start where the plain run is done, to spend the time on the guarded one.
  shutil.copy(demo / 'config.json', out)
  plain = json.loads((demo / 'summary.json').read_text())['plain']
  (out / 'summary.json').write_text(json.dumps({'plain': plain}))
  env = dict(os.environ, PYTHONPATH=str(REPO))
  process = subprocess.Popen(
      [sys.executable, '-m', 'optax_guard.cli', 'demo', '--steps',
       str(FAST_STEPS), '--out', str(out)],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )
  # Kill it once the guarded run has checkpoints beyond its first.
  deadline = time.monotonic() + 240
  checkpoints = out / 'checkpoints'
  while time.monotonic() < deadline and process.poll() is None:
    steps = [int(p.name) for p in checkpoints.glob('*') if p.name.isdigit()]
    if steps and max(steps) >= 10:
      break
    time.sleep(0.02)
  assert process.poll() is None, 'the demo ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  # An unfinished save, as a kill mid-save leaves it, and a flipped bit in
  # the newest finished checkpoint: both are skipped with a warning.
  (checkpoints / '59.orbax-checkpoint-tmp').mkdir()
  newest = max(int(p.name) for p in checkpoints.glob('*') if p.name.isdigit())
  _flip_a_bit(checkpoints / str(newest))
  config = run_lib.DemoConfig(steps=FAST_STEPS)
  with pytest.warns(CorruptCheckpointWarning) as warned:
    summary = run_lib.run_demo(config, out)
  messages = ' '.join(str(w.message) for w in warned)
  assert 'unfinished save' in messages
  assert f'step {newest} ' in messages and 'skipped and moved' in messages
  reference = json.loads((demo / 'summary.json').read_text())
  assert summary['guarded'] == reference['guarded']
  # Each step logged once, as in the uninterrupted run.
  assert _records(out, 'guarded') == _records(demo, 'guarded')
  # The events are the uninterrupted run's, plus the resume after the kill.
  events = _events(out, 'guarded')
  preempted = {e['step'] for e in events if e['kind'] == 'preempted'}
  after_kill = [e for e in events
                if e['kind'] == 'resumed' and e['step'] not in preempted]
  assert len(after_kill) == 1
  events.remove(after_kill[0])
  reference_events = _events(demo, 'guarded')
  for e in events + reference_events:
    e.pop('counts', None)
  assert events == reference_events


class _Stop(Exception):
  pass


class _StopAt(run_lib.Listener):
  """Records the notes; stops the demo at ``(run, step)`` (0: its start)."""

  def __init__(self, run, step):
    self.at = (run, step)
    self.notes = []

  def start(self, run, total):
    if self.at == (run, 0):
      raise _Stop

  def step(self, run, state, metrics, events):
    if self.at == (run, state.step):
      raise _Stop

  def note(self, run, message):
    self.notes.append((run, message))


def test_a_stopped_plain_run_says_it_starts_again_from_step_0(demo, tmp_path):
  out = tmp_path / 'stopped'
  config = run_lib.DemoConfig(steps=FAST_STEPS)
  with pytest.raises(_Stop):
    run_lib.run_demo(config, out, _StopAt('plain', 20))
  assert [r['step'] for r in _records(out, 'plain')] == list(range(1, 21))
  again = _StopAt('guarded', 0)  # Stops once the plain run is done.
  with pytest.raises(_Stop):
    run_lib.run_demo(config, out, again)
  assert again.notes[0] == ('plain', (
      'starts again from step 0: plain optax keeps no checkpoint here, so the'
      ' 20 steps it trained before it was stopped are lost'))
  # Trained again from scratch, each step logged once, as uninterrupted.
  assert _records(out, 'plain') == _records(demo, 'plain')


def test_rerun_of_a_finished_demo_changes_nothing(demo):
  before = report_lib.read_summary(demo / 'summary.json')
  summary = run_lib.run_demo(run_lib.DemoConfig(steps=FAST_STEPS), demo)
  assert summary == before


def test_other_settings_or_a_foreign_directory_are_refused(demo, tmp_path,
                                                            capsys):
  assert cli.main(['demo', '--steps', '80', '--out', str(demo)]) == 2
  refusal = capsys.readouterr().out
  assert 'other settings' in refusal and 'steps' in refusal
  (tmp_path / 'notes.txt').write_text('mine')
  assert cli.main(['demo', '--out', str(tmp_path)]) == 2
  assert 'holds no optax-guard demo run' in capsys.readouterr().out
  assert cli.main(['report', str(tmp_path)]) == 2
  assert 'not an optax-guard demo directory' in capsys.readouterr().out
  assert cli.main(['inspect', str(tmp_path / 'missing')]) == 2
  assert 'does not exist' in capsys.readouterr().out
  assert cli.main(['inspect', str(tmp_path)]) == 2
  assert 'holds no optax_guard checkpoints' in capsys.readouterr().out


def _flip_a_bit(step_dir: pathlib.Path) -> None:
  """Flips one bit in the middle of the largest array file."""
  largest = max((step_dir / 'state').glob('**/d/*'),
                key=lambda p: p.stat().st_size)
  payload = bytearray(largest.read_bytes())
  payload[len(payload) // 2] ^= 0x10
  largest.write_bytes(bytes(payload))


def test_corrupted_checkpoint_is_shown_invalid(demo, tmp_path):
  copy = tmp_path / 'checkpoints'
  shutil.copytree(demo / 'checkpoints', copy)
  steps = sorted(int(p.name) for p in copy.glob('*') if p.name.isdigit())
  _flip_a_bit(copy / str(steps[-1]))
  records = {r['step']: r for r in og.Checkpointer.describe(copy)}
  assert not records[steps[-1]]['valid']
  assert records[steps[-1]]['problem'] == 'fingerprint mismatch'
  assert all(records[s]['valid'] for s in steps[:-1])
  assert sum(r['last_good'] for r in records.values()) == 1


def test_progress_fits_80_columns_and_prints_lines_off_a_terminal():
  from rich.console import Console  # pylint: disable=g-import-not-at-top

  metrics = {'loss': 2.3456, 'skipped': False}
  # A resume from a checkpoint of step 420 brings its counts back.
  resumed = (Resumed(420, {'skipped_step': 12, 'rollback': 1}),)
  terminal = Console(width=80, force_terminal=True, record=True,
                     file=io.StringIO())
  listener = cli._RichListener(terminal)  # pylint: disable=protected-access
  listener.start('guarded', 600)
  listener.step('guarded', og.TrainState(420, {}, {}), metrics, resumed)
  listener.stop()
  shown = terminal.export_text()
  assert '420/600' in shown and '0:00:0' in shown and 'rollbacks 1' in shown
  assert '…' not in shown
  piped = Console(width=80, file=io.StringIO())
  listener = cli._RichListener(piped, every=50)  # pylint: disable=protected-access
  listener.start('guarded', 600)
  for step in range(1, 101):
    listener.step('guarded', og.TrainState(step, {}, {}), metrics, ())
  lines = piped.file.getvalue().splitlines()
  assert [line.split('  ')[0].strip() for line in lines] == [
      'guarded step 50/600', 'guarded step 100/600']


# ----------------------------------------------------------------------------
# The pieces, without training.


def test_batches_are_restorable_windows_of_the_text():
  corpus = data_lib.load_corpus()
  assert corpus.vocab_size > 80
  assert corpus.decode(corpus.train[:3]) == 'The'
  first = data_lib.train_batches(corpus, batch_size=4, seq_len=16, seed=3)
  batches = [next(first) for _ in range(5)]
  second = data_lib.train_batches(corpus, batch_size=4, seq_len=16, seed=3)
  for _ in range(3):
    next(second)
  state = second.get_state()
  third = data_lib.train_batches(corpus, batch_size=4, seq_len=16, seed=3)
  third.set_state(state)
  np.testing.assert_array_equal(next(third)['tokens'], batches[3]['tokens'])
  assert batches[0]['tokens'].shape == (4, 17)


def test_the_schedule_breaks_exactly_its_batches():
  windows = faults_lib.schedule(['spike@2', 'nan@3', 'poison@5-8',
                                 'preempt@9', 'ramp@11-15', 'shift@18'],
                                steps=20)
  assert windows['shift'] == (18, 20)
  plan = faults_lib.plan(windows)
  # Keyed by step (FaultInjector(keys='step')); nothing at the preemption,
  # 9, or at 16-17.
  assert sorted(plan) == [2, 3, 5, 6, 7, 8, 11, 12, 13, 14, 15, 18, 19, 20]
  assert {plan[s].kind for s in (2, 5, 6, 7, 8)} == {'poisoned_batch'}
  assert plan[2].scale == faults_lib.SPIKE_SCALE
  assert plan[3] == og.testing.Fault('nan_batch')
  assert all(plan[s].scale == faults_lib.POISON_SCALE for s in range(5, 9))
  # The ramp: a third, two thirds, all and back of the rows; the shift:
  # SHIFT_FRACTION of the rows of every batch to the end.
  assert [plan[s] for s in range(11, 16)] == [
      og.testing.Fault('poisoned_rows', f) for f in (1 / 3, 2 / 3, 1, 2 / 3,
                                                     1 / 3)]
  assert [plan[s] for s in (18, 19, 20)] == 3 * [
      og.testing.Fault('poisoned_rows', faults_lib.SHIFT_FRACTION)]
  assert cli.describe_fault('poison', windows['poison']).startswith(
      'steps 5-8: ')
  assert cli.describe_fault('preempt', windows['preempt']).startswith(
      'after step 9: ')
  assert cli.describe_fault('ramp', windows['ramp']).startswith(
      'steps 11-15: ')
  assert cli.describe_fault('shift', windows['shift']).startswith(
      'steps 18-: ')


def test_the_slow_faults_replace_token_rows_with_random_characters():
  corpus = data_lib.load_corpus()
  clean = data_lib.train_batches(corpus, batch_size=10, seq_len=16, seed=0)
  windows = faults_lib.schedule(['ramp@1-3', 'shift@5'], steps=6)
  faulty = og.testing.FaultInjector(
      data_lib.train_batches(corpus, batch_size=10, seq_len=16, seed=0),
      faults_lib.plan(windows), keys='step')
  # Rows replaced per step, of 10: 5, 10, 5 (the ramp), 0, then the shift's.
  shift = round(10 * faults_lib.SHIFT_FRACTION)
  for replaced in (5, 10, 5, 0, shift, shift):
    want, got = next(clean), next(faulty)
    np.testing.assert_array_equal(got['weights'], want['weights'])
    np.testing.assert_array_equal(got['tokens'][replaced:],
                                  want['tokens'][replaced:])
    differs = (got['tokens'][:replaced] != want['tokens'][:replaced])
    assert differs.mean(axis=1).min(initial=1) > 0.5
    assert got['tokens'].min() >= 0
    assert got['tokens'].max() < corpus.vocab_size


@pytest.mark.parametrize('spec, message', [
    (['bogus'], 'bad fault'),
    (['nan@0'], 'outside the run'),
    (['nan@5-6'], 'only poison and ramp take a window'),
    (['shift@5-9'], 'only poison and ramp take a window'),
    (['poison@9-3'], 'empty poison window'),
    (['ramp@9-3'], 'empty ramp window'),
    (['shift@51'], 'outside the run'),
    (['nan', 'nan@4'], 'given twice'),
])
def test_bad_fault_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    cli.parse_faults(spec, steps=50)


def test_no_faults():
  assert cli.parse_faults(['none'], steps=50) == ('none',)
  assert faults_lib.schedule(['none'], steps=50) == {}
  assert run_lib.DemoConfig(steps=50, faults=('none',)).windows == {}


def test_fault_specs_are_written_out_in_full():
  # A bare name takes its default place; a window its default length.
  specs = cli.parse_faults(['nan', 'poison@10', 'ramp', 'shift@40'], steps=50)
  assert specs == ('nan@40', 'poison@10-21', 'ramp@16-22', 'shift@40')
  assert faults_lib.schedule(specs, steps=50) == {
      'poison': (10, 21), 'ramp': (16, 22), 'nan': (40, 40),
      'shift': (40, 50)}
