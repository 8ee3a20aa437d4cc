"""What a newcomer's first hour met (issue 26): strict JSON in checkpoints,
one data position in `optax-guard inspect`, install lines that work."""

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_guard as og
from optax_guard import cli, testing
from optax_guard.host import runlog

ROOT = pathlib.Path(__file__).resolve().parent.parent
TX = og.guard(optax.adam(0.05), clip=og.clip_by_global_norm(1.0))


def loss_fn(params, batch):
  return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)


def _data():
  arrays = testing.regression_data(seed=1, num_examples=128)
  return testing.FaultInjector(og.batches(arrays, 16, seed=1),
                               {3: testing.Fault('nan_loss')}, keys='step')


def _init():
  params = {'w': jax.random.normal(jax.random.key(0), (8, 1)) / 3}
  return og.TrainState(0, params, TX.init(params))


def _no_constants(name):
  raise ValueError(f'{name} is not JSON')


def _saved_events(directory: pathlib.Path, step: int) -> dict:
  """The events item of ``step`` as it is on disk, parsed as strict JSON."""
  text = (directory / str(step) / 'events' / 'metadata').read_text()
  return json.loads(text, parse_constant=_no_constants)


def test_event_log_keeps_strict_json_and_reads_a_raw_nan():
  log = runlog.EventLog()
  log.add(runlog.SkippedStep(3, reason='nonfinite', loss=math.nan, grad_norm=math.inf))
  saved = log.state_dict()
  assert saved['recent'] == [{'kind': 'skipped_step', 'step': 3,
                              'reason': 'nonfinite', 'loss': 'nan',
                              'grad_norm': 'inf'}]
  json.dumps(saved, allow_nan=False)
  # What a checkpoint of an older version holds: the NaN raw.
  old = {'counts': {'skipped_step': 1}, 'recent': [
      {'kind': 'skipped_step', 'step': 3, 'reason': 'nonfinite',
       'loss': math.nan, 'grad_norm': math.inf}]}
  again = runlog.EventLog()
  again.load_state_dict(old)
  assert again.state_dict() == saved


def test_fit_checkpoints_hold_strict_json_events_and_resume_old_ones(
    tmp_path):
  step = og.make_train_step(testing.with_faults(loss_fn), TX)
  with og.Checkpointer(tmp_path, save_interval_steps=5,
                       async_save=False) as ckpt:
    og.fit(step, _init(), _data(), num_steps=6, checkpointer=ckpt,
           progress=False)
  skipped, = [e for e in _saved_events(tmp_path, 6)['log']['recent']
              if e['kind'] == 'skipped_step']
  assert skipped['step'] == 3 and skipped['loss'] == 'nan'
  # The same checkpoint as an older version wrote it, at step 7: og.fit
  # resumes from it, and its next save is strict JSON again.
  with og.Checkpointer(tmp_path, async_save=False) as ckpt:
    data = _data()
    state, events = ckpt.restore_or_init(_init(), data_iter=data)
    for record in events['log']['recent']:
      record.update({k: float(v) for k, v in record.items()
                     if v in ('nan', 'inf')})
    ckpt.save(state._replace(step=7), data_iter=data, events=events,
              force=True)
  old = (tmp_path / '7' / 'events' / 'metadata').read_text()
  assert math.isnan(json.loads(old)['log']['recent'][0]['loss'])
  with og.Checkpointer(tmp_path, save_interval_steps=5,
                       async_save=False) as ckpt:
    result = og.fit(step, _init(), _data(), num_steps=10, checkpointer=ckpt,
                    progress=False)
  assert result.events.counts['skipped_step'] == 1
  assert _saved_events(tmp_path, 10)['log']['recent'][0]['loss'] == 'nan'


@pytest.mark.parametrize('data, shown', [
    # og.batches under og.testing.FaultInjector: the wrapper's own count
    # repeats the batches drawn, and is shown once.
    ({'data': {'next_index': 550}, 'index': 550}, 'next_index=550'),
    ({'next_index': 550}, 'next_index=550'),
    # Two numbers of one iterator that happen to agree both count.
    ({'epoch': 2, 'position': 2}, 'epoch=2 position=2'),
    ({'data': {'next_index': 7}, 'index': 9}, 'next_index=7 index=9'),
    (None, '-'),
])
def test_inspect_shows_one_data_position(data, shown):
  assert cli._data_position(data) == shown  # pylint: disable=protected-access


def test_the_install_lines_are_for_a_clone():
  # optax-guard is not on PyPI: every install line of the docs is an
  # editable install from the clone, as the README's.
  pages = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('**/*.md'))]
  lines = [(page.name, line) for page in pages
           for line in page.read_text().splitlines() if 'pip install' in line]
  assert lines
  for page, line in lines:
    for target in re.findall(r'pip install (?:-\w+ )*([^\s`]+)', line):
      assert target.strip('"\'').startswith('.'), (page, line)


def _absl_messages(caplog):
  return [r.getMessage() for r in caplog.records if r.name == 'absl']


def test_a_reader_sees_no_notice_that_it_reads_only(tmp_path, caplog):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from optax_guard.host.describe import quiet_read_only  # pylint: disable=g-import-not-at-top

  # A fresh one each time: Orbax's checks change the options they warn of.
  options = lambda: ocp.CheckpointManagerOptions(read_only=True)
  caplog.set_level('WARNING', logger='absl')
  ocp.CheckpointManager(tmp_path, options=options()).close()
  noticed = _absl_messages(caplog)
  assert len(noticed) == 3 and all('read only' in m or 'read_only' in m
                                   for m in noticed)
  caplog.clear()
  with quiet_read_only():
    ocp.CheckpointManager(tmp_path, options=options()).close()
    og.Checkpointer(tmp_path, read_only=True).close()
    absl_logging.warning('a real problem')  # Everything else passes.
  assert _absl_messages(caplog) == ['a real problem']
  # Only inside the block.
  caplog.clear()
  ocp.CheckpointManager(tmp_path, options=options()).close()
  assert len(_absl_messages(caplog)) == 3
  # A read-only Checkpointer is quiet by itself.
  caplog.clear()
  og.Checkpointer(tmp_path, read_only=True).close()
  assert _absl_messages(caplog) == []


def test_a_missing_extra_names_an_install_from_the_clone(capsys):
  error = ModuleNotFoundError("No module named 'rich'", name='rich')
  assert cli._missing_extra(error) == 1  # pylint: disable=protected-access
  message = capsys.readouterr().err
  assert "rich is not installed" in message
  assert "pip install -e '.[examples]'" in message
