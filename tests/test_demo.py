"""The ``optax-guard demo`` end to end, in its fast mode (60 steps).

One demo run (a module fixture) serves most tests; the resume test kills a
second run in a subprocess and finishes it in this process.
"""

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
from optax_guard.host.checkpoint import CorruptCheckpointWarning
from optax_guard import cli
from optax_guard.demo import data as data_lib
from optax_guard.demo import faults as faults_lib
from optax_guard.demo import logs as logs_lib
from optax_guard.demo import run as run_lib

FAST_STEPS = 60
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  # A relative --out, as the default one: Orbax itself takes absolute paths.
  parent = tmp_path_factory.mktemp('demo')
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(parent)
    assert cli.main(['demo', '--steps', str(FAST_STEPS), '--out', 'run']) == 0
  return parent / 'run'


def _records(out, run):
  return [
      r for r in logs_lib.read_jsonl(out / logs_lib.METRICS_FILE)
      if r['run'] == run
  ]


def test_plain_run_dies_and_guarded_run_recovers(demo):
  summary = json.loads((demo / 'summary.json').read_text())
  plain, guarded = summary['plain'], summary['guarded']
  assert not plain['finite'] and math.isnan(plain['final_loss'])
  assert guarded['finite']
  # Uniform guessing over ~100 characters scores ln(103) = 4.63.
  assert guarded['final_loss'] < 3.0
  assert guarded['rollbacks'] == 1
  assert len(guarded['params_sha256']) == 64
  # The live counters agree with og.fit's event log.
  last = _records(demo, 'guarded')[-1]
  assert (last['skips'], last['rollbacks']) == (
      guarded['skips'], guarded['rollbacks'])


def test_each_fault_hits_both_runs_at_its_printed_step(demo):
  faults = {f.name: f for f in faults_lib.default_faults(FAST_STEPS)}
  plain = {r['step']: r for r in _records(demo, 'plain')}
  guarded = {r['step']: r for r in _records(demo, 'guarded')}
  spike, nan, poison = faults['spike'], faults['nan'], faults['poison']
  for records in (plain, guarded):
    assert records[spike.start]['fault'] == 'spike'
    assert records[spike.start]['grad_norm'] > 1000
    assert records[nan.start]['fault'] == 'nan'
    assert math.isnan(records[nan.start]['loss'])
  # Plain optax clips the spike and trains on; the NaN batch kills it.
  assert math.isfinite(plain[nan.start - 1]['loss'])
  assert all(math.isnan(plain[s]['loss']) for s in range(nan.start, 61))
  # The guard skips the spike and the NaN batch, and the poisoned data
  # until it rolls back past it.
  assert guarded[spike.start]['skipped'] and guarded[spike.start]['spike']
  assert guarded[nan.start]['skipped'] and guarded[nan.start]['nonfinite']
  poisoned = [guarded[s] for s in range(poison.start, poison.end)
              if s in guarded]
  assert poisoned and all(r['skipped'] for r in poisoned)
  assert math.isfinite(guarded[FAST_STEPS]['loss'])


def test_logs_hold_one_line_per_step_and_the_events(demo):
  plain_steps = [r['step'] for r in _records(demo, 'plain')]
  assert plain_steps == list(range(1, FAST_STEPS + 1))
  events = logs_lib.events(demo, 'guarded')
  kinds = [e['event'] for e in events]
  assert kinds == ['rollback', 'preempt', 'resume']
  rollback = events[0]
  skipped_batches = range(rollback['step'] + 1, rollback['resume_step'] + 1)
  guarded_steps = [r['step'] for r in _records(demo, 'guarded')]
  assert guarded_steps == [
      s for s in range(1, FAST_STEPS + 1) if s not in skipped_batches
  ]
  # The preemption resumed from the checkpoint it saved.
  assert events[1]['step'] == events[2]['step']
  for run in ('plain', 'guarded'):
    assert list((demo / 'tensorboard' / run).glob('events.out.tfevents.*'))


def test_report_png_is_rendered_and_rerendered(demo, capsys):
  png = demo / 'report.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  out = demo / 'again.png'
  assert cli.main(['report', str(demo), '--output', str(out)]) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'Wrote' in capsys.readouterr().out


def test_inspect_lists_checkpoints_and_the_last_good_one(demo, capsys,
                                                          monkeypatch):
  monkeypatch.chdir(demo.parent)  # A relative path, as the README gives it.
  assert cli.main(['inspect', 'run/checkpoints']) == 0
  table = capsys.readouterr().out
  assert str(FAST_STEPS) in table and 'yes' in table
  assert 'unreadable' not in table


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
  assert _records(out, 'guarded') == _records(demo, 'guarded')
  # The events are the uninterrupted run's, plus the resume after the kill.
  events = logs_lib.events(out)
  preempted = {e['step'] for e in events if e['event'] == 'preempt'}
  after_kill = [e for e in events
                if e['event'] == 'resume' and e['step'] not in preempted]
  assert len(after_kill) == 1
  events.remove(after_kill[0])
  assert events == logs_lib.events(demo)


def test_rerun_of_a_finished_demo_changes_nothing(demo):
  before = json.loads((demo / 'summary.json').read_text())
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
  from optax_guard.demo import checkpoints  # pylint: disable=g-import-not-at-top
  infos = {info.step: info for info in checkpoints.describe(copy)}
  assert not infos[steps[-1]].valid
  assert 'fingerprints' in infos[steps[-1]].problem
  assert all(infos[s].valid for s in steps[:-1])
  assert sum(info.last_good for info in infos.values()) == 1


# ----------------------------------------------------------------------------
# The pieces, without training.


def test_batches_are_a_function_of_the_position():
  corpus = data_lib.load_corpus()
  assert corpus.vocab_size > 80
  assert corpus.decode(corpus.train[:3]) == 'The'
  first = data_lib.BatchIterator(corpus.train, batch_size=4, seq_len=16, seed=3)
  batches = [next(first) for _ in range(5)]
  second = data_lib.BatchIterator(
      corpus.train, batch_size=4, seq_len=16, seed=3
  )
  second.set_state({'position': 3})
  np.testing.assert_array_equal(next(second)['tokens'], batches[3]['tokens'])
  assert batches[0]['tokens'].shape == (4, 17)


def test_faults_break_exactly_their_batches():
  corpus = data_lib.load_corpus()
  faults = faults_lib.parse_faults(
      ['spike@2', 'nan@3', 'poison@5-8'], steps=10
  )
  batches = faults_lib.FaultyBatches(
      data_lib.BatchIterator(corpus.train, batch_size=32, seq_len=64, seed=0),
      faults, vocab_size=corpus.vocab_size, seed=0,
  )
  clean = data_lib.BatchIterator(corpus.train, batch_size=32, seq_len=64,
                                 seed=0)
  for step in range(1, 10):
    broken, reference = next(batches), next(clean)
    weights = broken['weights']
    if step == 2:
      np.testing.assert_array_equal(weights, faults_lib.SPIKE_FACTOR)
    elif step == 3:
      assert np.isnan(weights[0, 0]) and np.isfinite(weights.flat[1:]).all()
    else:
      np.testing.assert_array_equal(weights, 1.0)
    changed = np.mean(broken['tokens'] != reference['tokens'])
    if 5 <= step <= 8:
      # 50% noise growing to 100%; a noise token equals the text's 1% of
      # the time.
      share = 0.5 + 0.5 * (step - 4) / 4
      assert abs(changed - share * (1 - 1 / corpus.vocab_size)) < 0.06
    else:
      assert changed == 0


@pytest.mark.parametrize('spec, message', [
    (['bogus'], 'bad fault'),
    (['nan@0'], 'outside the run'),
    (['nan@5-6'], 'only poison takes a window'),
    (['poison@9-3'], 'empty poison window'),
    (['nan', 'nan@4'], 'given twice'),
])
def test_bad_fault_specs_are_named(spec, message):
  with pytest.raises(ValueError, match=message):
    faults_lib.parse_faults(spec, steps=50)


def test_no_faults():
  assert faults_lib.parse_faults(['none'], steps=50) == ()
